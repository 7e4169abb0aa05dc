"""AG-UI: `POST /ag-ui/{workflow}` runs a workflow for any AG-UI client (CopilotKit and the rest).

`RunAgentInput` in, `text/event-stream` of AG-UI events out, types and encoding from the official
`ag-ui-protocol` package. `threadId` is the chat id. An AG-UI run is a stretch of the chat's log:
it starts at the client's turn (its `message.user`, the `input.requested` its `resume` answers, or an
AgentDriven workflow's hidden `initial_message` for a new thread sent without a user message)
and ends at the next `run.completed` / `run.failed` / `run.stopped`, or at an `input.requested`,
which ends the AG-UI run with an interrupt outcome (the AG2 run waits on; the next AG-UI run's
`resume` answers it). The events are derived from the log's visible records only, through the
same hub subscription as the WebSocket, and are a pure function of those records: each SSE event
carries the id `<seq>` of the record it came from (`<seq>.<k>` for all but the last event of a
record that yields several), and a request with `Last-Event-ID` re-derives the run and sends only
what follows that id: no gap, no duplicate. Repeating a request (same last user message id, or the
same resume entry) records nothing new and streams the same run again.

Agents are AG-UI steps (STEP_STARTED/FINISHED, step name = agent), not SUBAGENT_* invocations:
AG2 group-chat agents are peers taking turns in one conversation, not delegations from a parent
agent, and SUBAGENT_* would attribute every event and message to a per-invocation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, Literal, cast

import structlog
from ag_ui.core import (
    PROTOCOL_VERSION,
    AssistantMessage,
    BaseEvent,
    CustomEvent,
    FunctionCall,
    Interrupt,
    Message,
    MessagesSnapshotEvent,
    ResumeEntry,
    RunAgentInput,
    RunErrorEvent,
    RunFinishedCancelledOutcome,
    RunFinishedEvent,
    RunFinishedInterruptOutcome,
    RunFinishedSuccessOutcome,
    RunStartedEvent,
    StateDeltaEvent,
    StateSnapshotEvent,
    StepFinishedEvent,
    StepStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCall,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
    ToolMessage,
    UserMessage,
)
from ag_ui.encoder import EventEncoder
from litestar import Request, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Stream

from app.http import codes
from app.http.auth import Principal
from app.http.budgets import refuse_over_budget
from app.http.controllers import owned_chat
from app.http.errors import Refused, error_responses
from app.hub import LiveHub, Overflowed
from app.runs.orchestrator import Orchestrator
from app.runs.supervisor import NoActiveRun, RunSupervisor, chat_state
from app.runs.ui import WAITING, read_ledger
from app.runs.workflows import UnknownWorkflow
from app.settings import Settings
from domain.errors import Conflict
from domain.events import Record, StreamRef
from domain.store import MongoEventStore, ReplayDone

log = structlog.get_logger("mozaiks.agui")

_encoder: Final = EventEncoder()
INPUT_REASON: Final = "input_required"
UI_REASON: Final = "ui_required"
# What an answer to one of our interrupts is: the text the agent asked for.
ANSWER_SCHEMA: Final = {"type": "string"}


# ---- records -> AG-UI events ----------------------------------------------------------------------


def _ms(record: Record) -> int:
    return int(record.ts.timestamp() * 1000)


def _message_id(record: Record) -> str:
    return str(record.data.get("message_id") or record.id)


def _call_id(record: Record) -> str:
    return str(record.data.get("call_id") or record.id)


def _pointer(key: str) -> str:
    return "/" + key.replace("~", "~0").replace("/", "~1")


def answer_schema(request: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a UI request's answer: a form's own, a choice's options, a confirm's boolean."""
    props = request.get("props") or {}
    match request.get("component"):
        case "form":
            return dict(props.get("schema") or {})
        case "choice":
            return {"type": "string", "enum": list(props.get("options") or [])}
        case _:
            return {"type": "boolean"}


def state_at(records: Iterable[Record]) -> dict[str, Any]:
    """The chat's context variables after `records`: `chat.created`'s, then each `context.updated`."""
    state: dict[str, Any] = {}
    for record in records:
        if record.visible and record.type == "chat.created":
            state = dict(record.data.get("context") or {})
        elif record.visible and record.type == "context.updated":
            state.update(record.data.get("variables") or {})
    return state


def messages_of(records: Iterable[Record]) -> list[Message]:
    """The visible conversation as AG-UI messages, exactly as a client assembles it from our events."""
    messages: list[Message] = []
    for record in records:
        if not record.visible:
            continue
        data = record.data
        match record.type:
            case "message.user":
                messages.append(UserMessage(id=_message_id(record), content=data["content"]))
            case "message.agent":
                messages.append(
                    AssistantMessage(id=_message_id(record), content=data["content"], name=record.agent)
                )
            case "tool.called":
                call = ToolCall(
                    id=_call_id(record), function=FunctionCall(name=data["tool"], arguments=data["arguments"])
                )
                messages.append(AssistantMessage(id=record.id, tool_calls=[call]))
            case "tool.result":
                result = ToolMessage(id=record.id, content=data["content"], tool_call_id=_call_id(record))
                # A client files a tool result right after the message holding its call (and its other results).
                at = next(
                    (
                        i + 1
                        for i, m in enumerate(messages)
                        if isinstance(m, AssistantMessage)
                        and any(c.id == result.tool_call_id for c in m.tool_calls or ())
                    ),
                    len(messages),
                )
                while at < len(messages) and isinstance(messages[at], ToolMessage):
                    at += 1
                messages.insert(at, result)
    return messages


Translation = Callable[["RunTranslator", Record], list[BaseEvent]]


class RunTranslator:
    """Turns one AG-UI run's records into AG-UI events, in AG-UI's order rules.

    Keeps only what the order rules need (the open step, the open streamed messages), so the same
    records always give the same events: a replay re-derives exactly what a live stream sent.
    """

    def __init__(self, thread_id: str, run_id: str) -> None:
        self.thread_id = thread_id
        self.run_id = run_id
        self.step: str | None = None
        self.streamed: dict[str, str] = {}  # message_id -> text sent so far, for messages still streaming
        self.finished = False
        self.questions: list[Interrupt] = []  # UI requests the run's `run.suspended` finishes with

    def start(self, history: Sequence[Record]) -> list[BaseEvent]:
        """RUN_STARTED and the context as STATE_SNAPSHOT; when the chat had turns before, MESSAGES_SNAPSHOT.

        `history` ends with the run's first record: the client's `message.user`, or the
        `input.requested` its resume answers. A client drops its own messages a snapshot lacks
        and appends the snapshot's others after the ones it keeps, so a continuing turn gets the
        history before it, then its own message as a user TEXT_MESSAGE: in order on any client.
        """
        turn, earlier = history[-1], history[:-1]
        at = _ms(turn)
        events: list[BaseEvent] = [
            RunStartedEvent(
                thread_id=self.thread_id, run_id=self.run_id, protocol_version=PROTOCOL_VERSION, timestamp=at
            ),
            StateSnapshotEvent(snapshot=state_at(history), timestamp=at),
        ]
        if any(r.type in _TURN_TYPES for r in earlier):
            if turn.type == "message.user":
                events += [
                    MessagesSnapshotEvent(messages=messages_of(earlier), timestamp=at),
                    *self.text(turn),
                ]
            else:
                events.append(MessagesSnapshotEvent(messages=messages_of(history), timestamp=at))
        return events

    def translate(self, record: Record) -> list[BaseEvent]:
        """The events of one visible record (none for records AG-UI has no use for)."""
        translation = TRANSLATIONS.get(record.type)
        if translation is None or self.finished:
            return []
        events = translation(self, record)
        if events and record.agent is not None and record.agent != self.step and record.type not in _ENDS:
            events = [
                *self._close_step(record),
                StepStartedEvent(step_name=record.agent, timestamp=_ms(record)),
                *events,
            ]
            self.step = record.agent
        return events

    def _close_step(self, record: Record) -> list[BaseEvent]:
        if self.step is None:
            return []
        step, self.step = self.step, None
        return [StepFinishedEvent(step_name=step, timestamp=_ms(record))]

    def _close_all(self, record: Record) -> list[BaseEvent]:
        """Close what is open (streamed messages, the step) before the run ends."""
        ends: list[BaseEvent] = [
            TextMessageEndEvent(message_id=m, timestamp=_ms(record)) for m in self.streamed
        ]
        self.streamed.clear()
        self.finished = True
        return [*ends, *self._close_step(record)]

    # -- one method per record type (TRANSLATIONS below) --

    def text(self, record: Record) -> list[BaseEvent]:
        message_id, content, at = _message_id(record), str(record.data["content"]), _ms(record)
        sent = self.streamed.pop(message_id, None)
        if sent is None:  # not streamed: the whole text in one CONTENT
            role: Literal["user", "assistant"] = "user" if record.type == "message.user" else "assistant"
            events: list[BaseEvent] = [
                TextMessageStartEvent(message_id=message_id, role=role, name=record.agent, timestamp=at)
            ]
            if content:
                events.append(TextMessageContentEvent(message_id=message_id, delta=content, timestamp=at))
            return [*events, TextMessageEndEvent(message_id=message_id, timestamp=at)]
        rest = content[len(sent) :] if content.startswith(sent) else ""
        tail: list[BaseEvent] = (
            [TextMessageContentEvent(message_id=message_id, delta=rest, timestamp=at)] if rest else []
        )
        return [*tail, TextMessageEndEvent(message_id=message_id, timestamp=at)]

    def delta(self, record: Record) -> list[BaseEvent]:
        """A `message.delta` (streaming): START on a message's first delta, then one CONTENT per delta."""
        message_id, text, at = str(record.data["message_id"]), str(record.data["text"]), _ms(record)
        events: list[BaseEvent] = []
        if message_id not in self.streamed:
            self.streamed[message_id] = ""
            events.append(
                TextMessageStartEvent(
                    message_id=message_id, role="assistant", name=record.agent, timestamp=at
                )
            )
        self.streamed[message_id] += text
        return [*events, TextMessageContentEvent(message_id=message_id, delta=text, timestamp=at)]

    def tool_called(self, record: Record) -> list[BaseEvent]:
        call_id, at = _call_id(record), _ms(record)
        arguments = str(record.data.get("arguments") or "")
        events: list[BaseEvent] = [
            ToolCallStartEvent(
                tool_call_id=call_id,
                tool_call_name=record.data["tool"],
                parent_message_id=record.id,
                timestamp=at,
            )
        ]
        if arguments:
            events.append(ToolCallArgsEvent(tool_call_id=call_id, delta=arguments, timestamp=at))
        return [*events, ToolCallEndEvent(tool_call_id=call_id, timestamp=at)]

    def tool_result(self, record: Record) -> list[BaseEvent]:
        return [
            ToolCallResultEvent(
                message_id=record.id,
                tool_call_id=_call_id(record),
                content=str(record.data.get("content", "")),
                role="tool",
                timestamp=_ms(record),
            )
        ]

    def context(self, record: Record) -> list[BaseEvent]:
        variables: dict[str, Any] = record.data.get("variables") or {}
        patch = [{"op": "add", "path": _pointer(key), "value": value} for key, value in variables.items()]
        return [StateDeltaEvent(delta=cast(Any, patch), timestamp=_ms(record))] if patch else []

    def custom(self, record: Record) -> list[BaseEvent]:
        value = {**record.data, "agent": record.agent}
        return [CustomEvent(name=record.type, value=value, timestamp=_ms(record))]

    def interrupt(self, record: Record) -> list[BaseEvent]:
        question = Interrupt(
            id=str(record.data["request_id"]),
            reason=INPUT_REASON,
            message=str(record.data.get("prompt") or "") or None,
            response_schema=ANSWER_SCHEMA,
        )
        outcome = RunFinishedInterruptOutcome(interrupts=[question])
        finish = RunFinishedEvent(
            thread_id=self.thread_id, run_id=self.run_id, outcome=outcome, timestamp=_ms(record)
        )
        return [*self._close_all(record), finish]

    def ui_requested(self, record: Record) -> list[BaseEvent]:
        """A form, choice or confirm becomes an interrupt on its tool call (the call's
        TOOL_CALL_START/ARGS/END came from its `tool.called`), sent with the RUN_FINISHED of the
        run's `run.suspended`; an artifact is a CUSTOM event."""
        data = record.data
        if data.get("component") not in WAITING:
            return self.custom(record)
        props = data.get("props") or {}
        question = Interrupt(
            id=str(data["request_id"]),
            reason=UI_REASON,
            message=str(props.get("title") or props.get("question") or "") or None,
            tool_call_id=str(data.get("tool_call_id") or "") or None,
            response_schema=answer_schema(data),
            expires_at=data.get("expires_at"),
            metadata={"component": data.get("component"), "mode": data.get("mode"), "tool": data.get("tool")},
        )
        self.questions.append(question)
        return []

    def suspended(self, record: Record) -> list[BaseEvent]:
        """The run waits on the user: RUN_FINISHED with an interrupt per UI request it asked."""
        asked = set(record.data.get("request_ids") or [])
        questions = [q for q in self.questions if q.id in asked]
        outcome = RunFinishedInterruptOutcome(interrupts=questions)
        finish = RunFinishedEvent(
            thread_id=self.thread_id, run_id=self.run_id, outcome=outcome, timestamp=_ms(record)
        )
        return [*self._close_all(record), finish]

    def completed(self, record: Record) -> list[BaseEvent]:
        finish = RunFinishedEvent(
            thread_id=self.thread_id,
            run_id=self.run_id,
            result=record.data.get("summary"),
            outcome=RunFinishedSuccessOutcome(),
            timestamp=_ms(record),
        )
        return [*self._close_all(record), finish]

    def stopped(self, record: Record) -> list[BaseEvent]:
        outcome = RunFinishedCancelledOutcome()
        finish = RunFinishedEvent(
            thread_id=self.thread_id, run_id=self.run_id, outcome=outcome, timestamp=_ms(record)
        )
        return [*self._close_all(record), finish]

    def failed(self, record: Record) -> list[BaseEvent]:
        error = RunErrorEvent(
            message=str(record.data.get("error", "the run failed")),
            code=record.data.get("reason"),
            timestamp=_ms(record),
        )
        return [*self._close_all(record), error]


# Record type -> its AG-UI events. `message.delta` is the streaming entry; without deltas, a
# `message.agent` is one START/CONTENT/END. Types not listed (llm.call, run.started, ...) yield nothing.
TRANSLATIONS: Final[dict[str, Translation]] = {
    "message.user": RunTranslator.text,
    "message.agent": RunTranslator.text,
    "message.delta": RunTranslator.delta,
    "tool.called": RunTranslator.tool_called,
    "tool.result": RunTranslator.tool_result,
    "context.updated": RunTranslator.context,
    "handoff": RunTranslator.custom,
    "speaker.selected": RunTranslator.custom,
    "child.started": RunTranslator.custom,
    "child.completed": RunTranslator.custom,
    "input.requested": RunTranslator.interrupt,
    "ui.requested": RunTranslator.ui_requested,
    "ui.responded": RunTranslator.custom,
    "ui.expired": RunTranslator.custom,
    "run.completed": RunTranslator.completed,
    "run.stopped": RunTranslator.stopped,
    "run.failed": RunTranslator.failed,
    "run.suspended": RunTranslator.suspended,
}
_ENDS: Final = frozenset(
    {"input.requested", "ui.requested", "run.completed", "run.stopped", "run.failed", "run.suspended"}
)
_TURN_TYPES: Final = frozenset({"message.user", "message.agent", "tool.called", "tool.result"})


# ---- SSE ----------------------------------------------------------------------------------------


def event_id(seq: int, index: int, count: int) -> str:
    """The SSE id of the `index`-th of the `count` events one record yields: `<seq>` for its last."""
    return str(seq) if index == count - 1 else f"{seq}.{index}"


def _position(event_id_text: str) -> tuple[int, float]:
    seq, _, index = event_id_text.strip().partition(".")
    return int(seq), (int(index) if index else float("inf"))


def sse(seq: int, events: Sequence[BaseEvent], after: tuple[int, float] = (0, -1.0)) -> str:
    """The SSE text of one record's events (those after the `after` position)."""
    return "".join(
        f"id: {event_id(seq, i, len(events))}\n{_encoder.encode(event)}"
        for i, event in enumerate(events)
        if (seq, i) > after
    )


async def _with_keepalive(items: AsyncIterator[Any], every_s: float) -> AsyncGenerator[Any, None]:
    """`items`, with None yielded whenever nothing came for `every_s` (the caller sends an SSE comment)."""
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


async def run_events(
    store: MongoEventStore,
    hub: LiveHub,
    keepalive_s: float,
    chat_id: str,
    start: int,
    translator: RunTranslator,
    after: tuple[int, float],
) -> AsyncIterator[str]:
    """The SSE text of the AG-UI run starting at record `start`: its start group, then one group per
    visible record, until the run finishes, fails or asks for input."""
    history = [record async for record in store.read(chat_id, limit=start)]
    opening = sse(start, translator.start(history), after)
    if opening:
        yield opening
    # Every visible record, replay included (no skipping of finished messages' deltas): a reconnect
    # re-derives the run from its start and must meet exactly what the live stream met.
    subscription = cast(AsyncGenerator[Any, None], hub.subscribe(chat_id, start))
    items = _with_keepalive(subscription, keepalive_s)
    try:
        async for item in items:
            if item is None:
                yield ": keepalive\n\n"
            elif isinstance(item, Record) and item.visible:
                text = sse(item.seq, translator.translate(item), after)
                if text:
                    yield text
                if translator.finished:
                    return
            elif isinstance(item, ReplayDone):
                continue
    except Overflowed as exc:  # too slow a client: end here; it resumes with Last-Event-ID
        log.info("agui.overflowed", chat_id=chat_id, last_seq=exc.last_seq)
    finally:
        await items.aclose()  # first: it may be waiting on the subscription
        await subscription.aclose()


# ---- the endpoint -------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(getattr(part, "text", "") for part in content or ())


def _new_turn(run: RunAgentInput) -> tuple[str, str]:
    """The id and text of the request's last user message (the new turn)."""
    for message in reversed(run.messages):
        if isinstance(message, UserMessage):
            text = _text_of(message.content)
            if not text.strip():
                raise Refused(
                    400, codes.BAD_REQUEST, f"messages: the last user message ({message.id}) has no text"
                )
            return message.id, text
    raise Refused(
        400,
        codes.BAD_REQUEST,
        "messages: no user message to run (or send resume entries to answer an interrupt)",
    )


def _has_user_message(run: RunAgentInput) -> bool:
    return any(isinstance(message, UserMessage) for message in run.messages)


def _agent_driven(orchestrator: Orchestrator, workflow: str) -> bool:
    """Whether `workflow` starts with no user message (False for an unknown one: create_chat names it)."""
    try:
        return orchestrator.workflows.get(workflow).agent_driven
    except UnknownWorkflow:
        return False


async def _opening_turn(store: MongoEventStore, chat_id: str, message_id: str | None) -> int:
    """The seq a new chat's first AG-UI run starts at: the client's message, or (AgentDriven, no
    message) the workflow's hidden initial message, after which the agent speaks first."""
    if message_id is None:
        turn = await _first(store, chat_id, "message.user", "origin", "initial_message")
    else:
        turn = await _first(store, chat_id, "message.user", "message_id", message_id)
    assert turn is not None
    return turn.seq


def _answer_text(entry: ResumeEntry) -> str:
    payload = entry.payload
    if isinstance(payload, str):
        return payload
    if isinstance(payload, dict) and isinstance(payload.get("text"), str):
        return str(payload["text"])
    return json.dumps(payload)


async def _first(store: MongoEventStore, chat_id: str, type_: str, field: str, value: str) -> Record | None:
    """The chat's first record of `type_` whose `data[field]` is `value`."""
    async for record in store.find(chat_id, types=[type_]):
        if record.data.get(field) == value:
            return record
    return None


async def _resume(
    store: MongoEventStore,
    supervisor: RunSupervisor,
    principal: Principal,
    chat_id: str,
    entries: list[ResumeEntry],
) -> int:
    """Answer the interrupt the entries address; the run restarts from its `input.requested` (or `ui.requested`)."""
    ledger = await read_ledger(store, chat_id)
    for entry in entries:
        if entry.interrupt_id in ledger.exchanges:
            if entry.status == "cancelled":
                with contextlib.suppress(NoActiveRun):
                    await supervisor.stop(chat_id, by=principal.user_id)
                return ledger.exchanges[entry.interrupt_id].record.seq
            return await _answer_ui(store, supervisor, principal, chat_id, entry.interrupt_id, entry.payload)
    state = await chat_state(store, chat_id)
    entry = next((e for e in entries if e.interrupt_id == state.open_request), entries[0])
    asked = await _first(store, chat_id, "input.requested", "request_id", entry.interrupt_id)
    if asked is None:
        raise Refused(
            404, codes.UNKNOWN_INTERRUPT, f"resume: chat {chat_id} has no interrupt {entry.interrupt_id!r}"
        )
    if state.open_request == entry.interrupt_id:
        if entry.status == "cancelled":
            with contextlib.suppress(NoActiveRun):
                await supervisor.stop(chat_id, by=principal.user_id)
        else:
            await supervisor.post_message(chat_id, _answer_text(entry), request_id=entry.interrupt_id)
    # else: answered already (a repeated request), so only its run is streamed again.
    return asked.seq


async def _answer_ui(
    store: MongoEventStore,
    supervisor: RunSupervisor,
    principal: Principal,
    chat_id: str,
    request_id: str,
    answer: Any,
) -> int:
    """Answer a UI request (a `resume` entry or a `tool` message: this one path, validated like any
    answer); the AG-UI run restarts from the `run.suspended` its request ended its run with (or the
    `ui.requested`, when its run never got there). A repeated request records nothing."""
    exchange = (await read_ledger(store, chat_id)).get(chat_id, request_id)
    if exchange.outcome is None:
        await supervisor.answer_ui(chat_id, request_id, answer, principal.user_id)
    async for end in store.find(chat_id, types=["run.suspended"], after=exchange.record.seq):
        if request_id in (end.data.get("request_ids") or []):
            return end.seq
    return exchange.record.seq


def _tool_answer(message: ToolMessage) -> Any:
    """A `tool` message's answer: its content as JSON when it is JSON (a form's object, true), else the text."""
    text = _text_of(message.content)
    try:
        return json.loads(text)
    except ValueError:
        return text


async def begin(
    store: MongoEventStore,
    orchestrator: Orchestrator,
    supervisor: RunSupervisor,
    principal: Principal,
    workflow: str,
    run: RunAgentInput,
) -> int:
    """Record the request's turn (unless it is a repeat) and return the seq its AG-UI run starts at."""
    chat_id = run.thread_id
    first = await anext(store.read(chat_id, limit=1), None)
    if first is None:
        if run.resume:
            raise Refused(404, codes.UNKNOWN_CHAT, f"resume: chat {chat_id} does not exist")
        if run.state is not None and not isinstance(run.state, dict):
            raise Refused(
                400, codes.BAD_REQUEST, "state: a new chat's state must be an object (its context variables)"
            )
        # An AgentDriven workflow starts with no user message (its agent speaks first).
        agent_driven = _agent_driven(orchestrator, workflow) and not _has_user_message(run)
        message_id, text = (None, None) if agent_driven else _new_turn(run)
        # A spent budget (the app's or the user's) refuses (429) before anything is recorded.
        await refuse_over_budget(
            orchestrator,
            StreamRef(chat_id=chat_id, app_id=principal.app_id, user_id=principal.user_id, workflow=workflow),
        )
        try:
            stream = await orchestrator.create_chat(
                workflow=workflow,
                user_id=principal.user_id,
                app_id=principal.app_id,
                message=text,
                context=run.state or {},
                chat_id=chat_id,
                message_id=message_id,
            )
        except Conflict:  # the same thread started by a concurrent request: continue it instead
            return await begin(store, orchestrator, supervisor, principal, workflow, run)
        await supervisor.start(stream)
        return await _opening_turn(store, chat_id, message_id)
    await owned_chat(store, principal, chat_id, control=True)
    if first.workflow != workflow:
        raise Refused(
            409,
            codes.WRONG_WORKFLOW,
            f"thread {chat_id} is a chat of workflow {first.workflow}, not {workflow}",
        )
    if run.resume:
        return await _resume(store, supervisor, principal, chat_id, run.resume)
    if run.messages and isinstance(last := run.messages[-1], ToolMessage):
        # The answer to a UI tool's call, as a tool message for its toolCallId.
        calls = {e.request.tool_call_id: e for e in (await read_ledger(store, chat_id)).exchanges.values()}
        exchange = calls.get(last.tool_call_id)
        if exchange is None:
            raise Refused(
                404,
                codes.UNKNOWN_REQUEST,
                f"messages: chat {chat_id} has no UI request for tool call {last.tool_call_id!r}",
            )
        request_id = exchange.request.request_id
        return await _answer_ui(store, supervisor, principal, chat_id, request_id, _tool_answer(last))
    if _agent_driven(orchestrator, workflow) and not _has_user_message(run):
        return await _opening_turn(store, chat_id, None)  # the AgentDriven start, repeated
    message_id, text = _new_turn(run)
    repeated = await _first(store, chat_id, "message.user", "message_id", message_id)
    if repeated is not None:
        return repeated.seq
    waiting = (await chat_state(store, chat_id)).open_request
    if waiting is not None:  # AG-UI answers an interrupt with `resume`, never with a new message
        raise Refused(
            409,
            codes.INTERRUPT_PENDING,
            f"thread {chat_id} waits for an answer to interrupt {waiting}: send it in resume",
        )
    stream = StreamRef(chat_id=chat_id, app_id=first.app_id, user_id=first.user_id, workflow=first.workflow)
    await refuse_over_budget(orchestrator, stream)  # 429 when the chat, its app or its user spent its budget
    record = await supervisor.post_message(chat_id, text, message_id=message_id)
    return record.seq


@post(
    "/ag-ui/{workflow:str}",
    status_code=200,
    media_type="text/event-stream",
    summary="Run a workflow for an AG-UI client",
    response_description="text/event-stream of AG-UI events, each with `id: <seq>`",
    responses={
        200: ResponseSpec(
            data_container=str,
            media_type="text/event-stream",
            description="AG-UI events as server-sent events (`id: <seq>`, `data: <event JSON>`), until RUN_FINISHED or RUN_ERROR",
            generate_examples=False,
        ),
        **error_responses(401, 403, 404, 409, 413, 429),
    },
)
async def run_agent(
    request: Request[Principal, Any, Any],
    workflow: str,
    data: RunAgentInput,
    store: MongoEventStore,
    hub: LiveHub,
    orchestrator: Orchestrator,
    supervisor: RunSupervisor,
    settings: Settings,
) -> Stream:
    """AG-UI `RunAgentInput` in, `text/event-stream` of AG-UI events out, until RUN_FINISHED or RUN_ERROR.

    `threadId` is the chat id (a new one starts a chat of `workflow`, with `state` as its context);
    the last user message is the new turn; `resume` answers the interrupt a run ended with.
    `Last-Event-ID` (with the same body) resumes the stream after that event.
    """
    run = data
    after: tuple[int, float] = (0, -1.0)
    last_event = request.headers.get("last-event-id")
    if last_event:
        try:
            after = _position(last_event)
        except ValueError:
            raise Refused(
                400, codes.BAD_REQUEST, f"Last-Event-ID {last_event!r} is not an id this endpoint sent"
            ) from None
    start = await begin(store, orchestrator, supervisor, request.user, workflow, run)
    if after[0] and after[0] < start:
        raise Refused(
            400,
            codes.BAD_REQUEST,
            f"Last-Event-ID {last_event!r} lies before this run (it starts at seq {start})",
        )
    translator = RunTranslator(run.thread_id, run.run_id)
    return Stream(
        run_events(store, hub, settings.ws_heartbeat_s, run.thread_id, start, translator, after),
        media_type=_encoder.get_content_type(),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
