"""The Orchestrator: creates chats and runs workflows on AG2, recording every event in the log first.

Control goes through the log, so it works from any node: while a run is going, it follows the
chat's log for `input.received` (answers AG2's pending input request) and for a `run.stopped` of
its run appended by someone else (cancels the AG2 run). In the server it follows through the
process's hub (one change stream for every run); alone (the CLI) through `store.subscribe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import structlog
from pymongo.errors import PyMongoError

import tools
from app.runs.budgets import BudgetBook, count_stop
from app.runs.children import ChildDesk, ChildLauncher, ChildNote
from app.runs.clients import (
    Backend,
    LlmCallNote,
    ModelRetryPolicy,
    ModelUnavailable,
    OpenAIBackend,
    ScriptedBackend,
    TextChunk,
)
from app.runs.files import ChatFiles
from app.runs.hooks import Cause, Causes, ContextChange, HookNote, HookRunner, expression_of
from app.runs.pool import model_calls
from app.runs.structured import OutputRejected, StructuredLedger, StructuredReply
from app.runs.ui import UiDesk, UiNote, exchange_messages, fold_exchanges
from app.runs.workflows import Workflow, WorkflowManager
from app.settings import Settings
from domain.budgets import Exceeded
from domain.cancellation import raise_if_cancelling
from domain.errors import Conflict, MozaiksError, StorageUnavailable, UnknownChat
from domain.events import (
    ChatCreated,
    Handoff,
    InputReceived,
    LlmCall,
    MessageUser,
    OutputInvalid,
    ParentRef,
    Pending,
    Record,
    RunCompleted,
    RunFailed,
    RunStarted,
    RunStopped,
    RunSuspended,
    StreamRef,
    UiRequested,
    new_id,
)
from domain.hooks import HookFailed
from domain.lineage import apply_context
from domain.model_io import PartStore
from domain.store import MongoEventStore

if TYPE_CHECKING:
    from app.runs.recorder import RunMapper

log = structlog.get_logger("mozaiks.orchestration")

# AG2 (and the modules built on it: agents, recorder) is imported where a run needs it, never at
# import time: it takes seconds, which `mozaiks serve`'s start and every other command do without.
_ag2_loaded = threading.Event()


def load_ag2() -> None:
    """Import AG2 and the run modules built on it (seconds the first time; call it off the event loop)."""
    import app.runs.agents
    import app.runs.recorder  # noqa: F401

    _ag2_loaded.set()


_MAX_BATCH: Final = 256
# Frames from here are the workflows' tools: an error raised there fails a run with reason "tool".
_TOOLS_DIR: Final = str(Path(tools.__file__).resolve().parent) + os.sep
_REPORTS_KEPT: Final = 100

# A chat's records after a seq, stored then live (the hub's `records`, or `store.subscribe`).
Follow = Callable[[str, int], AsyncIterator[Record]]


class RunReport(msgspec.Struct, kw_only=True):
    """What one run did, counted at the source (for the CLI summary, tests and the benchmark)."""

    run_id: str
    chat_id: str
    workflow: str
    offline: bool
    outcome: str | None = None
    ag2_events: int = 0
    # uuid of every AG2 event seen, in the order it was seen.
    ag2_uuids: list[str] = []
    runtime_events: int = 0
    # `message.delta` records of the run (streamed text, coalesced over the flush window).
    deltas: int = 0
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The scripted client's own totals (offline runs): calls, prompt and completion tokens.
    scripted: tuple[int, int, int] | None = None


class RunNotRecorded(MozaiksError):
    """The database refused a run's records past the retry budget; `pendings` end with its terminal.

    The run itself is over. Whoever holds its lease keeps re-sending `pendings` (idempotent by id)
    until they land, so nothing AG2 produced is lost and the run still gets its one terminal record.
    """

    def __init__(self, pendings: list[Pending], cause: BaseException) -> None:
        self.pendings = pendings
        self.cause = cause
        super().__init__(f"run records not stored: {cause}")


def failure_reason(error: BaseException) -> str:
    """`run.failed.reason` for an error that ended a run: storage, model, output, tool, else error.

    Looks through the exception's causes (AG2 and the executor wrap what a model client raised).
    """
    seen: BaseException | None = error
    for _ in range(32):  # a cause chain can loop
        if seen is None:
            break
        if isinstance(seen, StorageUnavailable | PyMongoError):
            return "storage"
        if isinstance(seen, ModelUnavailable):
            return "model"
        if isinstance(seen, HookFailed):
            return "hook"
        if isinstance(seen, OutputRejected):
            return "output"
        tb = seen.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(_TOOLS_DIR):
                return "tool"
            tb = tb.tb_next
        seen = seen.__cause__ or seen.__context__
    return "error"


class _Done(msgspec.Struct):
    """End of AG2's event stream: `error` is None when the run completed."""

    error: BaseException | None = None


class Orchestrator:
    """Creates chats and runs workflows; the API the run supervisor, REST layer and CLI call."""

    def __init__(
        self,
        store: MongoEventStore,
        workflows: WorkflowManager,
        settings: Settings,
        *,
        follow: Follow | None = None,
    ) -> None:
        self.store = store
        self.workflows = workflows
        self.settings = settings
        self.follow: Follow = follow or store.subscribe
        self.reports: OrderedDict[str, RunReport] = OrderedDict()
        self.sessions: dict[str, _RunSession] = {}
        self._openai: OpenAIBackend | None = None
        # Budgets (app/runs/budgets.py): the node's limits and the spend it knows.
        self.budgets = BudgetBook(store.db, settings)
        # Starts and stops child workflows (set by the run supervisor; None: child tools answer an error).
        self.children: ChildLauncher | None = None
        # Model I/O parts (MOZAIKS_RECORD_MODEL_IO=full), stored before the llm.call that names them.
        self.parts = PartStore(store.db, store.retry)

    def request_stop(self, run_id: str, by: str | None) -> bool:
        """Stop a run going on in this process; False when it is not running here.

        The run cancels AG2, records the events AG2 had produced, then `run.stopped` as its last record.
        """
        session = self.sessions.get(run_id)
        if session is None:
            return False
        session.stop_by = by
        session.stop.set()
        return True

    @property
    def last_report(self) -> RunReport | None:
        """The report of the most recently finished run of this orchestrator."""
        return next(reversed(self.reports.values()), None)

    async def create_chat(
        self,
        *,
        workflow: str,
        user_id: str,
        app_id: str,
        message: str | None,
        context: dict[str, Any] | None = None,
        chat_id: str | None = None,
        message_id: str | None = None,
        parent: ParentRef | None = None,
    ) -> StreamRef:
        """Start a chat's log: `chat.created` (context = workflow defaults + `context`), the workflow's
        `initial_message` (a hidden `message.user`, data.origin "initial_message"), then `message`.

        Appends at expected_seq 0, so a taken `chat_id` raises Conflict; an unknown workflow raises
        UnknownWorkflow. Does not run anything: call `run` (or let the supervisor do it).
        """
        loaded = self.workflows.get(workflow)
        stream = StreamRef(chat_id=chat_id or new_id(), app_id=app_id, user_id=user_id, workflow=loaded.name)
        events = [
            Pending(
                event=ChatCreated(
                    context={**loaded.context, **(context or {})},
                    offline=self.settings.offline,
                    parent=parent,
                )
            )
        ]
        initial = loaded.manifest.initial_message
        if initial is not None:
            events.append(
                Pending(event=MessageUser(content=initial, origin="initial_message"), visible=False)
            )
        if message is not None:
            events.append(Pending(event=MessageUser(content=message, message_id=message_id)))
        await self.store.append(stream, events, expected_seq=0)
        log.info("chat.created", chat_id=stream.chat_id, workflow=loaded.name, offline=self.settings.offline)
        return stream

    async def run(self, stream: StreamRef, *, run_id: str | None = None) -> str:
        """Run the workflow once over the chat's history; return the terminal event type.

        Appends `run.started`, one record per AG2 event and per LLM call (plus `context.updated`
        when tools change the context), then exactly one of `run.completed` / `run.failed` /
        `run.suspended` (a UI tool waits on the user) — or,
        when someone appends `run.stopped` for this run (or with no run id), cancels AG2 and returns
        "run.stopped" without appending another terminal event. Raises UnknownChat for an empty log.
        """
        run_id = run_id or new_id()
        workflow = self.workflows.get(stream.workflow)
        for attempt in range(5):
            history = [record async for record in self.store.read(stream.chat_id)]
            if not history:
                raise UnknownChat(stream.chat_id)
            started = Pending(
                event=RunStarted(
                    pattern=workflow.pattern,
                    max_turns=workflow.max_turns,
                    offline=self.settings.offline,
                    model=None if self.settings.offline else self.settings.openai_model,
                    node=self.settings.node_id,
                ),
                run_id=run_id,
            )
            try:
                [record] = await self.store.append(stream, [started], expected_seq=history[-1].seq)
                break
            except Conflict:
                if attempt == 4:
                    raise
                continue  # a user message landed in between: read again so the run sees it
        report = RunReport(
            run_id=run_id, chat_id=stream.chat_id, workflow=workflow.name, offline=self.settings.offline
        )
        session = _RunSession(self, stream, workflow, history, record, report)
        self.sessions[run_id] = session
        try:
            outcome = await session.drive()
        finally:
            self.sessions.pop(run_id, None)
            self.reports[run_id] = report
            while len(self.reports) > _REPORTS_KEPT:
                self.reports.popitem(last=False)
        report.outcome = outcome
        log.info(
            "run.finished",
            chat_id=stream.chat_id,
            run_id=run_id,
            outcome=outcome,
            offline=report.offline,
            ag2_events=report.ag2_events,
            llm_calls=report.llm_calls,
        )
        return outcome

    def chooser(self, history: list[Record]) -> Callable[[list[str]], str] | None:
        """Who makes a run's random speaker choices: AG2 (None); a replay plays the original's."""
        return None

    def backend(self, workflow: Workflow, history: list[Record]) -> Backend:
        """The model backend of a run: scripted fixtures offline, else the shared OpenAI client."""
        if self.settings.offline:
            # Continue each agent's script where this chat's earlier runs left it.
            start: dict[str, int] = {}
            for record in history:
                if record.type == "llm.call" and record.agent:
                    start[record.agent] = start.get(record.agent, 0) + 1
            return ScriptedBackend(workflow.fixtures, start, chunk_s=self.settings.offline_chunk_ms / 1000)
        if self._openai is None:
            self._openai = OpenAIBackend(
                api_key=self.settings.openai_api_key,
                base_url=self.settings.openai_base_url,
                timeout_s=self.settings.llm_timeout_s,
                max_calls=self.settings.max_concurrent_llm_calls,
            )
        return self._openai


class Relay:
    """Carries a run's streamed text and runtime notes from AG2's worker threads into its event stream, in order.

    Text waits for the flush window, which starts at the first chunk not yet handed over: the
    loop is woken once per window, not once per chunk (each wake-up from a worker thread is a
    syscall that gives the GIL away; per chunk, that made reading a fast stream 10x slower). A note
    (an LLM call, a context update) is handed over at once, with all text before it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, window_s: float) -> None:
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self.window_s = window_s
        self.lock = threading.Lock()
        self.items: list[Any] = []
        self.timer = False
        self.iostream: Any = None

    def send(self, item: Any, *, wait: bool) -> None:
        """Queue `item`; `wait`: it may wait for the flush window (text), else it goes at once."""
        from autogen.io.base import IOStream

        iostream = IOStream.get_default()  # the run's stream, as AG2 set it for this call
        with self.lock:
            self.items.append(item)
            self.iostream = iostream
            later = wait and not self.timer
            self.timer = self.timer or later
        if not wait:
            self.call(self.drain)
        elif later:
            self.call(lambda: self.loop.call_later(self.window_s, self.drain))

    def call(self, callback: Any) -> None:
        if threading.get_ident() == self.loop_thread:
            callback()
        else:
            self.loop.call_soon_threadsafe(callback)

    def drain(self) -> None:
        """Hand everything queued to the run's event stream (consecutive text of a message joined)."""
        with self.lock:
            items, self.items, self.timer, iostream = self.items, [], False, self.iostream
        for item in merged(items):
            iostream.send(item)


def merged(items: list[Any]) -> list[Any]:
    """Consecutive text chunks of one message joined into one (their text in order); other items kept."""
    out: list[Any] = []
    for item in items:
        last = out[-1] if out else None
        if isinstance(item, TextChunk) and isinstance(last, TextChunk) and last.message_id == item.message_id:
            out[-1] = TextChunk(agent=item.agent, message_id=item.message_id, text=last.text + item.text)
        else:
            out.append(item)
    return out


def hashes_only(pending: Pending) -> Pending:
    """An `llm.call` whose parts could not be stored, recorded as keeping only its hashes."""
    event = pending.event
    if isinstance(event, LlmCall) and event.io == "full":
        return msgspec.structs.replace(pending, event=msgspec.structs.replace(event, io="hashes"))
    return pending


def conversation(history: list[Record], user_name: str | None) -> str | list[dict[str, Any]]:
    """The chat so far as AG2 messages: user text, agents' messages, answers to input requests, and
    each UI tool call with its result (the user's answer), in place.

    User messages carry the workflow's user agent name when it has one; AG2 rejects any other
    name that is not a group agent, so without a user agent they go unnamed.
    """
    messages: list[dict[str, Any]] = []
    user = {"name": user_name} if user_name else {}
    answered = {
        exchange.result.id: exchange
        for exchange in fold_exchanges(history).values()
        if exchange.result is not None and exchange.called is not None and exchange.called.agent
    }
    for record in history:
        if record.id in answered:
            messages.extend(exchange_messages(answered[record.id]))
            continue
        match record.type:
            case "message.user":
                messages.append({"role": "user", **user, "content": record.data["content"]})
            case "input.received":
                messages.append({"role": "user", **user, "content": record.data["text"]})
            case "message.agent" if record.agent:
                messages.append(
                    {"role": "assistant", "name": record.agent, "content": record.data["content"]}
                )
    if len(messages) == 1:
        return str(messages[0]["content"])
    return messages


def initial_context(workflow: Workflow, history: list[Record]) -> dict[str, Any]:
    """Context variables at the start of a run: defaults, the chat's own, then every recorded update."""
    return apply_context(dict(workflow.context), history)


class _RunSession:
    """One run in progress: the AG2 response, the event pump, the log watcher and the recorder loop."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        stream: StreamRef,
        workflow: Workflow,
        history: list[Record],
        started: Record,
        report: RunReport,
    ) -> None:
        self.o = orchestrator
        self.stream = stream
        self.workflow = workflow
        self.history = history
        self.started = started
        self.report = report
        self.run_id = report.run_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stop = asyncio.Event()
        self.open_requests: OrderedDict[str, asyncio.Future[str]] = OrderedDict()
        self.unclaimed: deque[InputReceived] = deque()
        self.summary: str | None = None
        self.relay: Relay | None = None
        # Who asked this process to stop the run; `stop_logged` when a run.stopped is already in the log;
        # `ended_by_other`: the terminal type another node recorded for this run (it gave the run up).
        self.stop_by: str | None = None
        self.stop_logged = False
        self.ended_by_other: str | None = None
        # Hooks (app/runs/hooks.py): a hook that failed ends the run run.failed (reason hook).
        self.hook_failure: HookFailed | None = None
        # Budgets: the limit reached before a model call ends the run run.stopped (reason budget).
        self.budget_stop: Exceeded | None = None
        self.causes = Causes(self.run_id)
        self.hooks: HookRunner | None = None
        # Model I/O parts of the llm.call records not appended yet (hash -> canonical JSON).
        self.parts: dict[str, bytes] = {}
        # UI requests the run waits on: it ends `run.suspended` (the answer continues the chat).
        self.suspended: list[UiRequested] = []

    def suspend(self, request: UiRequested) -> None:
        """A UI tool waits on the user: end the run `run.suspended` (AG2 cancelled, like a stop)."""

        def now() -> None:
            self.suspended.append(request)
            self.stop.set()

        assert self.relay is not None
        self.relay.call(now)  # after the request's own note: the recorder drains it first

    def suspended_run(self) -> Pending:
        deadlines = [r.expires_at for r in self.suspended if r.expires_at is not None]
        ids = [r.request_id for r in self.suspended]
        return self.terminal(RunSuspended(request_ids=ids, expires_at=min(deadlines, default=None)))

    def budget_reached(self, exceeded: Exceeded) -> None:
        """A limit was reached before a model call: stop the run (reason budget)."""
        if self.budget_stop is None:
            self.budget_stop = exceeded
            count_stop(exceeded)
            log.info(
                "run.budget_reached", chat_id=self.stream.chat_id, run_id=self.run_id, limit=exceeded.limit
            )
        self.stop.set()

    def stopped_by_budget(self) -> Pending:
        exceeded = self.budget_stop
        assert exceeded is not None
        return self.terminal(RunStopped(reason="budget", budget=exceeded.data()))

    def hook_failed(self, failure: HookFailed) -> None:
        """A hook raised or timed out: stop AG2 and end the run failed (reason hook)."""
        if self.hook_failure is None:
            self.hook_failure = failure
        self.stop.set()

    async def store_parts(self, pendings: list[Pending]) -> list[Pending]:
        """Store the model I/O parts of the calls in `pendings` (one insert of the new ones).

        Past the retry budget their calls are recorded as `io: "hashes"` (what was sent is still
        proven; the content is not claimed), and the records go on to their own retries.
        """
        if not self.parts:
            return pendings
        parts, self.parts = self.parts, {}
        try:
            await self.o.parts.put(parts)
        except StorageUnavailable as exc:
            log.warning("model_io.not_stored", chat_id=self.stream.chat_id, parts=len(parts), error=str(exc))
            return [hashes_only(pending) for pending in pendings]
        return pendings

    async def append(self, pendings: list[Pending]) -> None:
        """Record a burst of the run's events; past the retry budget the run ends as failed (storage)."""
        pendings = await self.with_causes(pendings)
        if not pendings:
            return
        pendings = await self.store_parts(pendings)
        try:
            records = await self.o.store.append(self.stream, pendings, expected_seq=None)
        except StorageUnavailable as exc:
            failed = self.terminal(RunFailed(error=str(exc), reason="storage"))
            raise RunNotRecorded([*pendings, failed], exc) from exc
        self.causes.appended(records)

    async def with_causes(self, pendings: list[Pending]) -> list[Pending]:
        """Append the records that `context.updated`s of this burst name as causes, so their seqs are known."""
        while (cut := self.causes.unresolved(pendings)) is not None:
            await self.append(pendings[:cut])
            pendings = pendings[cut:]
        return self.causes.fill(pendings)

    async def finish(self, pendings: list[Pending]) -> str:
        """Record the run's last burst ending with its terminal event; returns the terminal type.

        If the run already has a terminal record (another node gave it up for interrupted), that one
        stands and is returned. Past the retry budget, the lease holder keeps trying (RunNotRecorded).
        """
        pendings = await self.with_causes([*pendings[:-1], *self.causes.release(), pendings[-1]])
        pendings = await self.store_parts(pendings)
        try:
            record = await self.o.store.finish_run(self.stream, self.run_id, pendings)
        except StorageUnavailable as exc:
            raise RunNotRecorded(pendings, exc) from exc
        if record.id != pendings[-1].id:
            log.warning(
                "run.already_ended",
                chat_id=self.stream.chat_id,
                run_id=self.run_id,
                ended=record.type,
                not_recorded=len(pendings),
            )
        return record.type

    async def drive(self) -> str:
        if not _ag2_loaded.is_set():
            await asyncio.to_thread(load_ag2)  # on a thread: the loop serves everyone else meanwhile
        from autogen.agentchat import a_run_group_chat
        from autogen.agentchat.group import ContextVariables

        from app.runs.agents import build_team
        from app.runs.recorder import RunMapper

        group_agents = {a.name for a in self.workflow.agents if a.type != "user"}
        relay = self.relay = Relay(asyncio.get_running_loop(), self.o.settings.stream_flush_ms / 1000)

        def emit(note: Any) -> None:
            # The runtime's own notes join the run's AG2 stream at once, after any text before them.
            relay.send(note, wait=False)

        def stream_text(chunk: TextChunk) -> None:
            # Only the group's agents speak messages; a speaker selector's text is not one.
            if chunk.agent in group_agents:
                relay.send(chunk, wait=True)

        backend = self.o.backend(self.workflow, self.history)
        settings = self.o.settings
        policy = ModelRetryPolicy(
            attempts=settings.llm_attempts,
            first_delay_s=settings.llm_backoff_s,
            max_delay_s=settings.llm_backoff_max_s,
        )
        budget = await self.o.budgets.open(self.stream, self.workflow.manifest.budget, self.history)

        def report(note: LlmCallNote) -> None:
            if budget is not None:
                budget.spent(note)  # counted before the call returns, so the next check sees it
            emit(note)

        ledger = StructuredLedger(
            backend,
            self.workflow.outputs,
            report=report,
            text=stream_text,
            policy=policy,
            record_io=settings.record_model_io,
        )
        if budget is not None:
            budget.on_reached = self.budget_reached
            ledger.gate = budget.check
        context = ContextVariables(data=initial_context(self.workflow, self.history))
        hooks = self.hooks = HookRunner(
            stream=self.stream,
            run_id=self.run_id,
            hooks=self.workflow.hooks,
            derived=self.workflow.derived,
            context=context,
            timeout_s=settings.hook_timeout_s,
            on_failure=self.hook_failed,
        )
        user_agent = next((a.name for a in self.workflow.agents if a.type == "user"), None)
        mapper = RunMapper(
            run_id=self.run_id,
            group_agents=group_agents,
            visual_agents=self.workflow.visual_agents,
            user_agent=user_agent or "_User",
        )
        desk = UiDesk(emit, self.suspend)
        watcher = asyncio.create_task(self.watch(), name=f"watch-{self.run_id}")
        pump: asyncio.Task[None] | None = None
        response: Any = None
        try:
            try:
                team = build_team(
                    self.workflow,
                    client_cls=ledger.client_class(),
                    context=context,
                    default_model=self.o.settings.openai_model,
                    emit=emit,
                    files=ChatFiles(self.o.store, self.stream.chat_id),
                    guard_tool=lambda name, function: hooks.guard_tool(name, function, emit),
                    children=self.child_tools(emit),
                    choose=self.o.chooser(self.history),
                    ui=desk,
                )
                hooks.wrap_agents(team.agents, emit)
                if not await self.before_chat(hooks):
                    return await self.finish([self.failed_by_hook()])
                with model_calls():  # AG2's run task inherits the mark: its executor work is model calls
                    response = await a_run_group_chat(
                        team.pattern,
                        conversation(self.history, user_agent),
                        max_rounds=self.workflow.max_turns,
                    )
            except Exception as exc:
                log.exception("run.setup_failed", chat_id=self.stream.chat_id, run_id=self.run_id)
                return await self.finish(
                    [self.terminal(RunFailed(error=f"{type(exc).__name__}: {exc}", reason="setup"))]
                )
            pump = asyncio.create_task(self.pump(response), name=f"pump-{self.run_id}")
            return await self.record(mapper, response, backend)
        finally:
            ledger.closed.set()
            for task in (pump, watcher, getattr(response, "_task_ref", None)):
                if task is not None and not task.done():
                    task.cancel()
            for task in (pump, watcher):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def before_chat(self, hooks: HookRunner) -> bool:
        """user_text derivations of the messages since the last run, then before_chat hooks; False: a hook failed."""
        notes: list[Any] = []
        since = max(
            (r.seq for r in self.history if r.type == "run.started" and r.run_id != self.run_id), default=0
        )
        for record in self.history:
            if record.seq > since and record.type == "message.user":
                notes += hooks.derive("user_text", record.data.get("content"), Cause(seq=record.seq))
        last = next((r.data.get("content") for r in reversed(self.history) if r.type == "message.user"), None)
        try:
            await hooks.fire("before_chat", notes.append, message=last)
        except HookFailed:
            return False
        finally:
            await self.append(self.causes.arrange(self.hook_pendings(notes)))
        return True

    def hook_pendings(self, notes: list[Any]) -> list[Any]:
        """Hook notes as Pendings of this run (context changes stay for `Causes.arrange`)."""
        out: list[Any] = []
        for note in notes:
            if isinstance(note, HookNote):
                self.report.runtime_events += 1
                out.append(Pending(event=note.call, agent=note.agent, run_id=self.run_id, visible=False))
            else:
                self.report.runtime_events += 1
                out.append(note)
        return out

    def failed_by_hook(self) -> Pending:
        failure = self.hook_failure
        assert failure is not None
        return self.terminal(RunFailed(error=str(failure), reason="hook"))

    def child_tools(self, emit: Callable[[Any], None]) -> Callable[[Any], Callable[..., Any]] | None:
        """Binds the workflow's child-workflow tools to this run (None outside a supervisor)."""
        launcher = self.o.children
        if launcher is None:
            return None
        desk = ChildDesk(
            store=self.o.store,
            launcher=launcher,
            create_chat=self.o.create_chat,
            follow=self.o.follow,
            parent=self.stream,
            after=self.started.seq,
            emit=emit,
            stopping=self.stop,
        )
        return desk.tool

    def terminal(self, event: RunCompleted | RunFailed | RunStopped | RunSuspended) -> Pending:
        self.report.runtime_events += 1
        return Pending(event=event, run_id=self.run_id)

    async def pump(self, response: Any) -> None:
        """Move AG2's events, in order, to the recorder's queue; end with _Done."""
        try:
            async for event in response.events:
                self.queue.put_nowait(event)
            self.queue.put_nowait(_Done())
        except Exception as exc:  # noqa: BLE001 - whatever AG2 raised ends the run as run.failed
            self.queue.put_nowait(_Done(exc))

    async def record(self, mapper: RunMapper, response: Any, backend: Backend) -> str:
        """The recorder loop: append each burst of events as one batch, answer input, finish the run.

        Streamed text arrives once per flush window (see `Relay`) and is appended as one
        `message.delta` per message; any other event flushes the text before it first, so a
        message's deltas always precede its `message.agent`.
        """
        stopping = asyncio.create_task(self.stop.wait())
        getting: asyncio.Task[Any] | None = None
        try:
            while True:
                if self.hook_failure is not None or self.budget_stop is not None:  # stop AG2 now
                    return await self.stopped(mapper, response)
                getting = asyncio.create_task(self.queue.get())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    return await self.stopped(mapper, response)
                batch = [getting.result()]
                while len(batch) < _MAX_BATCH and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                pendings, request, done = self.map_batch(mapper, batch)
                # Text reaches the recorder once per flush window (the relay held it): record it now.
                pendings.extend(self.deltas(mapper.flush()))
                if done is not None:
                    if done.error is None and self.hook_failure is None and self.hooks is not None:
                        notes: list[Any] = []
                        with contextlib.suppress(HookFailed):
                            await self.hooks.fire("after_chat", notes.append, message=self.summary)
                        pendings += self.causes.arrange(self.hook_pendings(notes))
                    return await self.finish([*pendings, self.outcome(done, backend, mapper)])
                await self.append(pendings)
                if request is not None:
                    answer = await self.answer(request)
                    if answer is None:
                        return await self.stopped(mapper, response)
                    await request.content.respond(answer)
        finally:
            stopping.cancel()
            if getting is not None:
                getting.cancel()  # this task cancelled mid-wait: no get left pending behind it

    def deltas(self, pendings: list[Pending]) -> list[Pending]:
        """Counts `message.delta` Pendings (runtime records of their own) in the report."""
        self.report.deltas += len(pendings)
        self.report.runtime_events += len(pendings)
        return pendings

    def map_batch(self, mapper: RunMapper, batch: list[Any]) -> tuple[list[Pending], Any, _Done | None]:
        from app.runs.agents import ContextNote  # loaded with AG2 when the run began

        pendings: list[Any] = []  # Pendings, and context changes placed by `Causes.arrange`
        request: Any = None
        done: _Done | None = None
        for item in batch:
            if isinstance(item, TextChunk):
                pendings.extend(self.deltas(mapper.map_chunk(item)))
                continue
            # Whatever else happens is recorded after the text streamed before it.
            pendings.extend(self.deltas(mapper.flush()))
            if isinstance(item, _Done):
                done = item
            elif isinstance(item, ContextNote):
                for name, new in item.variables.items():
                    pendings.append(ContextChange(name, item.old.get(name), new, Cause("tool.called")))
                    self.report.runtime_events += 1
            elif isinstance(item, HookNote | ContextChange):
                pendings.extend(self.hook_pendings([item]))
            elif isinstance(item, UiNote):
                pendings.append(mapper.map_ui(item))
                self.report.runtime_events += 1
            elif isinstance(item, StructuredReply):
                mapper.structured[item.agent] = item.value
            elif isinstance(item, ChildNote):
                pendings.append(mapper.pending(item.event, None, None))
                self.report.runtime_events += 1
            elif isinstance(item, OutputInvalid):
                pendings.append(mapper.pending(item, item.agent, None))
                self.report.runtime_events += 1
            elif isinstance(item, LlmCallNote):
                if item.parts is not None:
                    self.parts.update(item.parts.bodies)
                pendings.append(mapper.map_note(item))
                self.report.runtime_events += 1
                self.report.llm_calls += 1
                self.report.prompt_tokens += item.call.prompt_tokens
                self.report.completion_tokens += item.call.completion_tokens
            else:
                # Anything else on AG2's stream is an AG2 event (wrapped: `.type` + `.content`).
                mapped = mapper.map_event(item)
                pendings.extend(mapped)
                pending = mapped[-1]
                self.report.runtime_events += len(mapped) - 1
                self.report.ag2_events += 1
                self.report.ag2_uuids.append(str(getattr(getattr(item, "content", item), "uuid", "")))
                if pending.event.__struct_config__.tag == "input.requested":
                    request = item
                    # Registered before the append, so an answer can never arrive unclaimed.
                    self.open_requests[str(item.content.uuid)] = asyncio.get_running_loop().create_future()
                elif getattr(item, "type", None) == "run_completion":
                    self.summary = item.content.summary
                elif isinstance(pending.event, Handoff) and pending.event.kind == "context_condition":
                    expression = expression_of(
                        self.workflow.agents, pending.event.source, pending.event.target
                    )
                    pendings[-1] = msgspec.structs.replace(
                        pending, event=msgspec.structs.replace(pending.event, expression=expression)
                    )
        return self.causes.arrange(pendings), request, done

    def outcome(self, done: _Done, backend: Backend, mapper: RunMapper) -> Pending:
        if isinstance(backend, ScriptedBackend):
            self.report.scripted = (backend.calls, backend.prompt_tokens, backend.completion_tokens)
        if self.hook_failure is not None:
            return self.failed_by_hook()
        if self.budget_stop is not None:
            return self.stopped_by_budget()
        if done.error is None:
            # Not AG2's summary (the last message, maybe a hidden agent's): the last one users saw.
            return self.terminal(RunCompleted(summary=mapper.summary))
        error = done.error
        log.warning("run.failed", chat_id=self.stream.chat_id, run_id=self.run_id, error=str(error))
        return self.terminal(
            # Visible to users: a hidden agent whose model call failed is not named there (auditors
            # read its failed `llm.call` records).
            RunFailed(error=mapper.unnamed(f"{type(error).__name__}: {error}"), reason=failure_reason(error))
        )

    async def answer(self, request: Any) -> str | None:
        """Wait for the `input.received` answering `request` (None when the run is stopped first)."""
        request_id = str(request.content.uuid)
        future = self.open_requests[request_id]
        while self.unclaimed and not future.done():
            future.set_result(self.unclaimed.popleft().text)
        stopping = asyncio.create_task(self.stop.wait())
        try:
            waiters: list[asyncio.Future[Any]] = [future, stopping]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            self.open_requests.pop(request_id, None)
        return future.result() if future.done() else None

    async def watch(self) -> None:
        """Follow the chat's log for answers to input requests and for this run's stop.

        A database outage ends a change stream: follow again from the last record seen.
        """
        after = self.started.seq
        while True:
            try:
                async for record in self.o.follow(self.stream.chat_id, after):
                    after = record.seq
                    if self.observe(record):
                        return
            except PyMongoError as exc:
                raise_if_cancelling(exc)
                log.warning("run.watch_interrupted", chat_id=self.stream.chat_id, error=str(exc))
                await asyncio.sleep(0.5)

    def observe(self, record: Record) -> bool:
        """Act on one record of the chat's log; True when the run is to stop."""
        if record.type == "input.received":
            received = record.event
            assert isinstance(received, InputReceived)
            future = self.open_requests.get(received.request_id or "")
            if future is None and received.request_id is None and self.open_requests:
                future = next(iter(self.open_requests.values()))
            if self.hooks is not None:  # user text may feed derived variables; the answer is their cause
                for change in self.hooks.derive("user_text", received.text, Cause(seq=record.seq)):
                    self.queue.put_nowait(change)
            if future is not None and not future.done():
                future.set_result(received.text)
            elif received.request_id is None:
                self.unclaimed.append(received)
        elif record.type == "run.stopped" and record.run_id in (self.run_id, None):
            self.stop_logged = True  # recorded by someone else (an older node, a tool): obey it
            self.stop.set()
            return True
        elif record.type in ("run.completed", "run.failed") and record.run_id == self.run_id:
            # Another node gave this run up (its lease had expired): record nothing more after it.
            self.ended_by_other = record.type
            self.stop.set()
            return True
        return False

    async def stopped(self, mapper: RunMapper, response: Any) -> str:
        """Cancel AG2, record the events it had already produced, then `run.stopped` as the run's last record."""
        task = getattr(response, "_task_ref", None)  # a_run_group_chat's task: the only handle to cancel AG2
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.relay is not None:
            self.relay.drain()  # text still waiting for its window is what the model said: keep it
        leftovers: list[Any] = []
        while not self.queue.empty():
            leftovers.append(self.queue.get_nowait())
        source = response.iostream.input_stream
        while not source.empty():
            leftovers.append(source.get_nowait())
        pendings, _, _ = self.map_batch(mapper, leftovers)
        pendings += self.deltas(mapper.flush())
        if self.ended_by_other is not None:
            log.warning(
                "run.ended_elsewhere",
                chat_id=self.stream.chat_id,
                run_id=self.run_id,
                ended=self.ended_by_other,
                not_recorded=len(pendings),
            )
            return self.ended_by_other
        if self.hook_failure is not None and not self.stop_logged:
            return await self.finish([*pendings, self.failed_by_hook()])
        if self.budget_stop is not None and not self.stop_logged:
            return await self.finish([*pendings, self.stopped_by_budget()])
        if self.suspended and not self.stop_logged:
            log.info("run.suspended", chat_id=self.stream.chat_id, run_id=self.run_id)
            return await self.finish([*pendings, self.suspended_run()])
        log.info("run.stopped", chat_id=self.stream.chat_id, run_id=self.run_id)
        if self.stop_logged:
            await self.append(pendings)
            return "run.stopped"
        return await self.finish([*pendings, self.terminal(RunStopped(by=self.stop_by))])
