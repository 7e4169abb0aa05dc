"""Run supervisor: each chat's run is a background task owned by one node through a lease.

A run is independent of any socket: a disconnect never stops it; `stop` does: the node running
it (told directly, or through a `stop` mark on the lease that it polls) cancels AG2, records what
AG2 had produced, then `run.stopped` as the run's last record. The lease document (`chat_leases`:
owner, run id, expiry) is renewed while the run goes on, and until its end is recorded: a node that
cannot record a run's end keeps the lease and keeps trying. Every `run.started` gets exactly one
terminal record: when a node dies its leases expire, and a sweep on every node records any run
with neither a live lease nor a terminal record as `run.failed` (reason `interrupted`).

A run that waits on the user (a UI form, choice or confirm) ends `run.suspended`: it holds no task,
lease or AG2 object while the chat waits. The answer (or the timeout, recorded by `expire_due`)
is recorded with the tool call's result, and a new run continues the chat, on any node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import structlog
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from app.observability import RUN_OUTCOMES
from app.runs.children import ChildLauncher, close_children
from app.runs.orchestrator import Orchestrator, RunNotRecorded, failure_reason
from app.runs.ui import (
    UiRequestClosed,
    UnknownUiRequest,
    expiry,
    read_ledger,
    record_outcome,
    results_missing,
)
from app.settings import Settings
from domain.cancellation import raise_if_cancelling
from domain.commit import DURABLE
from domain.errors import Conflict, MozaiksError, StorageUnavailable, UnknownChat
from domain.events import (
    TERMINAL_TYPES,
    InputReceived,
    MessageUser,
    Pending,
    Record,
    RunFailed,
    RunStopped,
    StreamRef,
    UiExpired,
    UiResponded,
    new_id,
)
from domain.files import FileStore, Swept
from domain.store import MongoEventStore, with_retries

log = structlog.get_logger("mozaiks.supervisor")

LEASES = "chat_leases"
SESSIONS = "chat_sessions"  # the projection's collection: where the sweep looks for runs to check
# How often a node looks for stop marks on the leases of the runs it holds.
STOP_POLL_S = 0.2
# How long `stop` waits for the running node to record the run's end before answering anyway.
STOP_WAIT_S = 10.0
# The sweep looks at chats the projection shows as running (a full read of chat_sessions) only on
# every Nth round; a message to a wedged chat repairs it at once anyway (send_message).
SESSIONS_SWEEP_EVERY = 10
# How often a node looks for UI requests past their timeout (`expire_due`: one indexed query).
UI_EXPIRY_EVERY_S = 1.0
# How often a node sweeps what killed uploads left behind in GridFS (domain.files.FileStore.sweep):
# at start-up, then this often (leftovers are removed once ABANDONED_AFTER old anyway).
UPLOADS_SWEEP_S = 600.0
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
        super().__init__(
            f"this node runs {active} runs, its limit (MOZAIKS_MAX_ACTIVE_RUNS); retry in {retry_after_s} s"
        )


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
            case "run.completed" | "run.failed" | "run.stopped" | "run.suspended":
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
        # Durable: a lease (and a stop marked on it) a crash forgot would let a second node run the chat.
        self.leases = db.get_collection(LEASES, write_concern=DURABLE)
        self.node = settings.node_id
        self.tasks: dict[str, asyncio.Task[str]] = {}
        self._admitting = 0
        self._sweeps = 0
        # Called with (chat_id, run_id) once a run of this node is over (its terminal record stored, if
        # it could be), or a lost run is recorded interrupted here: the live trace export
        # (app.telemetry). Must not block.
        self.on_run_end: Callable[[str, str], None] | None = None
        orchestrator.children = ChildLauncher(start=self.start, stop=self._stop_child)

    def _expiry(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.settings.lease_ttl_s)

    async def _acquire(self, chat_id: str, run_id: str, ended: str | None = None) -> bool:
        """Take the chat's lease if it is free, expired, or held for the run `ended` (already over)."""
        now = datetime.now(UTC)
        free: dict[str, Any] = {"expires_at": {"$lt": now}}
        if ended is not None:
            free = {"$or": [free, {"run_id": ended}]}
        try:
            await self.leases.find_one_and_update(
                {"_id": chat_id, **free},
                {
                    "$set": {"owner": self.node, "run_id": run_id, "expires_at": self._expiry()},
                    "$unset": {"stop": ""},
                },
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        return True

    async def _release(self, chat_id: str, run_id: str) -> None:
        async def delete() -> None:
            await self.leases.delete_one({"_id": chat_id, "owner": self.node, "run_id": run_id})

        # Left behind, the lease only delays the chat's next run until it expires or is seen as over.
        with contextlib.suppress(PyMongoError, StorageUnavailable):
            await with_retries(self.store.retry, f"release the lease of chat {chat_id}", delete)

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

    async def start(self, stream: StreamRef, ended: str | None = None, *, admitted: bool = False) -> str:
        """Start a run of the chat in the background on this node; returns its run id.

        `ended`: the run id of a lease known to be over (its terminal record is in the log).
        Raises NodeBusy when the node runs MOZAIKS_MAX_ACTIVE_RUNS already (unless `admitted`
        inside `admission()`), RunActive when the chat has a run.
        """
        if not admitted:
            self._check_capacity()
        run_id = new_id()
        if not await self._acquire(stream.chat_id, run_id, ended):
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
                try:
                    outcome = await self.orchestrator.run(stream, run_id=run_id)
                except RunNotRecorded as exc:
                    log.warning("run.end_not_recorded", error=str(exc.cause))
                    outcome = await self._settle(stream, run_id, exc.pendings)
                except Exception as exc:  # a bug outside AG2's own handling: record it rather than lose it
                    log.exception("run.crashed", chat_id=stream.chat_id)
                    failed = RunFailed(error=f"{type(exc).__name__}: {exc}", reason=failure_reason(exc))
                    outcome = await self._settle(stream, run_id, [Pending(event=failed, run_id=run_id)])
        finally:
            renew.cancel()
            self.tasks.pop(stream.chat_id, None)
            RUN_OUTCOMES.labels(outcome).inc()
            await asyncio.shield(self._release(stream.chat_id, run_id))
            if self.on_run_end is not None:
                self.on_run_end(stream.chat_id, run_id)
        if outcome == "run.suspended":  # an answer that came while the run was suspending continues it
            with contextlib.suppress(PyMongoError, StorageUnavailable):  # else the sweep does
                await self.continue_answered(stream)
        return outcome

    async def _settle(self, stream: StreamRef, run_id: str, pendings: list[Pending]) -> str:
        """Record the run's end (`pendings` end with its terminal event), trying until it is stored.

        Runs while the lease is still renewed, so no other node gives the run up meanwhile. Returns
        the type of the run's terminal record ("run.failed" if the run never got to `run.started`).
        """
        delay = self.store.retry.first_delay_s
        while True:
            try:
                started = [
                    r
                    async for r in self.store.find(stream.chat_id, types=["run.started"])
                    if r.run_id == run_id
                ]
                if not started:
                    return "run.failed"
                return (await self.store.finish_run(stream, run_id, pendings)).type
            except (PyMongoError, StorageUnavailable) as exc:
                raise_if_cancelling(exc)
                log.warning(
                    "run.end_not_recorded",
                    chat_id=stream.chat_id,
                    run_id=run_id,
                    error=str(exc),
                    retry_in_s=delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(self.settings.lease_ttl_s / 3, 0.1))

    async def _renew(self, chat_id: str, run_id: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_ttl_s / 3)
            try:
                await self.leases.update_one(
                    {"_id": chat_id, "owner": self.node, "run_id": run_id},
                    {"$set": {"expires_at": self._expiry()}},
                )
            except PyMongoError as exc:  # the next renewal tries again
                raise_if_cancelling(exc)

    async def _lease_of_live_run(self, chat_id: str) -> tuple[dict[str, Any] | None, str | None]:
        """The chat's lease if it is live and its run is not over (a run starting counts as live).

        Second: the run id of a lease that is still there but whose run has ended (free to take).
        """
        lease = await self.leases.find_one({"_id": chat_id})
        if lease is None or lease["expires_at"] <= datetime.now(UTC):
            return None, None
        run_id = str(lease.get("run_id"))
        if await self._ended(chat_id, run_id):
            return None, run_id
        return dict(lease), None

    async def _ended(self, chat_id: str, run_id: str) -> bool:
        async for record in self.store.find(chat_id, types=sorted(TERMINAL_TYPES)):
            if record.run_id == run_id:
                return True
        return False

    async def _interrupt(self, stream: StreamRef, run_id: str, why: str) -> bool:
        """Record `run.failed` (interrupted) for a run nobody runs; False if it already had an end."""
        failed = Pending(event=RunFailed(error=why, reason="interrupted"), run_id=run_id)
        children = await close_children(self.store, stream, run_id, self._end_child)
        record = await self.store.finish_run(stream, run_id, [*children, failed])
        if record.id == failed.id and self.on_run_end is not None:
            self.on_run_end(stream.chat_id, run_id)  # the node that ended it exports its trace
        return record.id == failed.id

    async def send_message(self, chat_id: str, text: str, *, request_id: str | None = None) -> str:
        """A user's words to a chat: the answer to its open input request, or a new turn that starts a run.

        Returns the type recorded (`input.received` or `message.user`); raises RunActive when a live
        run is going and is not waiting for input. A run the log calls active but that has no live
        lease (its node died) is recorded as interrupted first, so a chat never stays wedged.
        """
        return (await self.post_message(chat_id, text, request_id=request_id)).type

    async def post_message(
        self, chat_id: str, text: str, *, request_id: str | None = None, message_id: str | None = None
    ) -> Record:
        """`send_message`, returning the record it appended (`message_id`: the client's id for a new turn)."""
        state = await chat_state(self.store, chat_id)
        lease, ended = await self._lease_of_live_run(chat_id)
        if state.active_run is not None:
            if lease is not None:
                if state.open_request is None and request_id is None:
                    raise RunActive(chat_id, state.active_run)
                answer = InputReceived(request_id=request_id or state.open_request, text=text)
                [record] = await self.store.append(
                    state.stream, [Pending(event=answer, run_id=state.active_run)], None
                )
                return record
            await self._interrupt(state.stream, state.active_run, "the run's node stopped holding its lease")
        elif lease is not None:
            raise RunActive(chat_id, str(lease.get("run_id")))
        with self.admission():
            turn = MessageUser(content=text, message_id=message_id)
            [record] = await self.store.append(state.stream, [Pending(event=turn)], None)
            await self.start(state.stream, ended=ended, admitted=True)
        return record

    async def answer_ui(self, chat_id: str, request_id: str, answer: Any, user_id: str | None) -> Record:
        """Record a user's answer to a UI request (validated first); returns the `ui.responded` record.

        The run that asked ended `run.suspended` (or its node is gone): the tool's result is recorded
        with the answer and a new run continues the chat from the log, on this node. Raises
        UnknownUiRequest, UiRequestClosed, InvalidAnswer (nothing recorded), NodeBusy.
        """
        outcome = UiResponded(request_id=request_id, answer=answer, user_id=user_id)
        return (await self.close_ui(chat_id, outcome))[0]

    async def close_ui(self, chat_id: str, outcome: UiResponded | UiExpired) -> list[Record]:
        """Record the answer or expiry of a UI request with its tool result, and continue the chat.

        A run still going (suspending on the request, or a dead node's lease not yet expired)
        continues the chat once it ends: its supervisor (or the sweep) calls `continue_answered`.
        """
        state = await chat_state(self.store, chat_id)
        lease, ended = await self._lease_of_live_run(chat_id)
        if state.active_run is not None and lease is None:
            await self._interrupt(state.stream, state.active_run, "the run's node stopped holding its lease")
        tools = self.orchestrator.workflows.get(state.stream.workflow).tools
        with self.admission():
            records = await record_outcome(self.store, state.stream, outcome.request_id, outcome, tools=tools)
            with contextlib.suppress(RunActive):
                await self.start(state.stream, ended=ended, admitted=True)
        return records

    async def continue_answered(self, stream: StreamRef) -> bool:
        """Start the chat's next run when UI requests were answered (or expired) since its last run
        started and no run is going: after a run suspended or was recorded interrupted. Answers that a
        run of an older version took in its tool get their results first. False when there were none.
        """
        ledger = await read_ledger(self.store, stream.chat_id)
        last_start = 0
        async for record in self.store.find(stream.chat_id, types=["run.started"], newest_first=True):
            last_start = record.seq
            break
        tools = self.orchestrator.workflows.get(stream.workflow).tools
        pendings = results_missing(ledger, tools)
        closed = [e for e in ledger.exchanges.values() if e.outcome is not None]
        if not pendings and not any(e.result is not None and e.result.seq > last_start for e in closed):
            return False
        with contextlib.suppress(Conflict, RunActive, NodeBusy):  # the next sweep tries again
            if pendings:
                await self.store.append(stream, pendings, expected_seq=ledger.last_seq)
            await self.start(stream)
        return True

    async def expire_due(self) -> int:
        """Record `ui.expired` for every open UI request past its `expires_at` (any node's, or a dead one's).

        The chats to look at come from the `chat_sessions` projection's `ui_expires_at` (indexed:
        the earliest deadline of the UI requests since a chat's last run started), so a sweep reads
        only chats with a deadline passed, never all requests ever made. `expires_at` texts (ISO
        8601, UTC, ms) sort by time. Each expiry continues its chat ("no answer"). Returns how many
        it recorded.
        """
        now = str(expiry(0))
        due = self.store.db[SESSIONS].find({"ui_expires_at": {"$ne": None, "$lte": now}}, {"_id": 1})
        chats = [str(doc["_id"]) async for doc in due]
        expired = 0
        for chat_id in chats:
            ledger = await read_ledger(self.store, chat_id)
            for request_id, exchange in ledger.exchanges.items():
                deadline = exchange.request.expires_at
                if exchange.outcome is not None or deadline is None or deadline > now:
                    continue
                with contextlib.suppress(UiRequestClosed, UnknownUiRequest, UnknownChat, NodeBusy):
                    await self.close_ui(chat_id, UiExpired(request_id=request_id))
                    expired += 1
        return expired

    async def stop(self, chat_id: str, by: str | None, *, wait: bool = True) -> str:
        """Stop the chat's active run: the node running it records `run.stopped` as the run's last record.

        Returns the run id once the run's end is in the log (or after STOP_WAIT_S if its node is slow
        to get there), or, with `wait=False`, as soon as the run is asked to stop. A run with no live
        lease is recorded as stopped here and now.
        """
        state = await chat_state(self.store, chat_id)
        if state.active_run is None:
            raise NoActiveRun(chat_id)
        run_id = state.active_run
        if self.orchestrator.request_stop(run_id, by):
            task = self.tasks.get(chat_id)
            if task is not None and wait:
                await asyncio.wait({task}, timeout=STOP_WAIT_S)  # waits for the run to end; never cancels it
            return run_id
        asked = await self.leases.update_one(
            {"_id": chat_id, "run_id": run_id, "expires_at": {"$gt": datetime.now(UTC)}},
            {"$set": {"stop": {"by": by}}},
        )
        if asked.matched_count == 0:
            children = await close_children(self.store, state.stream, run_id, self._end_child)
            await self.store.finish_run(
                state.stream, run_id, [*children, Pending(event=RunStopped(by=by), run_id=run_id)]
            )
            return run_id
        if not wait:
            return run_id
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_WAIT_S):
                while not await self._ended(chat_id, run_id):  # the running node polls its leases' marks
                    await asyncio.sleep(STOP_POLL_S / 2)
        return run_id

    async def _stop_child(self, chat_id: str, by: str) -> None:
        await self.stop(chat_id, by, wait=False)

    async def _end_child(self, chat_id: str) -> str | None:
        """End a child whose parent's run ends without it (stopped if its run is live, else interrupted);
        returns its terminal type (None: it never ran)."""
        try:
            state = await chat_state(self.store, chat_id)
        except UnknownChat:
            return None
        if state.active_run is not None:
            if (await self._lease_of_live_run(chat_id))[0] is not None:
                with contextlib.suppress(MozaiksError):
                    await self.stop(chat_id, "parent", wait=False)
                return "run.stopped"
            await self._interrupt(state.stream, state.active_run, "its parent's run ended with its node")
        async for record in self.store.find(chat_id, types=sorted(TERMINAL_TYPES), newest_first=True):
            return record.type
        return None

    async def obey_stops(self) -> None:
        """Pass stop marks found on the leases of this node's runs to the runs."""
        if not self.tasks:
            return
        async for lease in self.leases.find(
            {"_id": {"$in": list(self.tasks)}, "owner": self.node, "stop": {"$exists": True}}
        ):
            self.orchestrator.request_stop(str(lease["run_id"]), (lease.get("stop") or {}).get("by"))

    async def recover_expired(self, sessions: bool = True) -> int:
        """The sweep: record runs with neither a live lease nor a terminal record as interrupted.

        Expired leases (their node died) are taken over atomically, so one node records each; runs
        the `chat_sessions` projection shows as going but that hold no lease are checked as well
        (a node that lost its lease without recording the run's end). Returns how many it recorded.
        """
        recovered = 0
        interrupted: list[StreamRef] = []
        now = datetime.now(UTC)
        async for lease in self.leases.find({"expires_at": {"$lt": now}}):
            # Take the expired lease over atomically, so only one node records the interruption.
            taken = await self.leases.find_one_and_update(
                {"_id": lease["_id"], "expires_at": lease["expires_at"], "owner": lease["owner"]},
                {"$set": {"owner": self.node, "expires_at": self._expiry()}},
            )
            if taken is None:
                continue
            with contextlib.suppress(UnknownChat):
                state = await chat_state(self.store, lease["_id"])
                if state.active_run is not None:
                    why = f"node {lease['owner']} stopped while running"
                    if await self._interrupt(state.stream, state.active_run, why):
                        recovered += 1
                        interrupted.append(state.stream)
            # Only once the run's end is recorded: a failure above leaves the lease to expire and be retried.
            await self.leases.delete_one({"_id": lease["_id"], "owner": self.node})
        for stream in interrupted:
            await self.continue_answered(stream)
        if not sessions:
            return recovered
        going = self.store.db[SESSIONS].find({"status": {"$in": ["running", "waiting_input"]}}, {"_id": 1})
        async for session in going:
            chat_id = str(session["_id"])
            if chat_id in self.tasks or await self.leases.find_one({"_id": chat_id}) is not None:
                continue
            with contextlib.suppress(UnknownChat):
                state = await chat_state(self.store, chat_id)
                if state.active_run is not None and (await self._lease_of_live_run(chat_id))[0] is None:
                    recovered += await self._interrupt(
                        state.stream, state.active_run, "the run lost its lease"
                    )
        return recovered

    async def sweep_uploads(self) -> Swept:
        """Remove the leftovers of uploads a killed node never finished (see domain/files.py)."""
        swept = await FileStore(self.store.db).sweep(self.store.events)
        if swept.partial or swept.unnamed:
            log.info("uploads.swept", partial=swept.partial, unnamed=swept.unnamed)
        return swept

    async def watch_leases(self) -> None:
        """For as long as the process runs: obey stop marks, and sweep for interrupted runs now and then
        (and for abandoned uploads at start-up, then every UPLOADS_SWEEP_S)."""
        sweep_every = max(self.settings.lease_ttl_s / 2, 0.2)
        next_sweep = next_expiry = next_uploads = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.obey_stops()
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + sweep_every
                    count = await self.recover_expired(sessions=self._sweeps % SESSIONS_SWEEP_EVERY == 0)
                    self._sweeps += 1
                    if count:
                        log.warning("runs.interrupted", count=count)
                if loop.time() >= next_expiry:  # one indexed query: UI timeouts land within a second
                    next_expiry = loop.time() + UI_EXPIRY_EVERY_S
                    expired = await self.expire_due()
                    if expired:
                        log.info("ui.expired", count=expired)
                if loop.time() >= next_uploads:
                    next_uploads = loop.time() + UPLOADS_SWEEP_S
                    await self.sweep_uploads()
            except (PyMongoError, StorageUnavailable) as exc:
                raise_if_cancelling(exc)
                log.warning("leases.check_failed", error=str(exc))
            raise_if_cancelling()
            await asyncio.sleep(min(STOP_POLL_S, sweep_every))

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
                    await self._interrupt(state.stream, state.active_run, "the node shut down during the run")
