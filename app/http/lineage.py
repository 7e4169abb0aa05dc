"""Lineage routes: `POST /api/chats/{chat_id}/fork` (see app/runs/lineage.py and domain/lineage.py)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, post

from app.http import codes
from app.http.auth import Principal
from app.http.controllers import owned_chat
from app.http.errors import Refused, error_responses
from app.http.views import View
from app.runs.lineage import fork_chat
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.events import ForkedFrom, StreamRef
from domain.lineage import ForkRefused
from domain.store import MongoEventStore


class ForkChat(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /api/chats/{id}/fork`: the seq of the message to fork at, and optionally another
    workflow to continue with."""

    at_seq: int
    workflow: str | None = None


class ChatForked(View, frozen=True, kw_only=True):
    """`POST /api/chats/{id}/fork`: the new chat, which waits for its next message."""

    chat_id: str
    workflow: str
    forked_from: ForkedFrom
    # Messages copied from the parent (the fork's records 2 .. 1 + copied).
    copied: int


class LineageController(Controller):
    """Forks: a new chat continuing another chat's conversation from one of its messages."""

    path = "/api/chats"

    @post("/{chat_id:str}/fork", responses=error_responses(400, 401, 403, 404, 409, 422))
    async def fork(
        self,
        request: Request[Principal, Any, Any],
        chat_id: str,
        data: ForkChat,
        store: MongoEventStore,
        workflows: WorkflowManager,
        settings: Settings,
    ) -> ChatForked:
        """Fork the chat at `at_seq` (a message of no running run): the fork's conversation and context
        variables are the parent's as of that seq; the parent is not written to. Only the chat's own
        user may fork it. 422 `bad_fork_point` past the end or not at a message, 409 `run_active` inside
        a running run."""
        first = await owned_chat(store, request.user, chat_id, control=True)
        parent = StreamRef(
            chat_id=chat_id, app_id=first.app_id, user_id=first.user_id, workflow=first.workflow
        )
        try:
            stream, created = await fork_chat(
                store, workflows, settings, parent, data.at_seq, workflow=data.workflow
            )
        except ForkRefused as exc:
            if exc.reason == "run_active":
                raise Refused(409, codes.RUN_ACTIVE, str(exc)) from exc
            raise Refused(422, codes.BAD_FORK_POINT, str(exc)) from exc
        assert created.forked_from is not None
        copied = await store.last_seq(stream.chat_id) - 1
        return ChatForked(
            chat_id=stream.chat_id, workflow=stream.workflow, forked_from=created.forked_from, copied=copied
        )
