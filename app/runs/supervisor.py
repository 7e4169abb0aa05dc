"""Run supervisor: each chat's run is a background task owned by one node through a lease.

A run is independent of any socket: a disconnect never stops it; `stop` does, by recording
`run.stopped` in the log, which the running node (whichever it is) sees and obeys. The lease
document (`chat_leases`: owner, run id, expiry) is renewed while the run goes on; when a node
dies its leases expire, and any node then records the run as `run.failed` (reason `interrupted`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import structlog
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from app.observability import RUN_OUTCOMES
from app.runs.orchestrator import Orchestrator
from app.settings import Settings
from app.tasks import cancel_requested
from domain.errors import MozaiksError, UnknownChat
from domain.events import (
    TERMINAL_TYPES,
    InputReceived,
    MessageUser,
    Pending,
    RunFailed,
    RunStopped,
    StreamRef,
    new_id,
)
from domain.store import MongoEventStore

log = structlog.get_logger("mozaiks.supervisor")

LEASES = "chat_leases"
# Retry-After of a refused run: runs that take minutes free a slot every few seconds on a busy node.
BUSY_RETRY_AFTER_S = 5
_STATE_TYPES = ["chat.created", "run.started", *sorted(TERMINAL_TYPES), "input.requested", "input.received"]


class RunActive(MozaiksError):
    """The chat already has a run going; wait for it, answer its input request, or stop it."""

    def __init__(self, chat_id: str, run_id: str) -> None:
        self.chat_id = chat_id
        self.run_id = run_id
        super().__init__(f"chat {chat_id} has a run in progress ({run_id}); wait for it or stop it first")


class NodeBusy(MozaiksError):
    """This node already runs MOZAIKS_MAX_ACTIVE_RUNS runs: retry after `retry_after_s` (any replica will do)."""

    def __init__(self, active: int, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"this node runs {active} runs, its limit (MOZAIKS_MAX_ACTIVE_RUNS); retry in {retry_after_s} s")


class NoActiveRun(MozaiksError):
    """There is no run to stop."""

    def __init__(self, chat_id: str) -> None:
        super().__init__(f"chat {chat_id} has no run in progress")


class ChatState(msgspec.Struct, kw_only=True):
    """What the log says about a chat's control state."""

    stream: StreamRef
    last_seq: int
    active_run: str | None = None
    open_request: str | None = None


async def chat_state(store: MongoEventStore, chat_id: str) -> ChatState:
    """Read the chat's control state from its log (raises UnknownChat when it has no records)."""
    state: ChatState | None = None
    requests: dict[str, bool] = {}
    async for record in store.find(chat_id, types=_STATE_TYPES):
        if state is None:
            stream = StreamRef(
                chat_id=record.chat_id, app_id=record.app_id, user_id=record.user_id, workflow=record.workflow
            )
            state = ChatState(stream=stream, last_seq=record.seq)
        state.last_seq = record.seq
        match record.type:
            case "run.started":
                state.active_run = record.run_id
                requests.clear()
            case "run.completed" | "run.failed" | "run.stopped":
                if record.run_id in (state.active_run, None):
                    state.active_run = None
                    requests.clear()
            case "input.requested":
                requests[str(record.data.get("request_id"))] = True
            case "input.received":
                answered = record.data.get("request_id")
                requests.pop(str(answered) if answered else next(iter(requests), ""), None)
    if state is None:
        raise UnknownChat(chat_id)
    state.open_request = next(iter(requests), None) if state.active_run else None
    return state


class RunSupervisor:
    """Starts, stops and recovers runs; one per process."""

    def __init__(
        self, db: AsyncDatabase[Any], store: MongoEventStore, orchestrator: Orchestrator, settings: Settings
    ) -> None:
        self.store = store
        self.orchestrator = orchestrator
        self.settings = settings
        self.leases = db[LEASES]
        self.node = settings.node_id
        self.tasks: dict[str, asyncio.Task[str]] = {}
        self._admitting = 0

    def _expiry(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.settings.lease_ttl_s)

    async def _acquire(self, chat_id: str, run_id: str) -> bool:
        now = datetime.now(UTC)
        try:
            await self.leases.find_one_and_update(
                {"_id": chat_id, "expires_at": {"$lt": now}},
                {"$set": {"owner": self.node, "run_id": run_id, "expires_at": self._expiry()}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        return True

    async def _release(self, chat_id: str, run_id: str) -> None:
        with contextlib.suppress(PyMongoError):
            await self.leases.delete_one({"_id": chat_id, "owner": self.node, "run_id": run_id})

    def _check_capacity(self) -> None:
        active = len(self.tasks) + self._admitting
        if active >= self.settings.max_active_runs:
            raise NodeBusy(active, BUSY_RETRY_AFTER_S)

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold one of the node's run slots for the block (NodeBusy when none is free).

        Taken before anything is recorded, so a refused chat or turn leaves no trace in the log;
        call `start(..., admitted=True)` inside the block.
        """
        self._check_capacity()
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1

    async def start(self, stream: StreamRef, *, admitted: bool = False) -> str:
        """Start a run of the chat in the background on this node; returns its run id.

        Raises NodeBusy when the node runs MOZAIKS_MAX_ACTIVE_RUNS already (unless `admitted`
        inside `admission()`), RunActive when the chat has a run.
        """
        if not admitted:
            self._check_capacity()
        run_id = new_id()
        if not await self._acquire(stream.chat_id, run_id):
            lease = await self.leases.find_one({"_id": stream.chat_id}) or {}
            raise RunActive(stream.chat_id, str(lease.get("run_id")))
        task = asyncio.create_task(self._run(stream, run_id), name=f"run:{stream.chat_id}")
        self.tasks[stream.chat_id] = task
        return run_id

    async def _run(self, stream: StreamRef, run_id: str) -> str:
        renew = asyncio.create_task(self._renew(stream.chat_id, run_id))
        outcome = "run.failed"
        try:
            with structlog.contextvars.bound_contextvars(chat_id=stream.chat_id, run_id=run_id):
                outcome = await self.orchestrator.run(stream, run_id=run_id)
        except asyncio.CancelledError:
            outcome = "run.failed"
            raise
        except Exception as exc:  # a bug outside AG2's own handling: record it rather than lose it
            log.exception("run.crashed", chat_id=stream.chat_id)
            await self.store.append(
                stream, [Pending(event=RunFailed(error=f"{type(exc).__name__}: {exc}"), run_id=run_id)], None
            )
        finally:
            renew.cancel()
            self.tasks.pop(stream.chat_id, None)
            RUN_OUTCOMES.labels(outcome).inc()
            await asyncio.shield(self._release(stream.chat_id, run_id))
        return outcome

    async def _renew(self, chat_id: str, run_id: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_ttl_s / 3)
            with contextlib.suppress(PyMongoError):
                await self.leases.update_one(
                    {"_id": chat_id, "owner": self.node, "run_id": run_id},
                    {"$set": {"expires_at": self._expiry()}},
                )

    async def send_message(self, chat_id: str, text: str, *, request_id: str | None = None) -> str:
        """A user's words to a chat: the answer to its open input request, or a new turn that starts a run.

        Returns the type recorded (`input.received` or `message.user`); raises RunActive when a run
        is going and is not waiting for input.
        """
        state = await chat_state(self.store, chat_id)
        if state.active_run is not None:
            if state.open_request is None and request_id is None:
                raise RunActive(chat_id, state.active_run)
            answer = InputReceived(request_id=request_id or state.open_request, text=text)
            await self.store.append(state.stream, [Pending(event=answer, run_id=state.active_run)], None)
            return "input.received"
        lease = await self.leases.find_one({"_id": chat_id})
        if lease is not None and lease["expires_at"] > datetime.now(UTC):
            raise RunActive(chat_id, str(lease.get("run_id")))
        with self.admission():
            await self.store.append(state.stream, [Pending(event=MessageUser(content=text))], None)
            await self.start(state.stream, admitted=True)
        return "message.user"

    async def stop(self, chat_id: str, by: str | None) -> str:
        """Record `run.stopped` for the chat's active run; the node running it cancels AG2 when it sees it."""
        state = await chat_state(self.store, chat_id)
        if state.active_run is None:
            raise NoActiveRun(chat_id)
        await self.store.append(state.stream, [Pending(event=RunStopped(by=by), run_id=state.active_run)], None)
        return state.active_run

    async def recover_expired(self) -> int:
        """Record runs whose lease expired (their node died) as `run.failed` (interrupted); returns how many."""
        recovered = 0
        now = datetime.now(UTC)
        async for lease in self.leases.find({"expires_at": {"$lt": now}}):
            # Take the expired lease over atomically, so only one node records the interruption.
            taken = await self.leases.find_one_and_update(
                {"_id": lease["_id"], "expires_at": lease["expires_at"], "owner": lease["owner"]},
                {"$set": {"owner": self.node, "expires_at": self._expiry()}},
            )
            if taken is None:
                continue
            try:
                state = await chat_state(self.store, lease["_id"])
                if state.active_run is not None:
                    failed = RunFailed(error=f"node {lease['owner']} stopped while running", reason="interrupted")
                    await self.store.append(state.stream, [Pending(event=failed, run_id=state.active_run)], None)
                    recovered += 1
            except UnknownChat:
                pass
            finally:
                await self.leases.delete_one({"_id": lease["_id"], "owner": self.node})
        return recovered

    async def watch_leases(self) -> None:
        """Recover expired leases now and then, for as long as the process runs."""
        while True:
            try:
                count = await self.recover_expired()
                if count:
                    log.warning("runs.interrupted", count=count)
            except PyMongoError as exc:
                # The driver may turn a cancellation into its own error: a pending cancel still wins.
                if cancel_requested():
                    raise asyncio.CancelledError from exc
                log.warning("leases.check_failed", error=str(exc))
            if cancel_requested():  # a cancellation the driver absorbed still ends the loop
                raise asyncio.CancelledError
            await asyncio.sleep(max(self.settings.lease_ttl_s / 2, 0.2))

    async def shutdown(self) -> None:
        """Cancel this node's runs, recording each as interrupted, and release their leases."""
        tasks = dict(self.tasks)
        for task in tasks.values():
            task.cancel()
        for chat_id, task in tasks.items():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            with contextlib.suppress(Exception):
                state = await chat_state(self.store, chat_id)
                if state.active_run is not None:
                    failed = RunFailed(error="the node shut down during the run", reason="interrupted")
                    await self.store.append(state.stream, [Pending(event=failed, run_id=state.active_run)], None)
