"""Model I/O and replay over REST: one model call's exact request and response, and two chats compared.

`GET /api/chats/{chat_id}/calls/{seq}` reassembles an `llm.call`'s request and response from its
parts (domain/model_io.py); `GET /api/chats/{a}/diff/{b}` aligns two chats turn by turn (a replay
against its original, say). The chats' events access rules apply: a chat's user reads its visible
records, an auditor every record of the app's chats; a diff needs both chats readable.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get
from litestar.exceptions import NotFoundException

from app.http.auth import Principal
from app.http.controllers import owned_chat
from app.http.errors import error_responses
from app.http.views import View
from app.runs.orchestrator import Orchestrator
from app.settings import Settings
from domain.model_io import read_call
from domain.store import MongoEventStore
from projections.diff import ChatDiff, diff_chats
from projections.prices import PriceTable


class ModelCall(View, frozen=True, kw_only=True):
    """One `llm.call` with its exact request and response, reassembled from the stored parts.

    `io` says what was kept: "full" (request and response below), "hashes" (only the hashes),
    "off" (neither). `missing` lists parts the record names that are not stored.
    """

    chat_id: str
    seq: int
    agent: str | None
    model: str
    status: str
    io: str
    request_parts: list[str]
    response_part: str | None
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    missing: list[str]


class ReplayController(Controller):
    """A chat's model calls as sent and answered; chats compared."""

    path = "/api/chats"

    @get("/{chat_id:str}/calls/{seq:int}", responses=error_responses(401, 403, 404))
    async def call(
        self,
        request: Request[Principal, Any, Any],
        chat_id: str,
        seq: int,
        store: MongoEventStore,
        orchestrator: Orchestrator,
    ) -> ModelCall:
        """The `llm.call` at `seq` with the exact request the model got and the response it gave."""
        await owned_chat(store, request.user, chat_id)
        # A seq is a positive int64: anything else names no record (and must not reach BSON).
        record = await anext(store.read(chat_id, after=seq - 1, limit=1), None) if 1 <= seq < 2**63 else None
        hidden = record is not None and not record.visible and "auditor" not in request.user.roles
        if record is None or record.type != "llm.call" or hidden:
            raise NotFoundException(f"chat {chat_id} has no model call at seq {seq}")
        io = await read_call(orchestrator.parts, record.data)
        return ModelCall(
            chat_id=chat_id,
            seq=seq,
            agent=record.agent,
            model=str(record.data.get("model", "")),
            status=str(record.data.get("status", "ok")),
            io=io.io,
            request_parts=list(record.data.get("request") or []),
            response_part=record.data.get("response"),
            request=io.request,
            response=io.response,
            missing=io.missing,
        )

    @get("/{chat_a:str}/diff/{chat_b:str}", responses=error_responses(401, 403, 404))
    async def diff(
        self,
        request: Request[Principal, Any, Any],
        chat_a: str,
        chat_b: str,
        store: MongoEventStore,
        settings: Settings,
    ) -> ChatDiff:
        """Chats `chat_a` and `chat_b` aligned turn by turn (agent, text diff, tool calls and results,
        tokens, cost, latency) with a summary; `same` is false when any turn changed."""
        principal = request.user
        await owned_chat(store, principal, chat_a)
        await owned_chat(store, principal, chat_b)
        visible = None if "auditor" in principal.roles else True
        records_a = [r async for r in store.find(chat_a, visible=visible)]
        records_b = [r async for r in store.find(chat_b, visible=visible)]
        return diff_chats(chat_a, records_a, chat_b, records_b, PriceTable.load(settings.prices_path))
