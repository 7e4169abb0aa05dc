"""UI tools: an agent puts a component in front of the user (a form, a choice, a confirm) and waits for
the answer, or shows an artifact panel and goes on at once.

The log is the only state of a request. The tool's call appends `ui.requested` (through the run's
recorder, right after its `tool.called`), and a request that waits (form, choice, confirm) ends the
run `run.suspended`: no task, lease or AG2 object is kept while the user takes their time. An answer
is validated against the request as stored, then appended as `ui.responded` under the chat's
optimistic-concurrency guard (so two answers, or an answer and an expiry, can never both land),
together with the call's `tool.result`; the chat's next run is rebuilt from the log with the tool
call and that result in place (`exchange_messages`), on whichever node recorded the answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import jsonschema
import msgspec
from jsonschema.exceptions import best_match

from app.runs.workflows import Tool
from domain.errors import Conflict, MozaiksError
from domain.events import (
    Pending,
    Record,
    StreamRef,
    ToolResult,
    UiExpired,
    UiRequested,
    UiResponded,
    new_id,
)
from domain.store import MongoEventStore

if TYPE_CHECKING:
    from autogen import ConversableAgent  # AG2 is loaded by the run that registers a UI tool

# The components that wait for the user; an artifact is shown and its call returns at once.
WAITING: Final = frozenset({"form", "choice", "confirm"})
UI_TYPES: Final = ("tool.called", "tool.result", "ui.requested", "ui.responded", "ui.expired")

# The model's arguments are the component's props: these are the tool's parameters as the model
# sees them, and the props are checked against them before anything is recorded.
PROPS: Final[Mapping[str, dict[str, Any]]] = {
    "form": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "description": "what the form is for"},
            "schema": {
                "type": "object",
                "description": "a JSON Schema object (type object, properties, required) of the answer",
            },
        },
        "required": ["title", "schema"],
    },
    "choice": {
        "type": "object",
        "properties": {
            "question": {"type": "string"},
            "options": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        },
        "required": ["question", "options"],
    },
    "confirm": {
        "type": "object",
        "properties": {"question": {"type": "string"}},
        "required": ["question"],
    },
    "artifact": {
        "type": "object",
        "properties": {
            "artifact_id": {"type": "string", "description": "the same id updates the panel in place"},
            "title": {"type": "string"},
            "format": {"type": "string", "enum": ["markdown", "code", "table"]},
            "content": {"type": "string"},
        },
        "required": ["artifact_id", "title", "format", "content"],
    },
}


class UnknownUiRequest(MozaiksError):
    """No UI request of the chat has this id (404)."""

    def __init__(self, chat_id: str, request_id: str) -> None:
        super().__init__(f"chat {chat_id} has no UI request {request_id!r}")


class UiRequestClosed(MozaiksError):
    """The request was answered already, has expired, or shows an artifact nobody answers (409)."""

    def __init__(self, request_id: str, why: str) -> None:
        super().__init__(f"UI request {request_id} {why}")


class InvalidAnswer(MozaiksError):
    """The answer does not fit the request (422): `path` is the failing JSON path of the answer."""

    def __init__(self, request_id: str, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"answer to UI request {request_id} at {path}: {message}")


def json_path(parts: Any) -> str:
    """`$.a[0].b` of a jsonschema error's absolute path."""
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def props_problem(component: str, props: Mapping[str, Any]) -> str | None:
    """What is wrong with a UI tool call's props (the model's arguments), or None."""
    error = best_match(jsonschema.Draft202012Validator(PROPS[component]).iter_errors(props))
    if error is not None:
        return f"{json_path(error.absolute_path)}: {error.message}"
    if component == "form":
        schema = props["schema"]
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            return f"$.schema{json_path(exc.absolute_path)[1:]}: not a valid JSON Schema: {exc.message}"
    return None


def check_answer(request: UiRequested, answer: Any) -> None:
    """Raise InvalidAnswer unless `answer` fits the request: a form's schema, a choice's options, a boolean."""
    match request.component:
        case "form":
            schema = request.props.get("schema") or {}
            validator = jsonschema.validators.validator_for(schema)(schema)
            error = best_match(validator.iter_errors(answer))
            if error is not None:
                raise InvalidAnswer(request.request_id, json_path(error.absolute_path), error.message)
        case "choice":
            options = list(request.props.get("options") or [])
            if answer not in options:
                raise InvalidAnswer(
                    request.request_id, "$", f"{answer!r} is not one of the options {options}"
                )
        case "confirm":
            if not isinstance(answer, bool):
                raise InvalidAnswer(request.request_id, "$", f"{answer!r} is not a boolean (true or false)")
        case _:
            raise UiRequestClosed(request.request_id, "shows an artifact: there is nothing to answer")


def result_text(tool: Tool | None, request: UiRequested, outcome: UiResponded | UiExpired) -> str:
    """The tool's result for the agent: the answer as JSON (or the tool's function's result on it), or no answer."""
    if isinstance(outcome, UiExpired):
        return f"No answer: the user did not answer the {request.component} before it expired."
    if tool is not None and tool.function is not None:
        return str(tool.function(outcome.answer))
    return json.dumps(outcome.answer)


def expiry(timeout_s: float | None) -> str | None:
    """`expires_at` of a request made now (ISO 8601, UTC, milliseconds), or None without a timeout."""
    if timeout_s is None:
        return None
    at = datetime.now(UTC) + timedelta(seconds=timeout_s)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def seconds_left(expires_at: str | None) -> float | None:
    """Seconds until `expires_at` (<= 0: due), None when the request never expires."""
    if expires_at is None:
        return None
    return (datetime.fromisoformat(expires_at.replace("Z", "+00:00")) - datetime.now(UTC)).total_seconds()


class UiNote(msgspec.Struct, frozen=True):
    """A UI tool was called: becomes `ui.requested` (the recorder fills in the tool call's id)."""

    request: UiRequested


class Exchange(msgspec.Struct, kw_only=True):
    """One UI request as the chat's log tells it: the call, the request and how it ended so far."""

    request: UiRequested
    record: Record
    called: Record | None = None
    outcome: UiResponded | UiExpired | None = None
    result: Record | None = None


class UiLedger(msgspec.Struct, kw_only=True):
    """A chat's UI requests, read from its log, and the last seq read (the guard for the next append)."""

    last_seq: int
    exchanges: dict[str, Exchange]

    def get(self, chat_id: str, request_id: str) -> Exchange:
        """The request by id; UnknownUiRequest when the chat has none of that id."""
        exchange = self.exchanges.get(request_id)
        if exchange is None:
            raise UnknownUiRequest(chat_id, request_id)
        return exchange


def fold_exchanges(records: list[Record]) -> dict[str, Exchange]:
    """The UI requests among a chat's records (tool calls, requests, answers, expiries, results)."""
    calls: dict[str, Record] = {}
    exchanges: dict[str, Exchange] = {}
    by_call: dict[str, Exchange] = {}
    for record in records:
        match record.type:
            case "tool.called":
                calls[str(record.data.get("call_id"))] = record
            case "ui.requested":
                request = record.event
                assert isinstance(request, UiRequested)
                exchange = Exchange(request=request, record=record, called=calls.get(request.tool_call_id))
                exchanges[request.request_id] = by_call[request.tool_call_id] = exchange
            case "ui.responded" | "ui.expired":
                outcome = record.event
                assert isinstance(outcome, UiResponded | UiExpired)
                known = exchanges.get(outcome.request_id)
                if known is not None and known.outcome is None:
                    known.outcome = outcome
            case "tool.result":
                known = by_call.get(str(record.data.get("call_id")))
                if known is not None:
                    known.result = record
    return exchanges


def result_pending(
    exchange: Exchange, outcome: UiResponded | UiExpired, tools: Mapping[str, Tool]
) -> Pending:
    """The `tool.result` of a request whose run is gone (nobody waits in the tool to return it)."""
    request = exchange.request
    content = result_text(tools.get(request.tool), request, outcome)
    return Pending(
        event=ToolResult(tool=request.tool, call_id=request.tool_call_id, content=content),
        agent=exchange.record.agent,
        run_id=exchange.record.run_id,
        visible=exchange.called.visible if exchange.called is not None else True,
    )


def results_missing(ledger: UiLedger, tools: Mapping[str, Tool]) -> list[Pending]:
    """The `tool.result`s of requests answered (or expired) after their run was gone, not recorded yet."""
    return [
        result_pending(e, e.outcome, tools)
        for e in ledger.exchanges.values()
        if e.outcome is not None and e.result is None
    ]


async def read_ledger(store: MongoEventStore, chat_id: str) -> UiLedger:
    """The chat's UI requests as its log has them now, with the seq an append must follow."""
    last_seq = await store.last_seq(chat_id)  # first: the requests read next are at least this new
    records = [record async for record in store.find(chat_id, types=list(UI_TYPES))]
    return UiLedger(last_seq=max([last_seq, *(r.seq for r in records)]), exchanges=fold_exchanges(records))


async def record_outcome(
    store: MongoEventStore,
    stream: StreamRef,
    request_id: str,
    outcome: UiResponded | UiExpired,
    *,
    tools: Mapping[str, Tool],
) -> list[Record]:
    """Append the answer (validated) or the expiry of an open request, with its tool call's result.

    Nobody waits in the tool (the run that asked ended `run.suspended`, or its node is gone): the
    tool's result is appended with the answer, so the chat's next run finds the call answered.
    Appended right after the log as read (a Conflict reads again), so a request is closed exactly once.
    Raises UnknownUiRequest, UiRequestClosed, InvalidAnswer; nothing is recorded then.
    """
    for _ in range(8):
        ledger = await read_ledger(store, stream.chat_id)
        exchange = ledger.get(stream.chat_id, request_id)
        request = exchange.request
        if exchange.outcome is not None:
            closed = "was answered already" if isinstance(exchange.outcome, UiResponded) else "has expired"
            raise UiRequestClosed(request_id, closed)
        if request.component not in WAITING:
            raise UiRequestClosed(request_id, "shows an artifact: there is nothing to answer")
        if isinstance(outcome, UiResponded):
            left = seconds_left(request.expires_at)
            if left is not None and left <= 0:
                raise UiRequestClosed(request_id, "has expired")
            check_answer(request, outcome.answer)
        pendings = [Pending(event=outcome, run_id=exchange.record.run_id, agent=exchange.record.agent)]
        if exchange.result is None:
            pendings.append(result_pending(exchange, outcome, tools))
        try:
            return await store.append(stream, pendings, expected_seq=ledger.last_seq)
        except Conflict:
            continue  # the log moved on (the run recorded something): read it again
    raise Conflict(
        stream.chat_id, ledger.last_seq, f"the log kept moving while UI request {request_id} was closed"
    )


def exchange_messages(exchange: Exchange) -> list[dict[str, Any]]:
    """A closed UI request as AG2 history: the agent's tool call, then its result (the answer).

    After a run suspended on the request, these are the history's last messages: AG2 resumes the group
    chat from them (the tool executor spoke last), so the calling agent goes on with the answer as
    if its run had never stopped.
    """
    assert exchange.called is not None and exchange.result is not None
    call = exchange.called.data
    return [
        {
            "role": "assistant",
            "name": exchange.called.agent,
            "content": None,
            "tool_calls": [
                {
                    "id": call["call_id"],
                    "type": "function",
                    "function": {"name": call["tool"], "arguments": call["arguments"]},
                }
            ],
        },
        {
            "role": "tool",
            "name": "_Group_Tool_Executor",
            "tool_call_id": call["call_id"],
            "content": exchange.result.data["content"],
            "tool_responses": [
                {"tool_call_id": call["call_id"], "role": "tool", "content": exchange.result.data["content"]}
            ],
        },
    ]


class UiDesk:
    """A run's UI tools: records the request through the run's stream; a waiting one suspends the run.

    Nothing here is the request's state. A form, choice or confirm asks the run to end
    `run.suspended` (its AG2 task is cancelled while the call waits here for ever); the answer is
    recorded with the call's `tool.result` and continues the chat in a new run (`exchange_messages`).
    """

    def __init__(self, emit: Callable[[Any], None], suspend: Callable[[UiRequested], None]) -> None:
        self.emit = emit
        self.suspend = suspend

    async def ask(self, tool: Tool, props: dict[str, Any]) -> str:
        """Run one UI tool call: record the request; an artifact returns at once, a question suspends the run."""
        ui = tool.spec.ui
        assert ui is not None
        problem = props_problem(ui.component, props)
        if problem is not None:
            raise ValueError(
                f"{tool.spec.name}: {problem}"
            )  # AG2 returns it to the agent as the call's error
        waits = ui.component in WAITING
        request = UiRequested(
            request_id=new_id(),
            tool_call_id="",
            tool=tool.spec.name,
            component=ui.component,
            mode=ui.mode,
            props=props,
            expires_at=expiry(ui.timeout_s) if waits else None,
        )
        self.emit(UiNote(request))
        if not waits:
            return f"artifact {props['artifact_id']!r} shown"
        self.suspend(request)  # the run ends here: its AG2 task (this call with it) is cancelled
        await asyncio.get_running_loop().create_future()
        raise AssertionError("a suspended run's UI call never returns")  # pragma: no cover


def register_ui_tool(agent: ConversableAgent, tool: Tool, desk: UiDesk) -> None:
    """Offer a UI tool to the agent's model (its props as parameters) and let the group execute it."""
    ui = tool.spec.ui
    assert ui is not None

    async def call(**props: Any) -> str:
        return await desk.ask(tool, props)

    agent.update_tool_signature(
        {
            "type": "function",
            "function": {
                "name": tool.spec.name,
                "description": tool.description,
                "parameters": PROPS[ui.component],
            },
        },
        is_remove=False,
        silent_override=True,
    )
    agent.register_function({tool.spec.name: call}, silent_override=True)
