"""Forking a chat: a new chat that continues another chat's conversation from one of its messages.

The parent's log is read, never written: the fork's own log starts with `chat.created`
(`forked_from`: the parent's chat id, seq and hash there; `context`: the parent's context variables
as of that seq), then copies of the parent's messages up to the seq (`data.origin: "fork"`). A
run of the fork sees them as its history, like any continued chat's; the next message continues
from there.
"""

from __future__ import annotations

import structlog

from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.events import ChatCreated, Pending, StreamRef, new_id
from domain.lineage import anchor_of, apply_context, copied_messages, fork_point
from domain.store import MongoEventStore

log = structlog.get_logger("mozaiks.lineage")


async def fork_chat(
    store: MongoEventStore,
    workflows: WorkflowManager,
    settings: Settings,
    parent: StreamRef,
    at_seq: int,
    *,
    workflow: str | None = None,
) -> tuple[StreamRef, ChatCreated]:
    """Create the fork of `parent` at `at_seq` (on `workflow`, default the parent's); returns it and its
    `chat.created`. Raises ForkRefused (past the end, not a message, inside a running run),
    UnknownWorkflow. The fork belongs to the parent's user and app.
    """
    records = [record async for record in store.read(parent.chat_id)]
    point = fork_point(parent.chat_id, records, at_seq)
    loaded = workflows.get(workflow or parent.workflow)
    history = records[:at_seq]
    created = ChatCreated(
        context=apply_context(dict(loaded.context), history),
        offline=settings.offline,
        forked_from=anchor_of(point),
    )
    stream = StreamRef(chat_id=new_id(), app_id=parent.app_id, user_id=parent.user_id, workflow=loaded.name)
    await store.append(stream, [Pending(event=created), *copied_messages(history)], expected_seq=0)
    log.info(
        "chat.forked", chat_id=stream.chat_id, parent=parent.chat_id, at_seq=at_seq, workflow=loaded.name
    )
    return stream, created
