"""`GET /api/chats/{a}/diff/{b}`: two chats compared turn by turn (a replay against its original, say).

The caller must be able to read both chats (the chats' events access rules); a user compares the
visible records of their own chats, an auditor every record of chats of their app.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get

from app.http.auth import Principal
from app.http.controllers import owned_chat
from app.http.errors import error_responses
from app.settings import Settings
from domain.store import MongoEventStore
from projections.diff import ChatDiff, diff_chats
from projections.prices import PriceTable


class ReplayController(Controller):
    """Comparing chats."""

    path = "/api/chats"

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
