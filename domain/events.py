"""Event types, the stored record (envelope) and the canonical JSON its hash chain is computed over.

Tags never change; new fields are added only with defaults, so every stored record stays decodable.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

SCHEMA_VERSION: Final = 1
GENESIS_HASH: Final = "0" * 64


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every event; the tag is the stable `type` stored in the log."""


class ForkedFrom(msgspec.Struct, frozen=True, kw_only=True):
    """Where a fork comes from: the parent chat, the seq it was forked at and that record's hash."""

    chat_id: str
    seq: int
    hash: str


class ParentRef(msgspec.Struct, frozen=True, kw_only=True):
    """A child workflow's parent: the chat that started it and the seq of its `child.started` there."""

    chat_id: str
    seq: int


class ChatCreated(Event, tag="chat.created", frozen=True, kw_only=True):
    context: dict[str, Any] = {}
    offline: bool = False
    # A fork (see domain/lineage.py): the parent's record it continues from, anchoring its chain.
    forked_from: ForkedFrom | None = None
    # A child workflow (app/runs/children.py): the parent chat and its `child.started` record.
    parent: ParentRef | None = None
    # A replay (`mozaiks replay`): {"chat_id": the chat it replays, "model": "recorded" | "live"}.
    replay_of: dict[str, Any] | None = None


class RunStarted(Event, tag="run.started", frozen=True, kw_only=True):
    pattern: str
    max_turns: int
    offline: bool = False
    model: str | None = None
    node: str | None = None


class MessageUser(Event, tag="message.user", frozen=True, kw_only=True):
    content: str
    # The client's own id for the message (AG-UI `Message.id`), so a retried request is recognised.
    message_id: str | None = None
    # Where the text came from when no user typed it: "initial_message" (workflow.json, recorded hidden).
    origin: str | None = None


class MessageAgent(Event, tag="message.agent", frozen=True, kw_only=True):
    content: str
    role: str = "assistant"
    recipient: str | None = None
    # The streamed message this completes: its `message.delta` records concatenate to `content`.
    message_id: str = ""
    # An agent with a structured output: the validated object (`content` is its JSON text).
    structured: dict[str, Any] | None = None
    # "fork": copied from the parent chat when the chat was forked (not a turn of this chat).
    origin: str | None = None


class MessageDelta(Event, tag="message.delta", frozen=True, kw_only=True):
    """A piece of an agent's message as the model streamed it (coalesced over the flush window)."""

    message_id: str
    # 0, 1, 2, ... per message, in log order.
    index: int
    text: str


class ToolCalled(Event, tag="tool.called", frozen=True, kw_only=True):
    tool: str
    call_id: str
    # The arguments exactly as the model produced them (JSON text), never re-encoded.
    arguments: str


class ToolResult(Event, tag="tool.result", frozen=True, kw_only=True):
    tool: str
    call_id: str
    content: str
    is_error: bool = False


class Handoff(Event, tag="handoff", frozen=True, kw_only=True):
    source: str | None = None
    target: str
    kind: str = "handoff"
    reason: str = ""
    # kind "context_condition": the workflow's expression that fired.
    expression: str | None = None


class SpeakerSelected(Event, tag="speaker.selected", frozen=True, kw_only=True):
    speaker: str


class InputRequested(Event, tag="input.requested", frozen=True, kw_only=True):
    request_id: str
    prompt: str = ""


class InputReceived(Event, tag="input.received", frozen=True, kw_only=True):
    request_id: str | None = None
    text: str


class LlmCall(Event, tag="llm.call", frozen=True, kw_only=True):
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    finish_reason: str | None = None
    offline: bool = False
    error: str | None = None
    # Streaming: call start -> first streamed token, and first -> last token (None: nothing streamed).
    ttft_ms: float | None = None
    stream_ms: float | None = None
    # "ok", or what went wrong with this try: "http_429", "http_503", "timeout", "connection", "error".
    status: str = "ok"
    # Which try of the call this was (1 = first); failed tries are recorded too, each as its own llm.call.
    attempt: int = 1
    # Model I/O (domain/model_io.py): the request's part hashes (parameters, tools, each message),
    # the response's; `io` says what was kept: "full" (parts stored), "hashes" (no content), "off".
    request: list[str] = []
    response: str | None = None
    io: str = "off"


class SchemaViolation(msgspec.Struct, frozen=True, kw_only=True):
    """One way a value breaks a JSON Schema: where (a JSON path, `$` the root) and what."""

    path: str
    message: str


class OutputInvalid(Event, tag="output.invalid", frozen=True, kw_only=True):
    """A structured-output agent's reply that did not match its schema (the agent is asked again)."""

    agent: str
    # The structured output's name (agents.json or structured_outputs.json).
    output: str
    # 1 = the first reply of this turn.
    attempt: int
    errors: list[SchemaViolation]
    # The reply's text as the model wrote it.
    content: str = ""


class FileUploaded(Event, tag="file.uploaded", frozen=True, kw_only=True):
    """A file given to the chat: stored in GridFS under its sha256 (see domain/files.py)."""

    sha256: str
    name: str
    size: int
    content_type: str


class ContextUpdated(Event, tag="context.updated", frozen=True, kw_only=True):
    # The changed variables and their new values (None: removed); the fold a continued chat starts from.
    variables: dict[str, Any]
    # One variable's change (hooks, derivations, tools): its name, old and new value, and the seq
    # of the record that caused it (a tool.called, hook.called, message.agent, message.user ...).
    name: str | None = None
    old: Any = None
    new: Any = None
    cause: int | None = None


class HookCalled(Event, tag="hook.called", frozen=True, kw_only=True):
    """A workflow hook ran: which, where, how long, and what it did to the context."""

    event: str
    function: str
    duration_ms: float = 0.0
    # "ok" | "refused" (a before_tool hook refused the call) | "error" (it raised or timed out).
    outcome: str = "ok"
    reason: str | None = None
    error: str | None = None
    tool: str | None = None
    changes: dict[str, Any] = {}


class RunCompleted(Event, tag="run.completed", frozen=True, kw_only=True):
    summary: str | None = None


class RunFailed(Event, tag="run.failed", frozen=True, kw_only=True):
    error: str
    # Why: "interrupted" (its node died or shut down), "storage" (database errors past the retry
    # budget), "model" (LLM errors past the retry budget), "tool", "setup" (the workflow could not
    # be built), "output" (a structured-output agent's replies never matched its schema);
    # "error" for anything else (a bug). A user's stop is `run.stopped`, never this.
    reason: str = "error"


class RunStopped(Event, tag="run.stopped", frozen=True, kw_only=True):
    by: str | None = None
    # None: someone stopped it; "budget": a spend limit was reached before a model call.
    reason: str | None = None
    # reason "budget": {"limit": "chat.max_tokens" ..., "spend": N, "max": N, "resets_at": ISO | None}.
    budget: dict[str, Any] | None = None


class RunSuspended(Event, tag="run.suspended", frozen=True, kw_only=True):
    """The run ended waiting on the user: the UI requests (form, choice, confirm) it asked last.

    A terminal record like the others: the run's task, lease and AG2 objects are gone, and the chat
    is a state in the log. The answer (or expiry) of a request records its `tool.result` and starts
    the chat's next run, which AG2 resumes from the tool call and that result.
    """

    request_ids: list[str] = []
    # The earliest `expires_at` of those requests (ISO 8601, UTC, ms); None: they wait for ever.
    expires_at: str | None = None


class Ag2Event(Event, tag="ag2.event", frozen=True, kw_only=True):
    name: str


class UiRequested(Event, tag="ui.requested", frozen=True, kw_only=True):
    """An agent called a UI tool: the component it puts in front of the user (the model's arguments are its props)."""

    request_id: str
    # The model's tool call this request answers (the `tool.called` record before it has the same id).
    tool_call_id: str
    tool: str
    # "form" | "choice" | "confirm" | "artifact".
    component: str
    # "inline" (in the conversation) | "artifact" (a side panel).
    mode: str = "inline"
    props: dict[str, Any] = {}
    # When an unanswered request expires (ISO 8601, UTC); None: it waits for ever. Artifacts never wait.
    expires_at: str | None = None


class UiResponded(Event, tag="ui.responded", frozen=True, kw_only=True):
    """The user's answer to a UI request, validated before it was recorded."""

    request_id: str
    answer: Any = None
    user_id: str | None = None


class UiExpired(Event, tag="ui.expired", frozen=True, kw_only=True):
    """A UI request's `timeout_s` passed with no answer: the agent is told there was none."""

    request_id: str


class ChildStarted(Event, tag="child.started", frozen=True, kw_only=True):
    """An agent called a child-workflow tool: a new chat of `workflow` runs the tool's message."""

    child_chat_id: str
    workflow: str
    # The tools.json entry that started it.
    tool: str = ""


class ChildCompleted(Event, tag="child.completed", frozen=True, kw_only=True):
    """A child chat's run ended; `result` (its last visible agent message) is the tool's result."""

    child_chat_id: str
    # The child's terminal record type: "run.completed", "run.failed" or "run.stopped".
    outcome: str
    result: str = ""
    # Set when the tool's result is an error (the child failed, was stopped or interrupted).
    error: str | None = None


AnyEvent = (
    ChatCreated
    | RunStarted
    | MessageUser
    | MessageAgent
    | MessageDelta
    | ToolCalled
    | ToolResult
    | Handoff
    | SpeakerSelected
    | InputRequested
    | InputReceived
    | LlmCall
    | ContextUpdated
    | FileUploaded
    | HookCalled
    | OutputInvalid
    | RunCompleted
    | RunFailed
    | RunStopped
    | RunSuspended
    | Ag2Event
    | UiRequested
    | UiResponded
    | UiExpired
    | ChildStarted
    | ChildCompleted
)

EVENT_TYPES: Final[frozenset[str]] = frozenset(str(cls.__struct_config__.tag) for cls in AnyEvent.__args__)
# Every run.started gets exactly one of these; `run.suspended` ends a run that waits on the user.
TERMINAL_TYPES: Final = frozenset({"run.completed", "run.failed", "run.stopped", "run.suspended"})


def new_id() -> str:
    """A fresh event id, fixed before the first append try so retries stay idempotent."""
    return uuid.uuid4().hex


def now() -> datetime:
    """Current UTC time at the precision BSON stores (milliseconds), so hashes survive a round trip."""
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


class StreamRef(msgspec.Struct, frozen=True, kw_only=True):
    """Who a chat's log belongs to: copied into every record's envelope."""

    chat_id: str
    app_id: str
    user_id: str
    workflow: str


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    """An event not yet in the log, with its envelope fields; `id` is fixed here, before any try."""

    event: AnyEvent
    agent: str | None = None
    visible: bool = True
    run_id: str | None = None
    ag2: str | None = None
    id: str = msgspec.field(default_factory=new_id)


class Record(msgspec.Struct, frozen=True, kw_only=True, rename={"id": "_id"}):
    """One immutable entry of the `events` collection (field names are the contract)."""

    id: str
    chat_id: str
    seq: int
    type: str
    ts: datetime
    app_id: str
    user_id: str
    workflow: str
    run_id: str | None
    agent: str | None
    visible: bool
    data: dict[str, Any]
    # The original AG2 event as the exact JSON text it was serialised to, when it came from AG2.
    ag2: str | None = None
    v: int = SCHEMA_VERSION
    prev_hash: str
    hash: str

    @property
    def event(self) -> AnyEvent:
        """The typed event this record carries."""
        return decode_event(self.type, self.data)

    def public(self) -> dict[str, Any]:
        """The record as clients see it: without the raw AG2 event and the hash chain."""
        doc = to_document(self)
        for key in ("_id", "ag2", "prev_hash", "hash"):
            doc.pop(key, None)
        doc["id"] = self.id
        doc["ts"] = self.ts.isoformat().replace("+00:00", "Z")
        return doc


_canonical = msgspec.json.Encoder(order="sorted")


class _EventBox(msgspec.Struct, frozen=True):
    event: AnyEvent


def decode_event(type_: str, data: Mapping[str, Any]) -> AnyEvent:
    """Decode one event payload by its tag; raises msgspec.ValidationError on a bad tag or field."""
    # Through a Struct field: msgspec caches the plan for a Struct, not for a bare union (~40x faster).
    return msgspec.convert({"event": {**data, "type": type_}}, _EventBox).event


def event_payload(event: Event) -> dict[str, Any]:
    """The event's fields as stored under `data` (the tag lives in the envelope's `type`)."""
    payload: dict[str, Any] = msgspec.to_builtins(event)
    payload.pop("type", None)
    return payload


def event_tag(event: Event) -> str:
    """The stable type tag of an event."""
    return str(type(event).__struct_config__.tag)


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """Canonical JSON of a stored document without its `hash`: sorted keys, no whitespace."""
    body = {k: v for k, v in document.items() if k != "hash"}
    return _canonical.encode(body)


def chain_hash(prev_hash: str, document: Mapping[str, Any]) -> str:
    """sha256 over the previous hash and the canonical JSON of the record without `hash`."""
    digest = hashlib.sha256(prev_hash.encode())
    digest.update(canonical_json(document))
    return digest.hexdigest()


def seal(stream: StreamRef, pending: Pending, seq: int, prev_hash: str, ts: datetime) -> dict[str, Any]:
    """Build the stored document of `pending` at `seq`, chained to `prev_hash`."""
    doc: dict[str, Any] = {
        "_id": pending.id,
        "chat_id": stream.chat_id,
        "seq": seq,
        "type": event_tag(pending.event),
        "ts": ts,
        "app_id": stream.app_id,
        "user_id": stream.user_id,
        "workflow": stream.workflow,
        "run_id": pending.run_id,
        "agent": pending.agent,
        "visible": pending.visible,
        "data": event_payload(pending.event),
        "ag2": pending.ag2,
        "v": SCHEMA_VERSION,
        "prev_hash": prev_hash,
    }
    doc["hash"] = chain_hash(prev_hash, doc)
    return doc


def upcast(document: dict[str, Any]) -> dict[str, Any]:
    """Bring an older stored shape up to the current one on read (stored records are never rewritten)."""
    # Version 1 is the first shape; later versions add a branch here, keyed on document["v"].
    return document


def to_record(document: Mapping[str, Any]) -> Record:
    """Decode a stored document, validating its envelope and its event payload.

    Raises CorruptRecord naming the chat and seq when the document is malformed.
    """
    from domain.errors import CorruptRecord

    chat_id = str(document.get("chat_id", "?"))
    seq = document.get("seq", "?")
    try:
        record = msgspec.convert(upcast(dict(document)), Record)
        decode_event(record.type, record.data)
    except (msgspec.ValidationError, TypeError) as exc:
        raise CorruptRecord(chat_id, seq, str(exc)) from exc
    return record


def to_document(record: Record) -> dict[str, Any]:
    """The stored document of a record (datetimes kept as datetimes for BSON)."""
    doc: dict[str, Any] = msgspec.to_builtins(record, builtin_types=(datetime,))
    return doc
