"""The OpenAI path through the real `openai` SDK against a local OpenAI-compatible HTTP server (no patching).

The server streams (SSE), as every request of the runtime asks it to: text in chunks, tool-call
arguments split over several chunks, usage in the last chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from httpx_sse import SSEError

from app.runs.clients import OpenAIBackend, TextStream, fault_status
from app.runs.orchestrator import Orchestrator
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.store import MongoEventStore
from tests.llm_server import Reply, StreamingModel, ToolCall, solo_workflow

# Spacing kept on purpose: the recorded arguments must be the model's exact text.
TOOL_ARGUMENTS = '{"text":  "one two three"}'


@pytest.fixture
def solo_workflows(tmp_path: Path) -> Path:
    """One agent with one tool, handing over to nobody (Default pattern)."""
    return solo_workflow(
        tmp_path,
        tool="text_statistics:tools.text_stats:text_statistics",
        prompt="You are the Writer. Count words with text_statistics.",
    )


@pytest.fixture
def server() -> Iterator[StreamingModel]:
    compatible = StreamingModel(
        [
            Reply(
                tool_calls=[ToolCall("call_1", "text_statistics", TOOL_ARGUMENTS)],
                prompt_tokens=31,
                completion_tokens=9,
            ),
            Reply(chunks=["Three", " words", "."], prompt_tokens=57, completion_tokens=4),
        ]
    )
    yield compatible
    compatible.close()


async def test_openai_sdk_path_records_calls_tools_and_usage(
    store: MongoEventStore, solo_workflows: Path, server: StreamingModel
) -> None:
    settings = Settings(
        openai_api_key="sk-test",
        openai_base_url=server.base_url,
        openai_model="test-model",
        workflows_path=solo_workflows,
    )
    assert not settings.offline
    orchestrator = Orchestrator(store, WorkflowManager(solo_workflows), settings)
    stream = await orchestrator.create_chat(
        workflow="Solo", user_id="u", app_id="a", message="Count: one two three"
    )
    assert await orchestrator.run(stream) == "run.completed"
    records = [r async for r in store.read(stream.chat_id)]

    started = next(r for r in records if r.type == "run.started")
    assert started.data["offline"] is False and started.data["model"] == "test-model"
    calls = [r for r in records if r.type == "llm.call"]
    assert [
        (
            c.agent,
            c.data["model"],
            c.data["prompt_tokens"],
            c.data["completion_tokens"],
            c.data["finish_reason"],
            c.data["offline"],
        )
        for c in calls
    ] == [
        ("Writer", "compat-model-2024", 31, 9, "tool_calls", False),
        ("Writer", "compat-model-2024", 57, 4, "stop", False),
    ]
    assert all(c.data["latency_ms"] > 0 for c in calls)
    called = next(r for r in records if r.type == "tool.called")
    assert (called.data["tool"], called.data["call_id"], called.data["arguments"]) == (
        "text_statistics",
        "call_1",
        TOOL_ARGUMENTS,
    )
    result = next(r for r in records if r.type == "tool.result")
    assert json.loads(result.data["content"])["words"] == 3 and not result.data["is_error"]
    message = next(r for r in records if r.type == "message.agent")
    assert message.data["content"] == "Three words."
    # The streamed text is in the log too, ahead of the message it makes up.
    deltas = [r for r in records if r.type == "message.delta"]
    assert deltas and all(
        d.data["message_id"] == message.data["message_id"] and d.seq < message.seq for d in deltas
    )
    assert "".join(d.data["text"] for d in deltas) == "Three words."
    assert all(c.data["ttft_ms"] is not None and c.data["ttft_ms"] <= c.data["latency_ms"] for c in calls)

    # What the SDK actually sent: our key, the model, the declared tool, and none of AG2's config keys.
    assert len(server.requests) == 2
    headers, body = server.headers[0], server.requests[0]
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "test-model" and body["temperature"] == 0.2
    assert [t["function"]["name"] for t in body["tools"]] == ["text_statistics"]
    assert not {"model_client_cls", "mozaiks_agent", "api_type"} & set(body)
    assert body["messages"][0] == {
        "role": "system",
        "content": "You are the Writer. Count words with text_statistics.",
    }
    second = server.requests[1]["messages"]
    assert any(m.get("role") == "tool" and m.get("tool_call_id") == "call_1" for m in second)


async def test_a_failing_endpoint_fails_the_run_with_the_error_recorded(
    store: MongoEventStore, solo_workflows: Path
) -> None:
    broken = StreamingModel([Reply(status=500, error="model overloaded")])
    try:
        settings = Settings(
            openai_api_key="sk-test",
            openai_base_url=broken.base_url,
            workflows_path=solo_workflows,
            llm_backoff_s=0.05,  # every try is still made; only the waits between them are short
        )
        orchestrator = Orchestrator(store, WorkflowManager(solo_workflows), settings)
        stream = await orchestrator.create_chat(workflow="Solo", user_id="u", app_id="a", message="hi")
        assert await orchestrator.run(stream) == "run.failed"
    finally:
        broken.close()
    records = [r async for r in store.read(stream.chat_id)]
    call = next(r for r in records if r.type == "llm.call")
    assert call.data["error"].startswith("InternalServerError") and "model overloaded" in call.data["error"]
    assert records[-1].type == "run.failed" and "model overloaded" in records[-1].data["error"]
    assert [r.seq for r in records] == list(range(1, len(records) + 1))


# ---- the streamed response, read as server-sent events ----------------------------------------------

MESSAGES: list[Any] = [{"role": "user", "content": "Count the words of: one two three"}]


@pytest.fixture
def backend_of() -> Iterator[Callable[[Reply], OpenAIBackend]]:
    """An OpenAIBackend against a server playing the given reply (servers closed after the test)."""
    servers: list[StreamingModel] = []

    def make(reply: Reply) -> OpenAIBackend:
        servers.append(StreamingModel([reply]))
        return OpenAIBackend(api_key=None, base_url=servers[-1].base_url)

    yield make
    for server in servers:
        server.close()


def test_a_streamed_reply_assembles_into_the_completion_the_sdk_reads_unstreamed(
    backend_of: Callable[[Reply], OpenAIBackend],
) -> None:
    reply = Reply(
        chunks=["Three", " words", "."],
        tool_calls=[ToolCall("call_1", "text_statistics", TOOL_ARGUMENTS)],
        prompt_tokens=57,
        completion_tokens=4,
    )
    backend = backend_of(reply)
    pieces: list[str] = []
    streamed = backend.complete(
        "Writer", {"model": "m", "messages": MESSAGES}, TextStream("Writer", lambda c: pieces.append(c.text))
    )
    whole = backend.client.chat.completions.create(model="m", messages=MESSAGES)  # the same reply, unstreamed

    assert pieces == ["Three", " words", "."]
    assert streamed.id == "chatcmpl-0" and whole.id == "chatcmpl-1"  # the server numbers its replies
    assert streamed.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})
    assert streamed.choices[0].message.tool_calls[0].function.arguments == TOOL_ARGUMENTS  # type: ignore[index,union-attr]


def test_an_error_event_in_the_stream_raises_the_servers_message_as_the_sdk_does(
    backend_of: Callable[[Reply], OpenAIBackend],
) -> None:
    backend = backend_of(Reply(chunks=["Half an answer"], stream_error="the model is overloaded"))
    pieces: list[str] = []
    with pytest.raises(openai.APIError, match="the model is overloaded") as raised:
        backend.complete(
            "Writer",
            {"model": "m", "messages": MESSAGES},
            TextStream("Writer", lambda c: pieces.append(c.text)),
        )
    assert pieces == ["Half an answer"]  # what came before the error was streamed (and is recorded)
    assert raised.value.body == {"message": "the model is overloaded", "type": "server_error"}
    assert fault_status(raised.value) == ("error", False)


def test_a_server_answering_a_stream_request_with_plain_json_is_refused_naming_what_it_sent(
    backend_of: Callable[[Reply], OpenAIBackend],
) -> None:
    backend = backend_of(Reply(chunks=["Whole"], ignores_stream=True))
    with pytest.raises(SSEError, match=r"text/event-stream.*application/json"):
        backend.complete("Writer", {"model": "m", "messages": MESSAGES})
