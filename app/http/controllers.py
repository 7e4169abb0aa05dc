"""REST controllers: workflows, chats, audit events, hash-chain verification, metrics, health.

Services arrive as typed handler parameters (see `app.http.server.DEPENDENCIES`); every response is a
Struct of `app.http.views`; every error is raised and rendered by `app.http.errors` in one shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.exceptions import NotFoundException, PermissionDeniedException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Reference
from litestar.params import Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_503_SERVICE_UNAVAILABLE
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pymongo.asynchronous.database import AsyncDatabase

from app.http import views
from app.http.auth import Principal, TokenVerifier, require_role
from app.http.budgets import refuse_over_budget
from app.http.errors import error_responses
from app.runs.orchestrator import Orchestrator
from app.runs.supervisor import RunSupervisor
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.anchors import AnchorBook, judge
from domain.chain import ChainCheck, Verification
from domain.errors import UnknownChat
from domain.events import EVENT_TYPES, Record, StreamRef
from domain.lineage import with_anchor
from domain.model_io import PartStore, check_calls
from domain.store import MongoEventStore
from projections import queries
from projections.runner import ProjectionRunner

T = TypeVar("T")

VERSION = "0.1.0"
_json = msgspec.json.Encoder()


class StartChat(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /api/chats`: without `message`, an AgentDriven workflow's run starts at once and a
    UserDriven chat waits for its first message."""

    workflow: str
    message: str | None = None
    context: dict[str, Any] = {}


class SendMessage(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /api/chats/{id}/messages`: a new turn, or the answer to an open input request."""

    message: str
    request_id: str | None = None


async def owned_chat(
    store: MongoEventStore, principal: Principal, chat_id: str, *, control: bool = False
) -> Record:
    """The chat's first record, if the caller may read (or, with `control`, continue/stop) the chat.

    Raises UnknownChat (404) when there is no such chat, PermissionDeniedException (403) when it is
    someone else's.
    """
    first = await anext(store.read(chat_id, limit=1), None)
    if first is None:
        raise UnknownChat(chat_id)
    if not principal.can_read_chat(first.user_id, first.app_id):
        raise PermissionDeniedException(f"chat {chat_id} is not yours to read")
    if control and not principal.can_control_chat(first.user_id, first.app_id):
        raise PermissionDeniedException(f"only the chat's own user may change chat {chat_id}")
    return first


async def verify_chat(
    store: MongoEventStore, book: AnchorBook, principal: Principal, chat_id: str
) -> Verification:
    """The chat's hash chain, and its log against its latest tail anchor.

    An auditor asking about a chat that is gone from the log but was anchored in their app gets
    the report of a deleted chat instead of 404.
    """
    try:
        await owned_chat(store, principal, chat_id)
    except UnknownChat:
        anchor = await book.latest(chat_id)
        if anchor is None or "auditor" not in principal.roles or anchor.app_id != principal.app_id:
            raise
        return judge(ChainCheck(chat_id), anchor, book.key)
    anchor = await book.latest(chat_id)
    check = ChainCheck(chat_id, watch_seq=anchor.seq if anchor is not None else None)
    await store.verify(chat_id, check)
    verdict = judge(check, anchor, book.key)
    # Model I/O parts are covered too: a part not matching its hash is reported like a broken link.
    calls = [(r.seq, r.data) async for r in store.find(chat_id, types=["llm.call"])]
    broken = await check_calls(PartStore(store.db), calls) if verdict.ok else None
    if broken is not None:
        return msgspec.structs.replace(verdict, ok=False, broken_seq=broken[0], detail=broken[1])
    return await with_anchor(store.events, verdict)


def check_event_types(types: list[str] | None) -> None:
    """Refuse (400, field `type`) event types the log has no tag for."""
    unknown = sorted(set(types or ()) - EVENT_TYPES)
    if unknown:
        raise ValidationException(
            f"unknown event type(s) {unknown}; known: {sorted(EVENT_TYPES)}",
            extra=[{"key": "type", "source": "query", "message": f"unknown event type(s) {unknown}"}],
        )


def wants_ndjson(request: Request[Any, Any, Any], fmt: str | None) -> bool:
    """Whether the client asked for NDJSON (`?format=ndjson` or `Accept: application/x-ndjson`)."""
    return fmt == "ndjson" or "application/x-ndjson" in request.headers.get("accept", "")


def ndjson(items: AsyncIterator[T], line: Callable[[T], bytes]) -> Stream:
    """A streamed NDJSON answer, one `line(item)` per item (a Stream is a Response: the route's JSON
    schema documents its items; `NdjsonOperation` adds the media type)."""

    async def lines() -> AsyncIterator[bytes]:
        async for item in items:
            yield line(item)

    return Stream(lines(), media_type="application/x-ndjson")


@dataclass
class NdjsonOperation(Operation):
    """The schema of a route that also answers NDJSON (`wants_ndjson`): its 200 lists both media
    types, the NDJSON one as lines of `AuditRecord` documents."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            line = Reference(ref="#/components/schemas/AuditRecord")
            ok.content["application/x-ndjson"] = OpenAPIMediaType(schema=line)


@get("/api/info", media_type=MediaType.JSON, responses=error_responses(), security=[{}])
async def info(settings: Settings) -> views.Info:
    """What a client needs to know before it connects: auth, heartbeat interval, offline mode."""
    return views.Info(
        version=VERSION,
        auth=not settings.local_mode,
        heartbeat_s=settings.ws_heartbeat_s,
        offline=settings.offline,
        node=settings.node_id,
    )


class WorkflowController(Controller):
    """The workflows this runtime can run."""

    path = "/api/workflows"

    @get(responses=error_responses(401))
    async def list_workflows(self, workflows: WorkflowManager) -> views.WorkflowList:
        """Loaded workflows (and the problems of any that failed to load)."""
        items = []
        for name in workflows.names():
            workflow = workflows.get(name)
            items.append(
                views.WorkflowView(
                    name=workflow.name,
                    description=workflow.manifest.description,
                    pattern=workflow.pattern,
                    max_turns=workflow.max_turns,
                    entry_agent=workflow.manifest.entry_agent,
                    visual_agents=sorted(workflow.visual_agents),
                    startup_mode=workflow.manifest.startup_mode,
                    agents=[
                        views.AgentView(
                            name=a.name,
                            type=a.type,
                            structured_output=views.OutputView(name=output.name, schema=output.schema)
                            if (output := workflow.outputs.get(a.name)) is not None
                            else None,
                        )
                        for a in workflow.agents
                    ],
                )
            )
        return views.WorkflowList(workflows=items, errors=[str(e) for e in workflows.errors])


class ChatController(Controller):
    """Chats: start, list, read, continue, stop, audit and verify."""

    path = "/api/chats"

    @post(responses=error_responses(400, 401, 404, 409, 413, 429, 503))
    async def start_chat(
        self,
        request: Request[Principal, Any, Any],
        data: StartChat,
        orchestrator: Orchestrator,
        supervisor: RunSupervisor,
    ) -> views.ChatStarted:
        """Start a chat on a workflow; its run goes on in the background.

        The run starts with a first message, or at once for an AgentDriven workflow; a UserDriven chat
        created without a message has no run (`run_id` null) until its first message arrives.
        """
        principal = request.user
        workflow = orchestrator.workflows.get(data.workflow).name
        # A spent daily budget refuses (429) before anything is recorded.
        await refuse_over_budget(
            orchestrator,
            StreamRef(chat_id="", app_id=principal.app_id, user_id=principal.user_id, workflow=workflow),
        )
        starts = data.message is not None or orchestrator.workflows.get(data.workflow).agent_driven
        # A full node refuses (503) a chat that would run, before recording anything.
        with supervisor.admission() if starts else contextlib.nullcontext():
            stream = await orchestrator.create_chat(
                workflow=data.workflow,
                user_id=principal.user_id,
                app_id=principal.app_id,
                message=data.message,
                context=data.context,
            )
            run_id = await supervisor.start(stream, admitted=True) if starts else None
        return views.ChatStarted(chat_id=stream.chat_id, run_id=run_id, workflow=stream.workflow)

    @get(responses=error_responses(400, 401))
    async def list_chats(
        self,
        request: Request[Principal, Any, Any],
        db: AsyncDatabase[Any],
        offset: Annotated[int, Parameter(ge=0)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
    ) -> views.ChatList:
        """The caller's chats, newest first (an auditor sees every chat of its app)."""
        principal = request.user
        user = None if "auditor" in principal.roles else principal.user_id
        items = await queries.list_sessions(
            db, app_id=principal.app_id, user_id=user, offset=offset, limit=limit
        )
        return views.ChatList(chats=[_summary(doc) for doc in items], offset=offset, limit=limit)

    @get("/{chat_id:str}", responses=error_responses(401, 403, 404))
    async def get_chat(
        self,
        request: Request[Principal, Any, Any],
        chat_id: str,
        store: MongoEventStore,
        db: AsyncDatabase[Any],
    ) -> views.ChatSession:
        """The chat's session document (messages and status), projected from its log."""
        await owned_chat(store, request.user, chat_id)
        visible_only = "auditor" not in request.user.roles
        session = await queries.get_session(db, chat_id, visible_only=visible_only)
        if session is None:
            raise NotFoundException(f"chat {chat_id} is not projected yet; retry shortly")
        return msgspec.convert(session, views.ChatSession)

    @post(
        "/{chat_id:str}/messages",
        status_code=HTTP_202_ACCEPTED,
        responses=error_responses(400, 401, 403, 404, 409, 413, 429, 503),
    )
    async def send_message(
        self,
        request: Request[Principal, Any, Any],
        chat_id: str,
        data: SendMessage,
        store: MongoEventStore,
        supervisor: RunSupervisor,
        orchestrator: Orchestrator,
    ) -> views.MessageAccepted:
        """Answer the chat's open input request, or continue a finished chat with a new turn."""
        first = await owned_chat(store, request.user, chat_id, control=True)
        stream = StreamRef(
            chat_id=chat_id, app_id=first.app_id, user_id=first.user_id, workflow=first.workflow
        )
        await refuse_over_budget(
            orchestrator, stream
        )  # 429 when the chat, its app or its user spent its budget
        recorded = await supervisor.send_message(chat_id, data.message, request_id=data.request_id)
        return views.MessageAccepted(chat_id=chat_id, recorded=recorded)

    @post("/{chat_id:str}/stop", status_code=HTTP_202_ACCEPTED, responses=error_responses(401, 403, 404, 409))
    async def stop_chat(
        self,
        request: Request[Principal, Any, Any],
        chat_id: str,
        store: MongoEventStore,
        supervisor: RunSupervisor,
    ) -> views.StopAccepted:
        """Stop the chat's run (recorded as `run.stopped`)."""
        await owned_chat(store, request.user, chat_id, control=True)
        run_id = await supervisor.stop(chat_id, by=request.user.user_id)
        return views.StopAccepted(chat_id=chat_id, run_id=run_id, recorded="run.stopped")

    @get(
        "/{chat_id:str}/events",
        responses=error_responses(400, 401, 403, 404),
        operation_class=NdjsonOperation,
    )
    async def events(
        self,
        request: Request[Principal, Any, Any],
        chat_id: str,
        store: MongoEventStore,
        after: Annotated[int, Parameter(ge=0)] = 0,
        limit: Annotated[int | None, Parameter(ge=1, le=100_000)] = None,
        event_type: Annotated[list[str] | None, Parameter(query="type")] = None,
        agent: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        fmt: Annotated[str | None, Parameter(query="format", pattern="^(json|ndjson)$")] = None,
    ) -> Response[views.ChatEvents]:
        """The chat's record history, filtered; NDJSON streamed when asked for.

        Auditors get every record (hidden agents' too); the chat's user gets what the ChatUI may
        show (visible records). Ask for NDJSON (one `AuditRecord` per line) with
        `Accept: application/x-ndjson` or `?format=ndjson`.
        """
        await owned_chat(store, request.user, chat_id)
        visible = None if "auditor" in request.user.roles else True
        check_event_types(event_type)
        records = store.find(
            chat_id,
            after=after,
            limit=limit,
            types=event_type,
            agent=agent,
            since=since,
            until=until,
            visible=visible,
        )
        if wants_ndjson(request, fmt):
            return ndjson(records, lambda record: _json.encode(views.audit_record(record)) + b"\n")  # type: ignore[return-value]
        items = [views.audit_record(record) async for record in records]
        return Response(views.ChatEvents(chat_id=chat_id, events=items), media_type=MediaType.JSON)

    @get("/{chat_id:str}/verify", responses=error_responses(401, 403, 404))
    async def verify(
        self, request: Request[Principal, Any, Any], chat_id: str, store: MongoEventStore, anchors: AnchorBook
    ) -> Verification:
        """Recompute the chat's hash chain and check it against its tail anchor: `ok`, the first broken seq."""
        return await verify_chat(store, anchors, request.user, chat_id)


def _summary(doc: dict[str, Any]) -> views.ChatSummary:
    messages = doc.get("messages") or []
    first = next((m for m in messages if m.get("role") == "user" and m.get("visible", True)), None)
    return views.ChatSummary(
        chat_id=doc["chat_id"],
        workflow=doc.get("workflow", ""),
        status=doc.get("status", "created"),
        created_at=doc.get("created_at"),
        updated_at=doc.get("updated_at"),
        message_count=int(doc.get("message_count") or 0),
        user_id=doc.get("user_id", ""),
        app_id=doc.get("app_id", ""),
        title=(first or {}).get("content", "")[:120],
    )


class MetricsController(Controller):
    """Performance metrics projected from `llm.call` and the other records (analysts; owners for their chat)."""

    path = "/metrics/perf"

    @get("/aggregate", responses=error_responses(401, 403))
    async def aggregate(
        self, request: Request[Principal, Any, Any], db: AsyncDatabase[Any]
    ) -> queries.AggregateMetrics:
        """Totals and merged latency percentiles across the app's chats."""
        principal = require_role(request, "analyst")
        return msgspec.convert(
            await queries.aggregate_metrics(db, app_id=principal.app_id), queries.AggregateMetrics
        )

    @get("/chats", responses=error_responses(400, 401, 403))
    async def chats(
        self,
        request: Request[Principal, Any, Any],
        db: AsyncDatabase[Any],
        sort: Annotated[str, Parameter(pattern="^(cost|tokens|time)$")] = "time",
        order: Annotated[str, Parameter(pattern="^(asc|desc)$")] = "desc",
        offset: Annotated[int, Parameter(ge=0)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
    ) -> queries.ChatMetricsPage:
        """Per-chat metrics, paged and sortable by cost, tokens or time."""
        principal = require_role(request, "analyst")
        page = await queries.list_chat_metrics(
            db, app_id=principal.app_id, sort=sort, descending=order == "desc", offset=offset, limit=limit
        )
        return msgspec.convert(page, queries.ChatMetricsPage)

    @get("/chat/{chat_id:str}", responses=error_responses(401, 403, 404))
    async def chat(
        self,
        request: Request[Principal, Any, Any],
        chat_id: str,
        store: MongoEventStore,
        db: AsyncDatabase[Any],
    ) -> queries.ChatMetrics:
        """One chat's metrics, per chat and per agent."""
        principal: Principal = request.user
        first = None
        if "analyst" not in principal.roles:
            first = await owned_chat(store, principal, chat_id)
        metrics = await queries.chat_metrics(db, chat_id)
        if metrics is None or (first is None and metrics.get("app_id") not in (None, principal.app_id)):
            raise NotFoundException(f"no metrics for chat {chat_id} (yet)")
        return msgspec.convert(metrics, queries.ChatMetrics)


def _ready_503() -> dict[int, ResponseSpec]:
    return {
        HTTP_503_SERVICE_UNAVAILABLE: ResponseSpec(
            data_container=views.Readiness,
            description="Not ready: MongoDB does not answer, or the projections lag",
        )
    }


class HealthController(Controller):
    """Liveness and readiness probes."""

    path = "/health"
    security = ({},)  # open: no token needed

    @get("/live", responses=error_responses())
    async def live(self) -> views.Live:
        """The process answers."""
        return views.Live(status="live")

    @get("/ready", responses={**error_responses(), **_ready_503()})
    async def ready(
        self, db: AsyncDatabase[Any], projections: ProjectionRunner, verifier: TokenVerifier
    ) -> Response[views.Readiness]:
        """Ready when MongoDB answers, the projection runner has caught up with the log and, with
        OIDC, the identity provider's keys are at hand."""
        try:
            await db.command("ping")
            mongo = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
            mongo = f"error: {exc}"
        caught_up = "caught_up" if projections.caught_up else "catching_up"
        identity = await verifier.ready()
        ok = mongo == "ok" and caught_up == "caught_up" and identity in ("ok", "off")
        readiness = views.Readiness(
            status="ready" if ok else "not_ready",
            mongo=mongo,
            projections=caught_up,
            lag=msgspec.convert(projections.lag(), views.ProjectionLag),
            identity=identity,
        )
        return Response(readiness, status_code=200 if ok else HTTP_503_SERVICE_UNAVAILABLE)


@get("/metrics", media_type=CONTENT_TYPE_LATEST, responses=error_responses(401))
async def prometheus_metrics() -> str:
    """The process's Prometheus metrics, in Prometheus's text exposition format."""
    return generate_latest(REGISTRY).decode()
