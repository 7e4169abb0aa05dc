"""`GET /api/chats/{chat_id}/tree`: a chat with the chats that came from it, recursively.

Children are read from the chat's own `child.started` records; forks are the chats whose
`chat.created.forked_from` names it. Chats the caller may not read are left out.
"""

from __future__ import annotations

from typing import Any, Final

from litestar import Controller, Request, get

from app.http.auth import Principal
from app.http.controllers import owned_chat
from app.http.errors import error_responses
from app.http.views import View
from app.runs.children import children_of
from app.runs.supervisor import chat_state
from domain.events import TERMINAL_TYPES, Record
from domain.store import MongoEventStore

# How deep the tree is followed (a bound on work per request, never reached by real workflows).
MAX_DEPTH: Final = 16


class ChatTree(View, frozen=True, kw_only=True):
    """One chat of a tree: what it is, where it hangs, and the chats that came from it."""

    chat_id: str
    workflow: str
    # "root" (the chat asked about), "child" (started by a tool of its parent) or "fork".
    relation: str
    # The parent's seq this chat hangs from (its child.started, or the forked record); None at the root.
    parent_seq: int | None = None
    # "running", or the last run's end: "completed", "failed", "stopped", "waiting" (suspended on a
    # UI request); "idle" before any run.
    status: str
    children: list[ChatTree]
    forks: list[ChatTree]


async def _status(store: MongoEventStore, chat_id: str) -> str:
    state = await chat_state(store, chat_id)
    if state.active_run is not None:
        return "running"
    async for record in store.find(chat_id, types=sorted(TERMINAL_TYPES), newest_first=True):
        return "waiting" if record.type == "run.suspended" else record.type.removeprefix("run.")
    return "idle"


async def _forks_of(store: MongoEventStore, chat_id: str) -> list[tuple[str, int]]:
    query = {"type": "chat.created", "data.forked_from.chat_id": chat_id}
    cursor = store.events.find(query, {"chat_id": 1, "data.forked_from.seq": 1}, sort=[("ts", 1)])
    return [
        (str(doc["chat_id"]), int((doc.get("data") or {}).get("forked_from", {}).get("seq") or 0))
        async for doc in cursor
    ]


async def build_tree(
    store: MongoEventStore,
    principal: Principal,
    first: Record,
    relation: str = "root",
    parent_seq: int | None = None,
    depth: int = 0,
) -> ChatTree:
    """The tree under the chat whose first record is `first`."""
    branches: dict[str, list[ChatTree]] = {"child": [], "fork": []}
    if depth < MAX_DEPTH:
        links = [("child", c, s) for c, s in await children_of(store, first.chat_id)]
        links += [("fork", c, s) for c, s in await _forks_of(store, first.chat_id)]
        for kind, chat_id, seq in links:
            head = await anext(store.read(chat_id, limit=1), None)
            if head is None or not principal.can_read_chat(head.user_id, head.app_id):
                continue
            branches[kind].append(await build_tree(store, principal, head, kind, seq, depth + 1))
    return ChatTree(
        chat_id=first.chat_id,
        workflow=first.workflow,
        relation=relation,
        parent_seq=parent_seq,
        status=await _status(store, first.chat_id),
        children=branches["child"],
        forks=branches["fork"],
    )


class ChatTreeController(Controller):
    """A chat's lineage: its child workflows and forks."""

    path = "/api/chats"

    @get("/{chat_id:str}/tree", responses=error_responses(401, 403, 404))
    async def tree(
        self, request: Request[Principal, Any, Any], chat_id: str, store: MongoEventStore
    ) -> ChatTree:
        """The chat with its child workflows and forks, recursively (only chats the caller may read)."""
        first = await owned_chat(store, request.user, chat_id)
        return await build_tree(store, request.user, first)
