"""REST controllers: workflows, chats, audit events, hash-chain verification, metrics, health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.exceptions import NotFoundException, PermissionDeniedException, ValidationException
from litestar.params import Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_503_SERVICE_UNAVAILABLE

from app.auth import Principal, require_role
from app.runtime import Runtime
from domain.errors import UnknownChat
from domain.events import EVENT_TYPES, Record, to_document
from projections import queries

VERSION = "0.1.0"
_json = msgspec.json.Encoder()


class StartChat(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /api/chats`."""

    workflow: str
    message: str
    context: dict[str, Any] = {}


class SendMessage(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /api/chats/{id}/messages`: a new turn, or the answer to an open input request."""

    message: str
    request_id: str | None = None


def audit_view(record: Record) -> dict[str, Any]:
    """A record as the audit API returns it: every stored field, the timestamp as ISO text."""
    doc = to_document(record)
    doc["id"] = doc.pop("_id")
    doc["ts"] = record.ts.isoformat().replace("+00:00", "Z")
    return doc


async def owned_chat(runtime: Runtime, principal: Principal, chat_id: str, *, control: bool = False) -> Record:
    """The chat's first record, if the caller may read (or, with `control`, continue/stop) the chat.

    Raises UnknownChat (404) when there is no such chat, PermissionDeniedException (403) when it is
    someone else's.
    """
    assert runtime.store is not None
    first = await anext(runtime.store.read(chat_id, limit=1), None)
    if first is None:
        raise UnknownChat(chat_id)
    if not principal.can_read_chat(first.user_id, first.app_id):
        raise PermissionDeniedException(f"chat {chat_id} is not yours to read")
    if control and not principal.can_control_chat(first.user_id, first.app_id):
        raise PermissionDeniedException(f"only the chat's own user may change chat {chat_id}")
    return first


@get("/api/info", media_type=MediaType.JSON)
async def info(runtime: Runtime) -> dict[str, Any]:
    """What a client needs to know before it connects: auth, heartbeat interval, offline mode."""
    settings = runtime.settings
    return {
        "version": VERSION,
        "auth": not settings.local_mode,
        "heartbeat_s": settings.ws_heartbeat_s,
        "offline": settings.offline,
        "node": settings.node_id,
    }


class WorkflowController(Controller):
    """The workflows this runtime can run."""

    path = "/api/workflows"

    @get()
    async def list_workflows(self, runtime: Runtime) -> dict[str, Any]:
        """Loaded workflows (and the problems of any that failed to load)."""
        items = []
        for name in runtime.workflows.names():
            workflow = runtime.workflows.get(name)
            items.append(
                {
                    "name": workflow.name,
                    "description": workflow.manifest.description,
                    "pattern": workflow.pattern,
                    "max_turns": workflow.max_turns,
                    "entry_agent": workflow.manifest.entry_agent,
                    "visual_agents": sorted(workflow.visual_agents),
                    "agents": [{"name": a.name, "type": a.type} for a in workflow.agents],
                }
            )
        return {"workflows": items, "errors": [str(e) for e in runtime.workflows.errors]}


class ChatController(Controller):
    """Chats: start, list, read, continue, stop, audit and verify."""

    path = "/api/chats"

    @post()
    async def start_chat(self, request: Request[Principal, Any, Any], data: StartChat, runtime: Runtime) -> dict[str, Any]:
        """Start a chat on a workflow with a first message; the run goes on in the background."""
        assert runtime.orchestrator is not None and runtime.supervisor is not None
        principal = request.user
        with runtime.supervisor.admission():  # a full node refuses (503) before recording anything
            stream = await runtime.orchestrator.create_chat(
                workflow=data.workflow,
                user_id=principal.user_id,
                app_id=principal.app_id,
                message=data.message,
                context=data.context,
            )
            run_id = await runtime.supervisor.start(stream, admitted=True)
        return {"chat_id": stream.chat_id, "run_id": run_id, "workflow": stream.workflow}

    @get()
    async def list_chats(
        self,
        request: Request[Principal, Any, Any],
        runtime: Runtime,
        offset: Annotated[int, Parameter(ge=0)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        """The caller's chats, newest first (an auditor sees every chat of its app)."""
        principal = request.user
        user = None if "auditor" in principal.roles else principal.user_id
        items = await queries.list_sessions(
            runtime.db, app_id=principal.app_id, user_id=user, offset=offset, limit=limit
        )
        return {"chats": [_summary(doc) for doc in items], "offset": offset, "limit": limit}

    @get("/{chat_id:str}")
    async def get_chat(self, request: Request[Principal, Any, Any], chat_id: str, runtime: Runtime) -> dict[str, Any]:
        """The chat's session document (messages and status), projected from its log."""
        await owned_chat(runtime, request.user, chat_id)
        visible_only = "auditor" not in request.user.roles
        session = await queries.get_session(runtime.db, chat_id, visible_only=visible_only)
        if session is None:
            raise NotFoundException(f"chat {chat_id} is not projected yet; retry shortly")
        return session

    @post("/{chat_id:str}/messages", status_code=HTTP_202_ACCEPTED)
    async def send_message(
        self, request: Request[Principal, Any, Any], chat_id: str, data: SendMessage, runtime: Runtime
    ) -> dict[str, Any]:
        """Answer the chat's open input request, or continue a finished chat with a new turn."""
        assert runtime.supervisor is not None
        await owned_chat(runtime, request.user, chat_id, control=True)
        recorded = await runtime.supervisor.send_message(chat_id, data.message, request_id=data.request_id)
        return {"chat_id": chat_id, "recorded": recorded}

    @post("/{chat_id:str}/stop", status_code=HTTP_202_ACCEPTED)
    async def stop_chat(self, request: Request[Principal, Any, Any], chat_id: str, runtime: Runtime) -> dict[str, Any]:
        """Stop the chat's run (recorded as `run.stopped`)."""
        assert runtime.supervisor is not None
        await owned_chat(runtime, request.user, chat_id, control=True)
        run_id = await runtime.supervisor.stop(chat_id, by=request.user.user_id)
        return {"chat_id": chat_id, "run_id": run_id, "recorded": "run.stopped"}

    @get("/{chat_id:str}/events")
    async def events(
        self,
        request: Request[Principal, Any, Any],
        chat_id: str,
        runtime: Runtime,
        after: Annotated[int, Parameter(ge=0)] = 0,
        limit: Annotated[int | None, Parameter(ge=1, le=100_000)] = None,
        event_type: Annotated[list[str] | None, Parameter(query="type")] = None,
        agent: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        fmt: Annotated[str | None, Parameter(query="format")] = None,
    ) -> Response[Any]:
        """The chat's record history, filtered; NDJSON streamed when asked for.

        Auditors get every record (hidden agents' too); the chat's user gets what the ChatUI may
        show (visible records). Ask for NDJSON with `Accept: application/x-ndjson` or `?format=ndjson`.
        """
        assert runtime.store is not None
        await owned_chat(runtime, request.user, chat_id)
        visible = None if "auditor" in request.user.roles else True
        unknown = sorted(set(event_type or ()) - EVENT_TYPES)
        if unknown:
            raise ValidationException(f"unknown event type(s) {unknown}; known: {sorted(EVENT_TYPES)}")
        records = runtime.store.find(
            chat_id, after=after, limit=limit, types=event_type, agent=agent, since=since, until=until, visible=visible
        )
        if fmt == "ndjson" or "application/x-ndjson" in request.headers.get("accept", ""):

            async def lines() -> AsyncIterator[bytes]:
                async for record in records:
                    yield _json.encode(audit_view(record)) + b"\n"

            return Stream(lines(), media_type="application/x-ndjson")
        items = [audit_view(record) async for record in records]
        return Response({"chat_id": chat_id, "events": items}, media_type=MediaType.JSON)

    @get("/{chat_id:str}/verify")
    async def verify(self, request: Request[Principal, Any, Any], chat_id: str, runtime: Runtime) -> dict[str, Any]:
        """Recompute the chat's hash chain: `ok`, how many records were checked, the first broken seq."""
        assert runtime.store is not None
        await owned_chat(runtime, request.user, chat_id)
        result: dict[str, Any] = msgspec.to_builtins(await runtime.store.verify(chat_id))
        return result


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    keep = ("chat_id", "workflow", "status", "created_at", "updated_at", "message_count", "user_id", "app_id")
    summary = {key: doc.get(key) for key in keep}
    messages = doc.get("messages") or []
    first = next((m for m in messages if m.get("role") == "user"), None)
    summary["title"] = (first or {}).get("content", "")[:120]
    return summary


class MetricsController(Controller):
    """Performance metrics projected from `llm.call` and the other records (analysts; owners for their chat)."""

    path = "/metrics/perf"

    @get("/aggregate")
    async def aggregate(self, request: Request[Principal, Any, Any], runtime: Runtime) -> dict[str, Any]:
        """Totals and merged latency percentiles across the app's chats."""
        principal = require_role(request, "analyst")
        return await queries.aggregate_metrics(runtime.db, app_id=principal.app_id)

    @get("/chats")
    async def chats(
        self,
        request: Request[Principal, Any, Any],
        runtime: Runtime,
        sort: Annotated[str, Parameter(pattern="^(cost|tokens|time)$")] = "time",
        order: Annotated[str, Parameter(pattern="^(asc|desc)$")] = "desc",
        offset: Annotated[int, Parameter(ge=0)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        """Per-chat metrics, paged and sortable by cost, tokens or time."""
        principal = require_role(request, "analyst")
        return await queries.list_chat_metrics(
            runtime.db, app_id=principal.app_id, sort=sort, descending=order == "desc", offset=offset, limit=limit
        )

    @get("/chat/{chat_id:str}")
    async def chat(self, request: Request[Principal, Any, Any], chat_id: str, runtime: Runtime) -> dict[str, Any]:
        """One chat's metrics, per chat and per agent."""
        principal: Principal = request.user
        first = None
        if "analyst" not in principal.roles:
            first = await owned_chat(runtime, principal, chat_id)
        metrics = await queries.chat_metrics(runtime.db, chat_id)
        if metrics is None or (first is None and metrics.get("app_id") not in (None, principal.app_id)):
            raise NotFoundException(f"no metrics for chat {chat_id} (yet)")
        return metrics


class HealthController(Controller):
    """Liveness and readiness probes."""

    path = "/health"

    @get("/live")
    async def live(self) -> dict[str, str]:
        """The process answers."""
        return {"status": "live"}

    @get("/ready")
    async def ready(self, runtime: Runtime) -> Response[dict[str, Any]]:
        """Ready when MongoDB answers and the projection runner has caught up with the log."""
        checks: dict[str, Any] = {}
        try:
            await runtime.db.command("ping")
            checks["mongo"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
            checks["mongo"] = f"error: {exc}"
        runner = runtime.projections
        checks["projections"] = "caught_up" if runner is not None and runner.caught_up else "catching_up"
        if runner is not None:
            checks["lag"] = runner.lag()
        ok = checks["mongo"] == "ok" and checks["projections"] == "caught_up"
        status = 200 if ok else HTTP_503_SERVICE_UNAVAILABLE
        return Response({"status": "ready" if ok else "not_ready", **checks}, status_code=status)
