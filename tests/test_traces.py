"""OpenTelemetry GenAI traces from the log, received by a local OTLP/HTTP receiver (protobuf decoded with
opentelemetry-proto): one trace per run with the conventions' names and attributes, the right parents
and the records' times; no message content unless enabled; `mozaiks otel export` sends the same trace."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from app.cli import main
from app.embedded import free_port
from app.settings import Settings
from app.telemetry import TraceExport, _ns, run_spans, trace_resource
from domain.events import Record
from domain.store import MongoEventStore
from tests.cli import invoke
from tests.nodes import QuietHandler, http_server

CONTENT_KEYS = {
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    return getattr(value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 keeping every span it is sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.services: set[str] = set()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
                for resource_spans in request.resource_spans:
                    for attribute in resource_spans.resource.attributes:
                        if attribute.key == "service.name":
                            receiver.services.add(_value(attribute.value))
                    for scope_spans in resource_spans.scope_spans:
                        receiver.spans.extend(
                            {
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "name": span.name,
                                "kind": span.kind,
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                                "status": span.status.code,
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                            }
                            for span in scope_spans.spans
                        )
                self.reply(ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

        self.handler = Handler
        self.url = ""  # once served


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    with http_server(found.handler) as url:
        found.url = url
        yield found


def by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [span for span in spans if span["name"] == name]


def check_trace(spans: list[dict[str, Any]], records: list[Record]) -> None:
    """The trace of a chat's one run, against the records it was built from."""
    at = {record.seq: record for record in records}
    assert len({span["trace_id"] for span in spans}) == 1
    assert len({span["span_id"] for span in spans}) == len(spans)
    [root] = [span for span in spans if not span["parent"]]
    started = next(r for r in records if r.type == "run.started")
    terminal = records[-1]
    assert terminal.type == "run.completed"
    assert root["name"] == "invoke_agent Analyzer"
    assert root["attributes"]["gen_ai.operation.name"] == "invoke_agent"
    assert root["attributes"]["gen_ai.agent.name"] == "Analyzer"
    assert (root["start"], root["end"]) == (_ns(started.ts), _ns(terminal.ts))
    for span in spans:
        assert span["attributes"]["gen_ai.conversation.id"] == started.chat_id
        assert span["attributes"]["mozaiks.chat_id"] == started.chat_id
        assert span["attributes"]["mozaiks.seq"] in at
        assert root["start"] <= span["start"] <= span["end"] <= root["end"], span["name"]
        assert not CONTENT_KEYS & set(span["attributes"]), span["name"]  # content only when enabled
    ids = {span["span_id"]: span for span in spans}
    turns = [span for span in spans if span["parent"] == root["span_id"]]
    agents = [turn["attributes"]["gen_ai.agent.name"] for turn in turns]
    assert agents[:3] == ["Collector", "Analyst", "Summarizer"] and all(
        turn["name"] == f"invoke_agent {turn['attributes']['gen_ai.agent.name']}" for turn in turns
    )
    chats = [span for span in spans if span["name"].startswith("chat ")]
    llm_calls = [record for record in records if record.type == "llm.call"]
    assert len(chats) == len(llm_calls) >= 4
    for span in chats:
        record = at[span["attributes"]["mozaiks.seq"]]
        assert span["name"] == f"chat {record.data['model']}"
        assert ids[span["parent"]]["attributes"]["gen_ai.agent.name"] == record.agent  # the agent's turn
        attributes = span["attributes"]
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.request.model"] == record.data["model"]
        assert attributes["gen_ai.usage.input_tokens"] == record.data["prompt_tokens"]
        assert attributes["gen_ai.usage.output_tokens"] == record.data["completion_tokens"]
        assert attributes["gen_ai.response.finish_reasons"] == (record.data["finish_reason"],)
        if record.data["ttft_ms"] is not None:
            assert attributes["gen_ai.response.time_to_first_chunk"] == record.data["ttft_ms"] / 1000
        assert span["end"] == _ns(record.ts)
        assert span["end"] - span["start"] == int(record.data["latency_ms"] * 1e6)
    [tool] = by_name(spans, "execute_tool text_statistics")
    called = at[tool["attributes"]["mozaiks.seq"]]
    result = next(
        r for r in records if r.type == "tool.result" and r.data["call_id"] == called.data["call_id"]
    )
    assert tool["attributes"]["gen_ai.operation.name"] == "execute_tool"
    assert tool["attributes"]["gen_ai.tool.name"] == "text_statistics"
    assert (tool["start"], tool["end"]) == (_ns(called.ts), _ns(result.ts))
    assert ids[tool["parent"]]["attributes"]["gen_ai.agent.name"] == "Collector"


async def test_a_run_is_exported_as_one_genai_trace_and_a_past_export_sends_the_same_one(
    start_node: Any,
    receiver: Receiver,
    store: MongoEventStore,
    mongo_uri: str,
    db_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the batch processor's wait before it sends
    monkeypatch.setenv("OTEL_SERVICE_NAME", "mozaiks-test")
    node = await start_node(otel_traces_endpoint=f"{receiver.url}/v1/traces")
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        started = await http.post("/api/chats", json={"workflow": "Analyzer", "message": "Count these words"})
        assert started.status_code == 201, started.text
        chat_id = started.json()["chat_id"]
    async with asyncio.timeout(30):
        while not any(
            s["attributes"].get("mozaiks.chat_id") == chat_id and not s["parent"] for s in receiver.spans
        ):
            await asyncio.sleep(0.05)
    records = [record async for record in store.read(chat_id)]
    live = [s for s in receiver.spans if s["attributes"].get("mozaiks.chat_id") == chat_id]
    check_trace(live, records)
    assert receiver.services == {"mozaiks-test"}

    # The content goes in only when asked for.
    [run_id] = {r.run_id for r in records if r.run_id}
    with_content = run_spans(records, run_id, trace_resource(), capture_content=True)
    keys = {key for span in with_content for key in span.attributes or {}}
    assert keys >= CONTENT_KEYS
    root = with_content[0].attributes or {}
    assert "Count these words" in str(root["gen_ai.input.messages"])

    # A past export of the chat sends the very same trace.
    receiver.spans.clear()
    env = {"DATABASE_URI": mongo_uri, "MOZAIKS_DB": db_name, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    exported = invoke(main, "otel", "export", "--chat", chat_id, env=env)
    assert exported.returncode == 0, exported.stderr
    assert f"exported {len(live)} spans of 1 runs in 1 chats" in exported.stderr
    key = lambda span: span["span_id"]  # noqa: E731
    assert sorted(receiver.spans, key=key) == sorted(live, key=key)
    receiver.spans.clear()
    since = (records[0].ts - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert invoke(main, "otel", "export", "--since", since, env=env).returncode == 0
    assert sorted(receiver.spans, key=key) == sorted(live, key=key)

    # A collector that is down costs the spans, never an error in the runtime.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    down = TraceExport(store, Settings(otel_traces_endpoint=f"http://127.0.0.1:{free_port()}/v1/traces"))
    assert await down.export_run(chat_id, run_id) == len(live)
    await down.close()
    unknown = invoke(main, "otel", "export", "--chat", "no-such-chat", env=env)
    assert (unknown.returncode, unknown.stderr.strip()) == (
        2,
        "mozaiks: error: chat no-such-chat does not exist",
    )
