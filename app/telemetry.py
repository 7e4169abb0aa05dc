"""OpenTelemetry GenAI traces derived from the log: a run's records become spans, exported over OTLP/HTTP.

`run_spans` is a pure function of the records: one trace per run, a root `invoke_agent <workflow>`
span, an `invoke_agent <agent>` span per agent turn, a `chat <model>` span per model call (its
`llm.call` record), an `execute_tool <tool>` span per tool call (`tool.called` to `tool.result`),
with the attributes of the OpenTelemetry GenAI semantic conventions. Spans start and end at the
records' times (a model call ends at its record and started `latency_ms` before), and their trace
and span ids are hashes of chat id, run id and seq: a past chat exported with `mozaiks otel export`
gives the very trace the live export gave. Message content goes in only with
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true.

`TraceExport` is the live export: after a run's terminal record is stored, the node that ran it
reads the run's records and hands the spans to the SDK's batch processor (its own thread, its own
bounded queue), never on the path of each event; a collector that is down costs dropped spans and
a log line, never a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from app.settings import Settings
from domain.events import TERMINAL_TYPES, Record
from domain.store import MongoEventStore

log = structlog.get_logger("mozaiks.telemetry")

SCOPE: Final = InstrumentationScope("mozaiks.runtime")
PROVIDER: Final = "openai"
# Records whose `agent` is not one of the workflow's agents taking a turn.
_NOT_AGENTS: Final = frozenset({"_Group_Tool_Executor", "_User", "user", "chat_manager"})
# Records that show whose turn it is (their agent, or the speaker given the floor).
_TURN_TYPES: Final = frozenset(
    {"speaker.selected", "llm.call", "message.delta", "message.agent", "tool.called"}
)
CLOSE_WAIT_S: Final = 5.0
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _ns(ts: datetime) -> int:
    """Nanoseconds since the epoch, exactly (through microseconds, not a float)."""
    when = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    return ((when - _EPOCH) // timedelta(microseconds=1)) * 1000


def trace_id_of(chat_id: str, run_id: str) -> int:
    """The run's trace id: the same whenever its records are exported."""
    return int.from_bytes(hashlib.sha256(f"{chat_id}/{run_id}".encode()).digest()[:16], "big") or 1


def span_id_of(chat_id: str, run_id: str, seq: int, kind: str) -> int:
    """The id of the `kind` span starting at record `seq` of the run."""
    return (
        int.from_bytes(hashlib.sha256(f"{chat_id}/{run_id}/{seq}/{kind}".encode()).digest()[:8], "big") or 1
    )


def _text_message(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"type": "text", "content": text}]}


class _Span:
    """A span while the records are read (attributes still growing, end still moving)."""

    def __init__(
        self, name: str, kind: str, record: Record, parent: _Span | None, start: int, span_kind: SpanKind
    ) -> None:
        self.name = name
        self.span_id = span_id_of(record.chat_id, str(record.run_id), record.seq, kind)
        self.parent = parent
        self.start = start
        self.end = start
        self.span_kind = span_kind
        self.status = Status(StatusCode.UNSET)
        self.attributes: dict[str, Any] = {
            gen_ai.GEN_AI_OPERATION_NAME: kind,
            gen_ai.GEN_AI_CONVERSATION_ID: record.chat_id,
            "mozaiks.chat_id": record.chat_id,
            "mozaiks.run_id": str(record.run_id),
            "mozaiks.seq": record.seq,
        }
        self.outputs: list[dict[str, Any]] = []

    def reach(self, record: Record) -> None:
        """The span lasts at least until `record`."""
        self.end = max(self.end, _ns(record.ts))
        self.attributes["mozaiks.end_seq"] = record.seq

    def fail(self, error_type: str, description: str) -> None:
        self.status = Status(StatusCode.ERROR, description)
        self.attributes[ERROR_TYPE] = error_type

    def readable(self, trace_id: int, resource: Resource) -> ReadableSpan:
        def context(span_id: int) -> SpanContext:
            return SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))

        if self.outputs:
            self.attributes[gen_ai.GEN_AI_OUTPUT_MESSAGES] = json.dumps(self.outputs)
        return ReadableSpan(
            name=self.name,
            context=context(self.span_id),
            parent=context(self.parent.span_id) if self.parent is not None else None,
            resource=resource,
            attributes=self.attributes,
            kind=self.span_kind,
            status=self.status,
            start_time=self.start,
            end_time=max(self.end, self.start),
            instrumentation_scope=SCOPE,
        )


def _turn_agent(record: Record) -> str | None:
    if record.type not in _TURN_TYPES:
        return None
    agent = record.data.get("speaker") if record.type == "speaker.selected" else record.agent
    return agent if isinstance(agent, str) and agent and agent not in _NOT_AGENTS else None


def run_spans(
    records: Sequence[Record], run_id: str, resource: Resource, *, capture_content: bool = False
) -> list[ReadableSpan]:
    """The spans of run `run_id` of a chat (`records`: the chat's records, in seq order), root first.

    Empty while the run has no terminal record (a trace is exported once its run is over).
    """
    run = [record for record in records if record.run_id == run_id]
    started = next((record for record in run if record.type == "run.started"), None)
    terminal = next((record for record in reversed(run) if record.type in TERMINAL_TYPES), None)
    if started is None or terminal is None:
        return []
    root = _Span(
        f"invoke_agent {started.workflow}", "invoke_agent", started, None, _ns(started.ts), SpanKind.INTERNAL
    )
    root.attributes.update(
        {
            gen_ai.GEN_AI_AGENT_NAME: started.workflow,
            gen_ai.GEN_AI_WORKFLOW_NAME: started.workflow,
            gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
            "mozaiks.outcome": terminal.type,
            "mozaiks.pattern": str(started.data.get("pattern", "")),
        }
    )
    if started.data.get("model"):
        root.attributes[gen_ai.GEN_AI_REQUEST_MODEL] = str(started.data["model"])
    root.reach(terminal)
    if terminal.type == "run.failed":
        root.fail(str(terminal.data.get("reason", "error")), str(terminal.data.get("error", "")))
    if capture_content:
        asked = [r for r in records if r.type == "message.user" and r.seq < started.seq]
        if asked:
            root.attributes[gen_ai.GEN_AI_INPUT_MESSAGES] = json.dumps(
                [_text_message("user", str(asked[-1].data.get("content", "")))]
            )
    spans = [root]
    turn: _Span | None = None
    tools: dict[str, _Span] = {}
    for record in run:
        agent = _turn_agent(record)
        if agent is not None and (turn is None or turn.attributes[gen_ai.GEN_AI_AGENT_NAME] != agent):
            turn = _Span(
                f"invoke_agent {agent}", "invoke_agent", record, root, _ns(record.ts), SpanKind.INTERNAL
            )
            turn.attributes[gen_ai.GEN_AI_AGENT_NAME] = agent
            spans.append(turn)
        parent = turn or root
        if turn is not None and record.type not in TERMINAL_TYPES:
            turn.reach(record)
        match record.type:
            case "llm.call":
                spans.append(_model_call(record, parent))
            case "tool.called":
                called = _Span(
                    f"execute_tool {record.data['tool']}",
                    "execute_tool",
                    record,
                    parent,
                    _ns(record.ts),
                    SpanKind.INTERNAL,
                )
                called.attributes.update(
                    {
                        gen_ai.GEN_AI_TOOL_NAME: str(record.data["tool"]),
                        gen_ai.GEN_AI_TOOL_CALL_ID: str(record.data["call_id"]),
                        gen_ai.GEN_AI_TOOL_TYPE: "function",
                    }
                )
                if capture_content:
                    called.attributes[gen_ai.GEN_AI_TOOL_CALL_ARGUMENTS] = str(
                        record.data.get("arguments", "")
                    )
                tools[str(record.data["call_id"])] = called
                spans.append(called)
            case "tool.result":
                call = tools.pop(str(record.data.get("call_id")), None)
                if call is not None:
                    call.reach(record)
                    if record.data.get("is_error"):
                        call.fail("tool_error", "the tool returned an error")
                    if capture_content:
                        call.attributes[gen_ai.GEN_AI_TOOL_CALL_RESULT] = str(record.data.get("content", ""))
            case "message.agent" if capture_content and turn is not None:
                turn.outputs.append(_text_message("assistant", str(record.data.get("content", ""))))
    for call in tools.values():  # called, never answered: the run ended first
        call.reach(terminal)
        call.fail("no_result", "the run ended before the tool returned")
    for span in spans:  # a parent covers its children (a model call starts before its record)
        ancestor = span.parent
        while ancestor is not None:
            ancestor.start = min(ancestor.start, span.start)
            ancestor = ancestor.parent
    trace_id = trace_id_of(started.chat_id, run_id)
    return [span.readable(trace_id, resource) for span in spans]


def _model_call(record: Record, parent: _Span) -> _Span:
    data = record.data
    end = _ns(record.ts)
    model = str(data.get("model", ""))
    call = _Span(
        f"chat {model}",
        "chat",
        record,
        parent,
        end - int(float(data.get("latency_ms") or 0) * 1e6),
        SpanKind.CLIENT,
    )
    call.end = end
    call.attributes.update(
        {
            gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
            gen_ai.GEN_AI_REQUEST_MODEL: model,
            gen_ai.GEN_AI_USAGE_INPUT_TOKENS: int(data.get("prompt_tokens") or 0),
            gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: int(data.get("completion_tokens") or 0),
            "mozaiks.attempt": int(data.get("attempt") or 1),
            "mozaiks.offline": bool(data.get("offline")),
        }
    )
    if record.agent:
        call.attributes[gen_ai.GEN_AI_AGENT_NAME] = record.agent
    if data.get("finish_reason"):
        call.attributes[gen_ai.GEN_AI_RESPONSE_FINISH_REASONS] = (str(data["finish_reason"]),)
    if data.get("ttft_ms") is not None:
        call.attributes[gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = float(data["ttft_ms"]) / 1000
    status = str(data.get("status") or "ok")
    if status != "ok" or data.get("error"):
        call.fail(status if status != "ok" else "error", str(data.get("error") or status))
    return call


def trace_resource() -> Resource:
    """The exported spans' resource: OTEL_SERVICE_NAME (default `mozaiks`) and OTEL_RESOURCE_ATTRIBUTES."""
    return Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or "mozaiks"})


def chat_runs(records: Iterable[Record]) -> list[str]:
    """The ids of a chat's runs that are over, in order."""
    return [record.run_id for record in records if record.type in TERMINAL_TYPES and record.run_id]


def span_exporter(settings: Settings) -> OTLPSpanExporter:
    """The SDK's OTLP/HTTP exporter to OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT (headers, timeout from the OTel variables)."""
    return OTLPSpanExporter(endpoint=settings.otel_traces_endpoint)


class TraceExport:
    """Live export: each run's trace, built from its records once its terminal record is stored."""

    def __init__(self, store: MongoEventStore, settings: Settings) -> None:
        self.store = store
        self.capture_content = settings.otel_capture_content
        self.resource = trace_resource()
        self.processor = BatchSpanProcessor(span_exporter(settings))
        self._tasks: set[asyncio.Task[int]] = set()

    def run_ended(self, chat_id: str, run_id: str) -> None:
        """Called by the node that ran it, after the run's terminal record: export its trace in the background."""
        task = asyncio.create_task(self.export_run(chat_id, run_id), name=f"otel:{chat_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def export_run(self, chat_id: str, run_id: str) -> int:
        """Hand the run's spans to the batch processor; the number of spans (0 if reading failed)."""
        try:
            records = [record async for record in self.store.read(chat_id)]
            spans = run_spans(records, run_id, self.resource, capture_content=self.capture_content)
        except Exception as exc:  # noqa: BLE001 - a trace is never worth a run: log and go on
            log.warning("otel.export_failed", chat_id=chat_id, run_id=run_id, error=repr(exc))
            return 0
        for span in spans:
            self.processor.on_end(span)
        return len(spans)

    async def close(self) -> None:
        """Finish the exports under way, then flush the processor (bounded by the exporter's timeout)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_WAIT_S)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.processor.shutdown)
