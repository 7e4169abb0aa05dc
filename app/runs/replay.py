"""Replay: a recorded chat run again, into a new chat whose `chat.created` says `replay_of`.

The replay sends the original's user messages, input answers and UI answers, in order, to the same
workflow (or a changed copy): the replay's n-th waiting UI request (form, choice, confirm) gets the
original's n-th request's `ui.responded` (or `ui.expired`), recorded the way `RunSupervisor.answer_ui`
records it (validated against the replay's request, with the tool's result when its run is gone). In recorded mode each model call is answered from the recording, matched by
the hash of its exact request (domain/model_io.py); the first call whose request is not in the
recording is reported (seq, agent, the differing message as a text diff) and the replay goes on
per `on_diverge`: `live` (the configured model answers), `stop`, or `recorded-next` (the agent's
next recorded answer regardless). Tools declared `"deterministic": false` are answered from the
recording too. The chat replayed is only read, never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import msgspec
from openai.types.chat import ChatCompletion

from app.runs.clients import Backend, TextStream, request_body
from app.runs.orchestrator import Orchestrator
from app.runs.ui import WAITING, InvalidAnswer, UiRequestClosed, read_ledger, record_outcome, results_missing
from app.runs.workflows import Tool, Workflow, WorkflowManager
from app.settings import Settings
from domain.errors import MozaiksError, UnknownChat
from domain.events import (
    TERMINAL_TYPES,
    ChatCreated,
    InputReceived,
    MessageUser,
    Pending,
    Record,
    StreamRef,
    UiExpired,
    UiResponded,
    new_id,
)
from domain.model_io import decode_part, request_diff, request_key, split_request
from domain.store import MongoEventStore

ModelMode = Literal["recorded", "live"]
OnDiverge = Literal["live", "stop", "recorded-next"]
ON_DIVERGE: Final = ("live", "stop", "recorded-next")


class ReplayRefused(MozaiksError):
    """A replay that cannot start (nothing written): `code` is the API's error code for it."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        super().__init__(detail)


class ReplayStopped(MozaiksError):
    """The replay stopped at the first diverging call (`--on-diverge stop`)."""


class Divergence(msgspec.Struct, frozen=True, kw_only=True):
    """The first model call whose request is not in the recording."""

    seq: (
        int | None
    )  # the recorded llm.call it stands for (None: the recording had no more calls of the agent)
    agent: str
    what: str  # "parameters", "tools", "message 0 (system)", …
    diff: str

    def describe(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "past the recording"
        return f"first diverging call: {where}, agent {self.agent}, {self.what} differs"


class ReplayReport(msgspec.Struct, kw_only=True):
    """What a replay did."""

    original: str
    chat_id: str
    model: str
    runs: int = 0
    outcomes: list[str] = []
    recorded: int = 0
    live: int = 0
    divergence: Divergence | None = None
    diverged_calls: int = 0


class RecordedCall(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    agent: str
    request: list[str]
    response: dict[str, Any]


class Recording:
    """The original chat's answered model calls, found by request hash, and per agent in order."""

    def __init__(self, calls: list[RecordedCall], parts: dict[str, Any]) -> None:
        self.calls = calls
        self.parts = parts
        self.by_key: dict[str, deque[int]] = defaultdict(deque)
        self.by_agent: dict[str, deque[int]] = defaultdict(deque)
        for index, call in enumerate(calls):
            self.by_key[request_key(call.request)].append(index)
            self.by_agent[call.agent].append(index)
        self.used: set[int] = set()

    def take(self, index: int) -> RecordedCall:
        self.used.add(index)
        return self.calls[index]

    def matching(self, hashes: list[str]) -> int | None:
        """The first unused recorded call with exactly this request."""
        queue = self.by_key.get(request_key(hashes))
        while queue:
            index = queue.popleft()
            if index not in self.used:
                return index
        return None

    def next_of(self, agent: str) -> int | None:
        """The agent's first recorded call not used yet."""
        queue = self.by_agent.get(agent)
        while queue:
            if queue[0] not in self.used:
                return queue[0]
            queue.popleft()
        return None


class RecordedBackend:
    """Answers model calls from a recording by request hash; a call not recorded diverges (see module doc)."""

    offline = False

    def __init__(
        self,
        recording: Recording,
        report: ReplayReport,
        *,
        streamed: bool,
        on_diverge: OnDiverge,
        live: Callable[[], Backend] | None,
    ) -> None:
        self.recording = recording
        self.report = report
        self.streamed = streamed
        self.on_diverge = on_diverge
        self.live = live
        self._lock = threading.Lock()

    def request(self, params: dict[str, Any]) -> dict[str, Any]:
        """The request as the recording's backend sent it (so hashes compare)."""
        return request_body(params, streamed=self.streamed)

    def complete(
        self, agent: str, params: dict[str, Any], stream: TextStream | None = None
    ) -> ChatCompletion:
        """The recorded answer to this exact request; else diverge per `on_diverge`."""
        hashes, bodies = split_request(self.request(params))
        with self._lock:
            index = self.recording.matching(hashes)
            if index is None:
                index = self.diverged(agent, hashes, bodies)
            if index is not None:
                self.report.recorded += 1
                call = self.recording.take(index)
        if index is None:
            if self.live is None:
                raise ReplayStopped("no model is configured to answer a diverging call live")
            self.report.live += 1
            return self.live().complete(agent, params, stream)
        return self.play(call, stream)

    def diverged(self, agent: str, hashes: list[str], bodies: Mapping[str, bytes]) -> int | None:
        """Note the divergence (the first one in full); the recorded call to answer with, or None (live)."""
        self.report.diverged_calls += 1
        expected = self.recording.next_of(agent)
        if self.report.divergence is None:
            parts = {**self.recording.parts, **{h: decode_part(b) for h, b in bodies.items()}}
            recorded = self.recording.calls[expected] if expected is not None else None
            what, diff = request_diff(recorded.request if recorded else [], hashes, parts)
            self.report.divergence = Divergence(
                seq=recorded.seq if recorded else None, agent=agent, what=what, diff=diff
            )
        if self.on_diverge == "stop":
            raise ReplayStopped(self.report.divergence.describe())
        if self.on_diverge == "recorded-next":
            if expected is None:
                raise ReplayStopped(f"the recording has no more calls of agent {agent}")
            return expected
        return None

    def play(self, call: RecordedCall, stream: TextStream | None) -> ChatCompletion:
        """The recorded completion, its text streamed as one piece."""
        completion = ChatCompletion.model_validate(call.response)
        if stream is not None:
            stream.begin()
            text = completion.choices[0].message.content if completion.choices else None
            if text:
                stream.write(text)
        return completion


class RecordedToolError(Exception):
    """A tool's recorded failure, raised again in a replay (AG2 reports it as the original's error text)."""


def recorded_tools(workflow: Workflow, history: list[Record]) -> Workflow:
    """The workflow with each tool declared `"deterministic": false` answering its recorded results in order."""
    results: dict[str, deque[tuple[str, bool]]] = defaultdict(deque)
    for record in history:
        if record.type == "tool.result":
            results[str(record.data["tool"])].append(
                (str(record.data["content"]), bool(record.data.get("is_error")))
            )
    tools: dict[str, Tool] = {}
    for name, tool in workflow.tools.items():
        if tool.spec.deterministic or tool.function is None or tool.spec.ui is not None:
            # A UI tool's answers are the original's `ui.responded` (run_turn), its function applied to them.
            tools[name] = tool
            continue
        queue = results[name]

        @functools.wraps(tool.function)
        def recorded(*_: Any, _queue: deque[tuple[str, bool]] = queue, _name: str = name, **__: Any) -> str:
            if not _queue:
                raise ReplayStopped(f"the recording has no more results of tool {_name}")
            content, failed = _queue.popleft()
            if failed:
                raise RecordedToolError(content.removeprefix("Error: "))
            return content

        tools[name] = msgspec.structs.replace(tool, function=recorded)
    return msgspec.structs.replace(workflow, tools=tools)


class _Replaying(Orchestrator):
    """An orchestrator whose runs take their model answers from one backend (the replay's)."""

    def __init__(
        self, store: MongoEventStore, workflows: WorkflowManager, settings: Settings, backend: Backend
    ) -> None:
        super().__init__(store, workflows, settings)
        self.replay_backend = backend
        # The original run's random speaker choices, for the run about to start.
        self.choices: deque[str] = deque()

    def backend(self, workflow: Workflow, history: list[Record]) -> Backend:
        return self.replay_backend

    def chooser(self, history: list[Record]) -> Callable[[list[str]], str] | None:
        choices = self.choices

        def choose(candidates: list[str]) -> str:
            # The original's choice while it is still a candidate; past the recording, any of them.
            if choices and choices[0] in candidates:
                return choices.popleft()
            return random.choice(candidates)

        return choose


class _Only(WorkflowManager):
    """A workflow manager holding one workflow as given (the replay's, tools possibly recorded)."""

    def __init__(self, workflow: Workflow) -> None:
        self.path = workflow.path
        self.workflows = {workflow.name: workflow}
        self.errors = []


class Turn(msgspec.Struct, kw_only=True):
    """One run of the original: the user messages before it; its input answers and random speaker choices."""

    messages: list[Pending]
    answers: list[str]
    choices: list[str] = []
    outcome: str | None = None


def turns_of(history: list[Record]) -> list[Turn]:
    """The original's runs in order, each with the user messages before it and its input answers."""
    turns: list[Turn] = []
    waiting: list[Pending] = []
    current: Turn | None = None
    chose = False  # a random handoff was recorded: the next speaker.selected is its choice
    for record in history:
        if record.type == "message.user":
            said = record.event
            assert isinstance(said, MessageUser)  # as the original had it (a hidden initial_message too)
            waiting.append(
                Pending(event=MessageUser(content=said.content, origin=said.origin), visible=record.visible)
            )
        elif record.type == "run.started":
            current = Turn(messages=waiting, answers=[])
            waiting = []
            turns.append(current)
        elif record.type == "input.received" and current is not None:
            current.answers.append(str(record.data["text"]))
        elif record.type == "handoff" and record.data.get("target") == "random":
            chose = True
        elif record.type == "speaker.selected" and chose and current is not None:
            current.choices.append(str(record.data["speaker"]))
            chose = False
        elif record.type in TERMINAL_TYPES and current is not None:
            current.outcome = record.type
    return turns


UiAnswer = UiResponded | UiExpired


def ui_answers_of(history: list[Record]) -> list[UiAnswer | None]:
    """How each waiting UI request of the original ended, in request order (None: never answered)."""
    ended: dict[str, UiAnswer] = {}
    for record in history:
        if record.type in ("ui.responded", "ui.expired"):
            outcome = record.event
            assert isinstance(outcome, UiResponded | UiExpired)
            ended.setdefault(outcome.request_id, outcome)
    return [
        ended.get(str(r.data["request_id"]))
        for r in history
        if r.type == "ui.requested" and r.data.get("component") in WAITING
    ]


async def load_recording(orchestrator: Orchestrator, history: list[Record]) -> Recording:
    """The answered calls of a chat with their parts (calls recorded without content cannot be replayed)."""
    wanted = [r for r in history if r.type == "llm.call" and r.data.get("status", "ok") == "ok"]
    hashes = [
        h for r in wanted if r.data.get("io") == "full" for h in (*r.data["request"], r.data["response"])
    ]
    parts = await orchestrator.parts.values(hashes)
    calls = []
    for record in wanted:
        if record.data.get("io") != "full" or record.data.get("response") not in parts:
            raise ReplayRefused(
                "bad_request",
                f"chat {record.chat_id} cannot be replayed from its recording: the model call at seq "
                f"{record.seq} kept no content (MOZAIKS_RECORD_MODEL_IO={record.data.get('io', 'off')}); "
                "use --model live",
            )
        calls.append(
            RecordedCall(
                seq=record.seq,
                agent=record.agent or "",
                request=list(record.data["request"]),
                response=parts[record.data["response"]],
            )
        )
    return Recording(calls, parts)


def replay_workflow(workflows: WorkflowManager, name: str) -> Workflow:
    """The workflow to replay on; ReplayRefused when the folder does not hold a valid one of that name."""
    problems = [e for e in workflows.errors if e.workflow in (name, workflows.path.name, str(workflows.path))]
    if problems or name not in workflows.workflows:
        detail = (
            "; ".join(str(p) for p in problems)
            or f"no workflow {name!r} (loaded: {', '.join(workflows.names()) or 'none'})"
        )
        code = "bad_request" if problems else "unknown_workflow"
        raise ReplayRefused(code, f"cannot replay on the workflows under {workflows.path}: {detail}")
    return workflows.workflows[name]


async def replay(
    store: MongoEventStore,
    settings: Settings,
    workflows: WorkflowManager,
    chat_id: str,
    *,
    model: ModelMode = "recorded",
    on_diverge: OnDiverge = "live",
    user_id: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ReplayReport:
    """Run chat `chat_id` again into a new chat (see the module doc); returns what happened.

    Raises UnknownChat, or ReplayRefused before anything is written.
    """
    history = [record async for record in store.read(chat_id)]
    if not history:
        raise UnknownChat(chat_id)
    first = history[0]
    workflow = replay_workflow(workflows, first.workflow)
    started = next((r for r in history if r.type == "run.started"), None)
    original_online = started is not None and not started.data.get("offline", False)
    model_name = (started.data.get("model") if started is not None else None) or settings.openai_model
    if settings.offline and model == "live":
        raise ReplayRefused(
            "bad_request", "--model live needs a model: set OPENAI_BASE_URL or OPENAI_API_KEY"
        )
    if model == "recorded":  # requests match the recording only with the model name it sent
        settings = msgspec.structs.replace(settings, openai_model=model_name)
    report = ReplayReport(original=chat_id, chat_id=new_id(), model=model)
    probe = Orchestrator(store, workflows, settings)

    def live_backend() -> Backend:
        if settings.offline:
            raise ReplayStopped("a call diverged and no model is configured to answer it (OPENAI_BASE_URL)")
        return probe.backend(workflow, [])

    backend: Backend
    if model == "recorded":
        recording = await load_recording(probe, history)
        backend = RecordedBackend(
            recording,
            report,
            streamed=original_online,
            on_diverge=on_diverge,
            live=live_backend if on_diverge == "live" else None,
        )
        workflow = recorded_tools(workflow, history)
    else:
        backend = _Counted(live_backend(), report)
    orchestrator = _Replaying(store, _Only(workflow), settings, backend)
    created = first.event
    assert isinstance(created, ChatCreated)
    stream = StreamRef(
        chat_id=report.chat_id, app_id=first.app_id, user_id=user_id or first.user_id, workflow=workflow.name
    )
    turns = turns_of(history)
    ui_answers = deque(ui_answers_of(history))
    opening = [
        Pending(
            event=ChatCreated(
                context=created.context,
                offline=created.offline,
                replay_of={"chat_id": chat_id, "model": model},
            )
        )
    ]
    await store.append(stream, opening, expected_seq=0)
    for number, turn in enumerate(turns, start=1):
        if turn.messages:
            await store.append(stream, turn.messages, expected_seq=None)
        orchestrator.choices = deque(turn.choices)
        outcome = await run_turn(orchestrator, store, stream, turn.answers, ui_answers)
        report.runs += 1
        report.outcomes.append(outcome)
        if progress is not None:
            progress(
                f"turn {number}/{len(turns)}: {outcome} (original: {turn.outcome}) · "
                f"{report.recorded} recorded, {report.live} live calls so far"
                + (f" · {report.diverged_calls} diverged" if report.diverged_calls else "")
            )
        if report.divergence is not None and on_diverge == "stop":
            break
    return report


class _Counted:
    """A live backend whose calls the report counts (`--model live`)."""

    offline = False

    def __init__(self, backend: Backend, report: ReplayReport) -> None:
        self.inner = backend
        self.report = report

    def request(self, params: dict[str, Any]) -> dict[str, Any]:
        body = getattr(self.inner, "request", None)
        return body(params) if callable(body) else request_body(params, streamed=False)

    def complete(
        self, agent: str, params: dict[str, Any], stream: TextStream | None = None
    ) -> ChatCompletion:
        self.report.live += 1
        return self.inner.complete(agent, params, stream)


async def run_turn(
    orchestrator: Orchestrator,
    store: MongoEventStore,
    stream: StreamRef,
    answers: list[str],
    ui_answers: deque[UiAnswer | None] | None = None,
) -> str:
    """One run of the replay, answering its input requests with the original's answers in order, and
    its waiting UI requests with the original's UI answers (taken from the left of `ui_answers`).

    A UI answer is recorded as `RunSupervisor.answer_ui` records one (`record_outcome`), once the run
    has ended `run.suspended`: validated against the replay's own request, with the tool's result
    (the next turn continues the chat from the log). No more answers: the request stays open.
    """
    after = await store.last_seq(stream.chat_id)
    queue = deque(answers)
    ui = ui_answers if ui_answers is not None else deque()
    tools = orchestrator.workflows.get(stream.workflow).tools
    run_id = new_id()
    asked: set[str] = set()

    async def answer_ui(request_id: str) -> bool:
        asked.add(request_id)
        original = ui.popleft() if ui else None
        if original is None:
            return False
        outcome: UiAnswer = (
            UiResponded(request_id=request_id, answer=original.answer, user_id=stream.user_id)
            if isinstance(original, UiResponded)
            else UiExpired(request_id=request_id)
        )
        try:
            await record_outcome(store, stream, request_id, outcome, tools=tools)
        except InvalidAnswer:
            return False  # the replay's request diverged from the original's: its answer does not fit
        except UiRequestClosed:
            pass  # the run expired it first
        return True

    async def answer() -> None:
        async for record in store.subscribe(stream.chat_id, after):
            if record.type == "input.requested":
                if not queue:
                    orchestrator.request_stop(run_id, "replay")  # the original had no more answers
                    return
                text = queue.popleft()
                reply = Pending(event=InputReceived(request_id=record.data["request_id"], text=text))
                await store.append(stream, [reply], expected_seq=None)
            elif record.type in TERMINAL_TYPES and record.run_id == run_id:
                return

    answering = asyncio.create_task(answer())
    try:
        outcome = await orchestrator.run(stream, run_id=run_id)
    finally:
        answering.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await answering
    # The run ended (`run.suspended`) with a request of its own open: answer it now, the tool's result
    # recorded with it (the next turn, the original's continuing run, goes on from the log); an answer
    # an older log recorded without its result gets one.
    ledger = await read_ledger(store, stream.chat_id)
    for exchange in ledger.exchanges.values():  # in log order
        request = exchange.request
        if (
            exchange.record.run_id == run_id
            and exchange.outcome is None
            and request.component in WAITING
            and request.request_id not in asked
        ):
            await answer_ui(request.request_id)
    ledger = await read_ledger(store, stream.chat_id)
    missing = results_missing(ledger, tools)
    if missing:
        await store.append(stream, missing, expected_seq=ledger.last_seq)
    return outcome
