"""A local OpenAI-compatible chat completions server for tests and benchmarks, streaming SSE.

It answers `POST /v1/chat/completions` with scripted replies. A streaming request (`stream: true`)
gets the reply as `chat.completion.chunk` server-sent events: the text in the reply's chunks, each
tool call's arguments split over several chunks, the finish reason, then (when asked with
`stream_options.include_usage`) a usage chunk and `[DONE]`. A non-streaming request gets one
`chat.completion`. The test controls the pace: `before_chunk(reply_number, index)` runs in the
server's thread before each text chunk is sent, and may block on the test's events.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class ToolCall:
    id: str
    name: str
    # Sent exactly as written (split over three chunks), so a test can check it arrives unchanged.
    arguments: str


@dataclass
class Reply:
    """One scripted completion: text chunks and/or tool calls, usage, or an HTTP error."""

    chunks: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_tokens: int = 10
    completion_tokens: int | None = None
    model: str = "compat-model-2024"
    status: int = 200
    error: str | None = None
    # Close the connection right after this text chunk, as a dying server would (no finish reason).
    cut_after: int | None = None
    # After the text chunks, an SSE event `{"error": {...}}` with this message, as OpenAI sends mid-stream.
    stream_error: str | None = None
    # Answer a streaming request with one plain JSON completion (a server that ignores `stream`).
    ignores_stream: bool = False

    @property
    def content(self) -> str | None:
        return "".join(self.chunks) if self.chunks else None

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    @property
    def usage(self) -> dict[str, int]:
        completion = (
            self.completion_tokens if self.completion_tokens is not None else max(len(self.chunks), 1)
        )
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def text_reply(text: str, pieces: int, **fields: Any) -> Reply:
    """`text` cut into `pieces` chunks of about equal length (they concatenate to `text`)."""
    pieces = max(1, min(pieces, len(text)))
    bounds = [len(text) * i // pieces for i in range(pieces + 1)]
    return Reply(chunks=[text[a:b] for a, b in itertools.pairwise(bounds)], **fields)


class StreamingModel:
    """The server: `replies` are used in order (the last one repeats); `requests` are the bodies received."""

    def __init__(
        self,
        replies: list[Reply],
        *,
        before_chunk: Callable[[int, int], None] | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
        port: int = 0,
    ) -> None:
        self.replies = replies
        self.before_chunk = before_chunk
        self.on_chunk = on_chunk
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        # (reply number, chunk index) -> time.monotonic() when that text chunk was written.
        self.sent_at: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()
        model = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with model._lock:
                    number = len(model.requests)
                    model.requests.append(body)
                    model.headers.append(dict(self.headers))
                    reply = model.replies[min(number, len(model.replies) - 1)]
                if self.path != "/v1/chat/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                elif reply.error is not None:
                    self._json(reply.status, {"error": {"message": reply.error, "type": "server_error"}})
                elif body.get("stream") and not reply.ignores_stream:
                    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                    self._stream(number, reply, include_usage)
                else:
                    self._json(200, model.completion(number, reply))

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, number: int, reply: Reply, include_usage: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                try:
                    for event in model.chunks(number, reply, include_usage):
                        self.wfile.write(b"data: " + event + b"\n\n")
                    if reply.cut_after is None:
                        self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (a killed node): nothing to finish

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 512  # hundreds of clients may connect at once (benchmarks)
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def chunks(self, number: int, reply: Reply, include_usage: bool) -> Any:
        """The SSE payloads of one streamed reply (a generator: the pace hooks run as it is consumed)."""
        head = {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": reply.model,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return json.dumps(
                {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            ).encode()

        yield chunk({"role": "assistant", "content": ""})
        for index, text in enumerate(reply.chunks):
            if self.before_chunk is not None:
                self.before_chunk(number, index)
            self.sent_at[(number, index)] = time.monotonic()
            yield chunk({"content": text})
            if self.on_chunk is not None:
                self.on_chunk(number, index)
            if reply.cut_after == index:
                return
        if reply.stream_error is not None:
            yield json.dumps({"error": {"message": reply.stream_error, "type": "server_error"}}).encode()
            return
        for j, call in enumerate(reply.tool_calls):
            yield chunk(
                {
                    "tool_calls": [
                        {
                            "index": j,
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""},
                        }
                    ]
                }
            )
            third = max(1, len(call.arguments) // 3)
            for start in range(0, len(call.arguments), third):
                piece = call.arguments[start : start + third]
                yield chunk({"tool_calls": [{"index": j, "function": {"arguments": piece}}]})
        yield chunk({}, reply.finish_reason)
        if include_usage:
            yield json.dumps({**head, "choices": [], "usage": reply.usage}).encode()

    def completion(self, number: int, reply: Reply) -> dict[str, Any]:
        """The non-streaming `chat.completion` of a reply."""
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in reply.tool_calls
            ]
        return {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": reply.model,
            "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
            "usage": reply.usage,
        }

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Gate:
    """Holds the model server before chosen chunks until the test opens them (thread-safe)."""

    def __init__(self) -> None:
        self._allowed = -1
        self._cond = threading.Condition()
        self.closed = False

    def allow_through(self, index: int) -> None:
        with self._cond:
            self._allowed = max(self._allowed, index)
            self._cond.notify_all()

    def open(self) -> None:
        self.allow_through(1 << 30)

    def wait(self, _reply: int, index: int) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: index <= self._allowed or self.closed, timeout=60.0):
                raise TimeoutError(f"chunk {index} was never let through")

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


def solo_workflow(root: Path, *, tool: str | None = None, prompt: str = "You are the Writer.") -> Path:
    """Write the `Solo` workflow under `root/workflows`: one visible agent, Writer, that answers and ends
    the run (Default pattern), optionally with one tool of `tools/` (`name:module:function`)."""
    folder = root / "workflows" / "Solo"
    (folder / "prompts").mkdir(parents=True)
    (folder / "prompts" / "writer.md").write_text(prompt)
    (folder / "workflow.json").write_text(
        json.dumps(
            {
                "name": "Solo",
                "orchestration_pattern": "Default",
                "max_turns": 6,
                "visual_agents": ["Writer"],
                "entry_agent": "Writer",
            }
        )
    )
    agent: dict[str, Any] = {
        "name": "Writer",
        "system_message_file": "prompts/writer.md",
        "handoffs": {"after_work": "terminate"},
    }
    if tool is not None:
        name, module, function = tool.split(":")
        agent.update(tools=[name], llm_config={"temperature": 0.2})
        (folder / "tools.json").write_text(
            json.dumps({"tools": [{"name": name, "function": f"{module}:{function}"}]})
        )
    (folder / "agents.json").write_text(json.dumps({"agents": [agent]}))
    return folder.parent
