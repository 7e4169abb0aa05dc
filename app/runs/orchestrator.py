"""The Orchestrator: creates chats and runs workflows on AG2, recording every event in the log first.

Control goes through the log, so it works from any node: while a run is going, it follows the
chat's log for `input.received` (answers AG2's pending input request) and for a `run.stopped` of
its run appended by someone else (cancels the AG2 run). In the server it follows through the
process's hub (one change stream for every run); alone (the CLI) through `store.subscribe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import msgspec
import structlog
from autogen.agentchat import a_run_group_chat
from autogen.agentchat.group import ContextVariables
from autogen.io.base import IOStream

from app.runs.agents import ContextNote, Team, build_team
from app.runs.clients import Backend, Ledger, LlmCallNote, OpenAIBackend, ScriptedBackend
from app.runs.pool import model_calls
from app.runs.recorder import RunMapper
from app.runs.workflows import Workflow, WorkflowManager
from app.settings import Settings
from domain.errors import Conflict, UnknownChat
from domain.events import (
    ChatCreated,
    InputReceived,
    MessageUser,
    Pending,
    Record,
    RunCompleted,
    RunFailed,
    RunStarted,
    StreamRef,
    new_id,
)
from domain.store import MongoEventStore

log = structlog.get_logger("mozaiks.orchestration")

_MAX_BATCH: Final = 256
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
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The scripted client's own totals (offline runs): calls, prompt and completion tokens.
    scripted: tuple[int, int, int] | None = None


class _Done(msgspec.Struct):
    """End of AG2's event stream: `error` is None when the run completed."""

    error: BaseException | None = None


class Orchestrator:
    """Creates chats and runs workflows; the API the run supervisor, REST layer and CLI call."""

    def __init__(
        self, store: MongoEventStore, workflows: WorkflowManager, settings: Settings, *, follow: Follow | None = None
    ) -> None:
        self.store = store
        self.workflows = workflows
        self.settings = settings
        self.follow: Follow = follow or store.subscribe
        self.reports: OrderedDict[str, RunReport] = OrderedDict()
        self._openai: OpenAIBackend | None = None

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
    ) -> StreamRef:
        """Start a chat's log: `chat.created` (context = workflow defaults + `context`), then `message.user`.

        Appends at expected_seq 0, so a taken `chat_id` raises Conflict; an unknown workflow raises
        UnknownWorkflow. Does not run anything: call `run` (or let the supervisor do it).
        """
        loaded = self.workflows.get(workflow)
        stream = StreamRef(chat_id=chat_id or new_id(), app_id=app_id, user_id=user_id, workflow=loaded.name)
        events = [Pending(event=ChatCreated(context={**loaded.context, **(context or {})}, offline=self.settings.offline))]
        if message is not None:
            events.append(Pending(event=MessageUser(content=message)))
        await self.store.append(stream, events, expected_seq=0)
        log.info("chat.created", chat_id=stream.chat_id, workflow=loaded.name, offline=self.settings.offline)
        return stream

    async def run(self, stream: StreamRef, *, run_id: str | None = None) -> str:
        """Run the workflow once over the chat's history; return the terminal event type.

        Appends `run.started`, one record per AG2 event and per LLM call (plus `context.updated`
        when tools change the context), then exactly one of `run.completed` / `run.failed` — or,
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
        report = RunReport(run_id=run_id, chat_id=stream.chat_id, workflow=workflow.name, offline=self.settings.offline)
        session = _RunSession(self, stream, workflow, history, record, report)
        try:
            outcome = await session.drive()
        finally:
            self.reports[run_id] = report
            while len(self.reports) > _REPORTS_KEPT:
                self.reports.popitem(last=False)
        report.outcome = outcome
        log.info("run.finished", chat_id=stream.chat_id, run_id=run_id, outcome=outcome, offline=report.offline,
                 ag2_events=report.ag2_events, llm_calls=report.llm_calls)
        return outcome

    def backend(self, workflow: Workflow, history: list[Record]) -> Backend:
        """The model backend of a run: scripted fixtures offline, else the shared OpenAI client."""
        if self.settings.offline:
            # Continue each agent's script where this chat's earlier runs left it.
            start: dict[str, int] = {}
            for record in history:
                if record.type == "llm.call" and record.agent:
                    start[record.agent] = start.get(record.agent, 0) + 1
            return ScriptedBackend(workflow.fixtures, start)
        if self._openai is None:
            self._openai = OpenAIBackend(api_key=self.settings.openai_api_key, base_url=self.settings.openai_base_url)
        return self._openai


def conversation(history: list[Record], user_name: str | None) -> str | list[dict[str, Any]]:
    """The chat so far as AG2 messages: user text, agents' messages, answers to input requests.

    User messages carry the workflow's user agent name when it has one; AG2 rejects any other
    name that is not a group agent, so without a user agent they go unnamed.
    """
    messages: list[dict[str, Any]] = []
    user = {"name": user_name} if user_name else {}
    for record in history:
        match record.type:
            case "message.user":
                messages.append({"role": "user", **user, "content": record.data["content"]})
            case "input.received":
                messages.append({"role": "user", **user, "content": record.data["text"]})
            case "message.agent" if record.agent:
                messages.append({"role": "assistant", "name": record.agent, "content": record.data["content"]})
    if len(messages) == 1:
        return str(messages[0]["content"])
    return messages


def initial_context(workflow: Workflow, history: list[Record]) -> dict[str, Any]:
    """Context variables at the start of a run: defaults, the chat's own, then every recorded update."""
    data = dict(workflow.context)
    for record in history:
        if record.type == "chat.created":
            data.update(record.data.get("context") or {})
        elif record.type == "context.updated":
            for key, value in (record.data.get("variables") or {}).items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
    return data


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

    async def append(self, pendings: list[Pending]) -> None:
        if pendings:
            await self.o.store.append(self.stream, pendings, expected_seq=None)

    async def drive(self) -> str:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def emit(note: Any) -> None:
            # The runtime's own notes join the run's AG2 stream, so they are recorded in order.
            # LLM calls happen in AG2's worker threads: hand the note over to the loop's thread.
            iostream = IOStream.get_default()
            if threading.get_ident() == loop_thread:
                iostream.send(note)
            else:
                loop.call_soon_threadsafe(iostream.send, note)

        backend = self.o.backend(self.workflow, self.history)
        ledger = Ledger(backend, report=emit)
        context = ContextVariables(data=initial_context(self.workflow, self.history))
        user_agent = next((a.name for a in self.workflow.agents if a.type == "user"), None)
        mapper = RunMapper(
            run_id=self.run_id,
            group_agents={a.name for a in self.workflow.agents if a.type != "user"},
            visual_agents=self.workflow.visual_agents,
            user_agent=user_agent or "_User",
        )
        watcher = asyncio.create_task(self.watch(), name=f"watch-{self.run_id}")
        pump: asyncio.Task[None] | None = None
        response: Any = None
        try:
            try:
                team: Team = build_team(
                    self.workflow, client_cls=ledger.client_class(), context=context,
                    default_model=self.o.settings.openai_model, emit=emit,
                )
                with model_calls():  # AG2's run task inherits the mark: its executor work is model calls
                    response = await a_run_group_chat(
                        team.pattern, conversation(self.history, user_agent), max_rounds=self.workflow.max_turns
                    )
            except Exception as exc:
                log.exception("run.setup_failed", chat_id=self.stream.chat_id, run_id=self.run_id)
                await self.append([self.terminal(RunFailed(error=f"{type(exc).__name__}: {exc}", reason="setup"))])
                return "run.failed"
            pump = asyncio.create_task(self.pump(response), name=f"pump-{self.run_id}")
            return await self.record(mapper, response, backend)
        finally:
            for task in (pump, watcher, getattr(response, "_task_ref", None)):
                if task is not None and not task.done():
                    task.cancel()
            for task in (pump, watcher):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    def terminal(self, event: RunCompleted | RunFailed) -> Pending:
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
        """The recorder loop: append each burst of events as one batch, answer input, finish the run."""
        stopping = asyncio.create_task(self.stop.wait())
        try:
            while True:
                getting = asyncio.create_task(self.queue.get())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    return await self.stopped(mapper, response)
                batch = [getting.result()]
                while len(batch) < _MAX_BATCH and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                pendings, request, done = self.map_batch(mapper, batch)
                if done is not None:
                    outcome = self.finish(done, backend)
                    pendings.append(outcome)
                await self.append(pendings)
                if done is not None:
                    return "run.completed" if done.error is None else "run.failed"
                if request is not None:
                    answer = await self.answer(request)
                    if answer is None:
                        return await self.stopped(mapper, response)
                    await request.content.respond(answer)
        finally:
            stopping.cancel()

    def map_batch(self, mapper: RunMapper, batch: list[Any]) -> tuple[list[Pending], Any, _Done | None]:
        pendings: list[Pending] = []
        request: Any = None
        done: _Done | None = None
        for item in batch:
            if isinstance(item, _Done):
                done = item
            elif isinstance(item, ContextNote):
                pendings.append(mapper.map_context(item))
                self.report.runtime_events += 1
            elif isinstance(item, LlmCallNote):
                pendings.append(mapper.map_note(item))
                self.report.runtime_events += 1
                self.report.llm_calls += 1
                self.report.prompt_tokens += item.call.prompt_tokens
                self.report.completion_tokens += item.call.completion_tokens
            else:
                # Anything else on AG2's stream is an AG2 event (wrapped: `.type` + `.content`).
                pending = mapper.map_event(item)
                pendings.append(pending)
                self.report.ag2_events += 1
                self.report.ag2_uuids.append(str(getattr(getattr(item, "content", item), "uuid", "")))
                if pending.event.__struct_config__.tag == "input.requested":
                    request = item
                    # Registered before the append, so an answer can never arrive unclaimed.
                    self.open_requests[str(item.content.uuid)] = asyncio.get_running_loop().create_future()
                elif getattr(item, "type", None) == "run_completion":
                    self.summary = item.content.summary
        return pendings, request, done

    def finish(self, done: _Done, backend: Backend) -> Pending:
        if isinstance(backend, ScriptedBackend):
            self.report.scripted = (backend.calls, backend.prompt_tokens, backend.completion_tokens)
        if done.error is None:
            return self.terminal(RunCompleted(summary=self.summary))
        error = done.error
        log.warning("run.failed", chat_id=self.stream.chat_id, run_id=self.run_id, error=str(error))
        return self.terminal(RunFailed(error=f"{type(error).__name__}: {error}"))

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
        """Follow the chat's log for answers to input requests and for this run's stop."""
        async for record in self.o.follow(self.stream.chat_id, self.started.seq):
            if record.type == "input.received":
                received = record.event
                assert isinstance(received, InputReceived)
                future = self.open_requests.get(received.request_id or "")
                if future is None and received.request_id is None and self.open_requests:
                    future = next(iter(self.open_requests.values()))
                if future is not None and not future.done():
                    future.set_result(received.text)
                elif received.request_id is None:
                    self.unclaimed.append(received)
            elif record.type == "run.stopped" and record.run_id in (self.run_id, None):
                self.stop.set()
                return

    async def stopped(self, mapper: RunMapper, response: Any) -> str:
        """Cancel AG2, record the events it had already produced, and report the stop."""
        task = getattr(response, "_task_ref", None)  # a_run_group_chat's task: the only handle to cancel AG2
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        leftovers: list[Any] = []
        while not self.queue.empty():
            leftovers.append(self.queue.get_nowait())
        source = response.iostream.input_stream
        while not source.empty():
            leftovers.append(source.get_nowait())
        pendings, _, _ = self.map_batch(mapper, leftovers)
        await self.append(pendings)
        log.info("run.stopped", chat_id=self.stream.chat_id, run_id=self.run_id)
        return "run.stopped"
