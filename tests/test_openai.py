"""The OpenAI path through the real `openai` SDK against a local OpenAI-compatible HTTP server (no patching)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.runs.orchestrator import Orchestrator
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.store import MongoEventStore

# Spacing kept on purpose: the recorded arguments must be the model's exact text.
TOOL_ARGUMENTS = '{"text":  "one two three"}'


class CompatibleServer:
    """A tiny OpenAI-compatible chat completions server on 127.0.0.1 with scripted replies.

    `before_reply` runs in the request's own thread before each answer (subclasses hold or delay there).
    """

    def __init__(self, replies: list[tuple[int, dict[str, Any]]], port: int = 0) -> None:
        self.replies = replies
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((dict(self.headers), body))
                status, reply = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                if self.path != "/v1/chat/completions":
                    status, reply = 404, {"error": {"message": f"no route {self.path}"}}
                server.before_reply()
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 512  # hundreds of clients may connect at once
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def before_reply(self) -> None:
        """Called before each reply, in the request's thread."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(message: dict[str, Any], finish: str, prompt: int, completion_tokens: int) -> tuple[int, dict[str, Any]]:
    return 200, {
        "id": f"chatcmpl-{prompt}",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "compat-model-2024",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens},
    }


@pytest.fixture
def solo_workflows(tmp_path: Path) -> Path:
    """One agent with one tool, handing over to nobody (Default pattern)."""
    folder = tmp_path / "workflows" / "Solo"
    (folder / "prompts").mkdir(parents=True)
    (folder / "prompts" / "writer.md").write_text("You are the Writer. Count words with text_statistics.")
    (folder / "workflow.json").write_text(json.dumps(
        {"name": "Solo", "orchestration_pattern": "Default", "max_turns": 6, "visual_agents": ["Writer"], "entry_agent": "Writer"}
    ))
    (folder / "agents.json").write_text(json.dumps({"agents": [{
        "name": "Writer", "system_message_file": "prompts/writer.md", "tools": ["text_statistics"],
        "llm_config": {"temperature": 0.2}, "handoffs": {"after_work": "terminate"},
    }]}))
    (folder / "tools.json").write_text(json.dumps({"tools": [{"name": "text_statistics", "function": "tools.text_stats:text_statistics"}]}))
    return folder.parent


@pytest.fixture
def server() -> Iterator[CompatibleServer]:
    compatible = CompatibleServer([
        completion({"content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "text_statistics", "arguments": TOOL_ARGUMENTS}}]}, "tool_calls", 31, 9),
        completion({"content": "Three words."}, "stop", 57, 4),
    ])
    yield compatible
    compatible.close()


async def test_openai_sdk_path_records_calls_tools_and_usage(
    store: MongoEventStore, solo_workflows: Path, server: CompatibleServer
) -> None:
    settings = Settings(openai_api_key="sk-test", openai_base_url=server.base_url, openai_model="test-model", workflows_path=solo_workflows)
    assert not settings.offline
    orchestrator = Orchestrator(store, WorkflowManager(solo_workflows), settings)
    stream = await orchestrator.create_chat(workflow="Solo", user_id="u", app_id="a", message="Count: one two three")
    assert await orchestrator.run(stream) == "run.completed"
    records = [r async for r in store.read(stream.chat_id)]

    started = next(r for r in records if r.type == "run.started")
    assert started.data["offline"] is False and started.data["model"] == "test-model"
    calls = [r for r in records if r.type == "llm.call"]
    assert [(c.agent, c.data["model"], c.data["prompt_tokens"], c.data["completion_tokens"], c.data["finish_reason"], c.data["offline"])
            for c in calls] == [
        ("Writer", "compat-model-2024", 31, 9, "tool_calls", False),
        ("Writer", "compat-model-2024", 57, 4, "stop", False),
    ]
    assert all(c.data["latency_ms"] > 0 for c in calls)
    called = next(r for r in records if r.type == "tool.called")
    assert (called.data["tool"], called.data["call_id"], called.data["arguments"]) == ("text_statistics", "call_1", TOOL_ARGUMENTS)
    result = next(r for r in records if r.type == "tool.result")
    assert json.loads(result.data["content"])["words"] == 3 and not result.data["is_error"]
    assert next(r for r in records if r.type == "message.agent").data["content"] == "Three words."

    # What the SDK actually sent: our key, the model, the declared tool, and none of AG2's config keys.
    assert len(server.requests) == 2
    headers, body = server.requests[0]
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "test-model" and body["temperature"] == 0.2
    assert [t["function"]["name"] for t in body["tools"]] == ["text_statistics"]
    assert not {"model_client_cls", "mozaiks_agent", "stream"} & set(body)
    assert body["messages"][0] == {"role": "system", "content": "You are the Writer. Count words with text_statistics."}
    second = server.requests[1][1]["messages"]
    assert any(m.get("role") == "tool" and m.get("tool_call_id") == "call_1" for m in second)


async def test_a_failing_endpoint_fails_the_run_with_the_error_recorded(
    store: MongoEventStore, solo_workflows: Path
) -> None:
    broken = CompatibleServer([(500, {"error": {"message": "model overloaded", "type": "server_error"}})])
    try:
        settings = Settings(openai_api_key="sk-test", openai_base_url=broken.base_url, workflows_path=solo_workflows)
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
