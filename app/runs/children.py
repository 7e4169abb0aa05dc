"""Child workflows: a tools.json entry with `workflow` lets an agent run another workflow as a tool.

The parent's log gets `child.started` (through the run's own stream, so it follows the
`tool.called` it answers), then the child chat is created with `chat.created.parent` = that
record's chat and seq and the parent's app and user, and its run is started under its own lease
(any node may carry it on). The tool then waits on the child's log through the hub, as a human
input waits: no model slot is held. The child's terminal record becomes the parent's
`child.completed`, and its last visible agent message the tool's result; a child that failed or
was stopped gives the agent an error. A parent stopped stops its running children; a parent
interrupted (its node died) gets `child.completed` for its open children from the sweep, which ends
them too (`close_children`), so neither chat is left waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import msgspec
import structlog

from app.runs.workflows import Tool
from domain.errors import MozaiksError
from domain.events import (
    TERMINAL_TYPES,
    ChildCompleted,
    ChildStarted,
    ParentRef,
    Pending,
    Record,
    StreamRef,
    new_id,
)
from domain.store import MongoEventStore

log = structlog.get_logger("mozaiks.children")

# How a child's end reads to the parent's agent when it is not a completion.
_ENDS = {"run.failed": "failed", "run.stopped": "was stopped", "run.suspended": "was waiting on its user"}


class ChildNote(msgspec.Struct, frozen=True):
    """A child record for the parent's run stream (becomes `child.started` / `child.completed`)."""

    event: ChildStarted | ChildCompleted


class ChildFailed(MozaiksError):
    """The child workflow did not complete: AG2 hands the message to the agent as the tool's error."""


class ChildLauncher(msgspec.Struct, frozen=True, kw_only=True):
    """How runs start and stop child chats (the run supervisor's own `start` and `stop`)."""

    start: Callable[[StreamRef], Awaitable[Any]]
    stop: Callable[[str, str], Awaitable[Any]]


CreateChat = Callable[..., Awaitable[StreamRef]]
Follow = Callable[[str, int], AsyncIterator[Record]]


def failure_text(workflow: str, end: Record) -> str:
    """What the agent reads when a child did not complete: how it ended and why."""
    how = _ENDS.get(end.type, end.type)
    if end.type == "run.stopped":
        by = end.data.get("by")
        return f"child workflow {workflow} {how}" + (f" by {by}" if by else "")
    reason, error = end.data.get("reason"), end.data.get("error")
    return f"child workflow {workflow} {how}" + (f" ({reason}: {error})" if error else "")


async def last_agent_message(store: MongoEventStore, chat_id: str) -> str:
    """The chat's last visible agent message (the child's result)."""
    text = ""
    async for record in store.find(chat_id, types=["message.agent"], visible=True):
        text = str(record.data.get("content", ""))
    return text


class ChildDesk:
    """One run's child-workflow tools: start a child, wait for its end in the log, answer the agent."""

    def __init__(
        self,
        *,
        store: MongoEventStore,
        launcher: ChildLauncher,
        create_chat: CreateChat,
        follow: Follow,
        parent: StreamRef,
        after: int,
        emit: Callable[[Any], None],
        stopping: asyncio.Event,
    ) -> None:
        self.store = store
        self.launcher = launcher
        self.create_chat = create_chat
        self.follow = follow
        self.parent = parent
        self.after = after
        self.emit = emit
        self.stopping = stopping
        self.stops: set[asyncio.Task[Any]] = set()

    def tool(self, tool: Tool) -> Callable[..., Awaitable[str]]:
        """The function AG2 calls for `tool` (one argument, `message`)."""
        workflow = str(tool.spec.workflow)

        async def call(message: str) -> str:
            return await self.run_child(tool.spec.name, workflow, message)

        # Real objects, not strings: AG2 reads the hints to build the tool's schema for the model.
        call.__annotations__ = {
            "message": Annotated[str, f"The task for the {workflow} workflow"],
            "return": str,
        }
        call.__name__ = tool.spec.name
        call.__doc__ = tool.description
        return call

    async def run_child(self, tool: str, workflow: str, message: str) -> str:
        child_id = new_id()
        self.emit(ChildNote(ChildStarted(child_chat_id=child_id, workflow=workflow, tool=tool)))
        try:
            end = await self._start_and_wait(child_id, workflow, message)
        except asyncio.CancelledError:
            if self.stopping.is_set():  # the parent is stopped: so is its child (if it got to start)
                error = f"child workflow {workflow} was stopped with its parent"
                self.emit(
                    ChildNote(ChildCompleted(child_chat_id=child_id, outcome="run.stopped", error=error))
                )
                task = asyncio.get_running_loop().create_task(self._stop(child_id))
                self.stops.add(task)
                task.add_done_callback(self.stops.discard)
            raise
        result = await last_agent_message(self.store, child_id)
        if end.type == "run.completed":
            self.emit(ChildNote(ChildCompleted(child_chat_id=child_id, outcome=end.type, result=result)))
            return result
        error = failure_text(workflow, end)
        self.emit(
            ChildNote(ChildCompleted(child_chat_id=child_id, outcome=end.type, result=result, error=error))
        )
        raise ChildFailed(error)

    async def _start_and_wait(self, child_id: str, workflow: str, message: str) -> Record:
        """Create the child chat (anchored at its `child.started`), start its run, return its terminal record."""
        try:
            seq = await self._seq_of_started(child_id)
            stream = await self.create_chat(
                workflow=workflow,
                user_id=self.parent.user_id,
                app_id=self.parent.app_id,
                message=message,
                chat_id=child_id,
                parent=ParentRef(chat_id=self.parent.chat_id, seq=seq),
            )
            await self.launcher.start(stream)
        except MozaiksError as exc:  # the node is busy, the workflow is gone ...: the agent hears why
            error = f"child workflow {workflow} did not start: {exc}"
            self.emit(ChildNote(ChildCompleted(child_chat_id=child_id, outcome="run.failed", error=error)))
            raise ChildFailed(error) from exc
        return await self._end_of(child_id)

    async def _stop(self, child_id: str) -> None:
        with contextlib.suppress(MozaiksError):
            await self.launcher.stop(child_id, "parent")

    async def _seq_of_started(self, child_id: str) -> int:
        async for record in self.follow(self.parent.chat_id, self.after):
            if record.type == "child.started" and record.data.get("child_chat_id") == child_id:
                return record.seq
        raise ChildFailed(f"the parent chat's log ended before child.started of {child_id}")

    async def _end_of(self, child_id: str) -> Record:
        async for record in self.follow(child_id, 0):
            # A child's run suspended on a UI request goes on when it is answered: wait for its end.
            if record.type in TERMINAL_TYPES and record.type != "run.suspended":
                return record
        raise ChildFailed(f"the log of child chat {child_id} ended before its run did")


async def open_children(store: MongoEventStore, chat_id: str, run_id: str) -> dict[str, str]:
    """Children a run started that have no `child.completed` yet: child chat id -> workflow."""
    started: dict[str, str] = {}
    async for record in store.find(chat_id, types=["child.started", "child.completed"]):
        child = str(record.data.get("child_chat_id"))
        if record.type == "child.started" and record.run_id == run_id:
            started[child] = str(record.data.get("workflow"))
        else:
            started.pop(child, None)
    return started


async def close_children(
    store: MongoEventStore,
    parent: StreamRef,
    run_id: str,
    end_child: Callable[[str], Awaitable[str | None]],
) -> list[Pending]:
    """`child.completed` for a run that ends without its tools having read them: each open child is
    ended first. `end_child` ends the child's run if one is going (stopped when its node is alive,
    else recorded interrupted) and returns its terminal type (None: it never started a run).
    """
    pendings: list[Pending] = []
    for child_id, workflow in (await open_children(store, parent.chat_id, run_id)).items():
        outcome = await end_child(child_id)
        error: str | None = None
        if outcome != "run.completed":
            how = _ENDS.get(outcome or "", "never ran")
            error = f"child workflow {workflow} {how}: the parent's run ended first"
        result = await last_agent_message(store, child_id)
        completed = ChildCompleted(
            child_chat_id=child_id, outcome=outcome or "run.failed", result=result, error=error
        )
        pendings.append(Pending(event=completed, run_id=run_id))
    return pendings


async def children_of(store: MongoEventStore, chat_id: str) -> list[tuple[str, int]]:
    """The child chats a chat started, with the seq of each `child.started`, in log order."""
    return [
        (str(record.data.get("child_chat_id")), record.seq)
        async for record in store.find(chat_id, types=["child.started"])
    ]


async def descendants(store: MongoEventStore, chat_id: str, *, limit: int = 10_000) -> list[str]:
    """The chat and every chat it started, their children, and so on (breadth first, each once)."""
    found = [chat_id]
    seen = {chat_id}
    for current in found:
        if len(found) >= limit:
            break
        for child_id, _ in await children_of(store, current):
            if child_id not in seen:
                seen.add(child_id)
                found.append(child_id)
    return found
