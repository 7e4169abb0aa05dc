"""A local OpenAI-compatible chat completions server that misbehaves on cue (429, 5xx, stall, reset)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPLY = {
    "id": "chatcmpl-ok",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "fault-model",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Bees are fine."}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24},
}


# The same reply as server-sent `chat.completion.chunk` events, for a streaming request.
_CHUNK_HEAD = {
    "id": "chatcmpl-ok",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "fault-model",
}
CHUNKS = [
    {**_CHUNK_HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Bees are fine."}}]},
    {**_CHUNK_HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {**_CHUNK_HEAD, "choices": [], "usage": REPLY["usage"]},
]


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class FaultyModel:
    """Serves `plan` in order, one behaviour per request ("429", "500", "503", "stall", "reset", "ok");
    then `after` for every further request. Counts the faults it served."""

    def __init__(self, plan: list[str], after: str = "ok", stall_s: float = 3.0) -> None:
        self.plan = list(plan)
        self.after = after
        self.stall_s = stall_s
        self.served: list[str] = []
        self._lock = threading.Lock()
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                streamed = bool(
                    json.loads(self.rfile.read(int(self.headers["Content-Length"]))).get("stream")
                )
                with model._lock:
                    behaviour = model.plan.pop(0) if model.plan else model.after
                    model.served.append(behaviour)
                if behaviour == "reset":
                    # Headers and half a body, then a TCP reset: a connection dropped mid-response.
                    if streamed:
                        self.wfile.write(
                            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                            + sse(CHUNKS[0])[:30]
                        )
                    else:
                        self.wfile.write(
                            b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{"id":'
                        )
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if behaviour == "stall":
                    time.sleep(model.stall_s)  # past the client's timeout
                status, body, extra = 200, REPLY, {}
                if behaviour in ("429", "500", "503"):
                    status = int(behaviour)
                    body = {"error": {"message": f"injected {behaviour}", "type": "server_error"}}
                    if status == 429:
                        extra = {"Retry-After": "1"}
                data, media = json.dumps(body).encode(), "application/json"
                if streamed and status == 200:
                    data, media = (
                        b"".join(sse(chunk) for chunk in CHUNKS) + b"data: [DONE]\n\n",
                        "text/event-stream",
                    )
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", media)
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up on a stalled request

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def faults_served(self) -> int:
        with self._lock:
            return sum(b != "ok" for b in self.served)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def solo_workflow(root: Path) -> Path:
    """A workflows folder with "Solo": one agent that answers once and ends the run."""
    folder = root / "workflows" / "Solo"
    (folder / "prompts").mkdir(parents=True)
    (folder / "prompts" / "writer.md").write_text("You are the Writer. Answer in one sentence.")
    (folder / "workflow.json").write_text(
        json.dumps(
            {
                "name": "Solo",
                "orchestration_pattern": "Default",
                "max_turns": 4,
                "visual_agents": ["Writer"],
                "entry_agent": "Writer",
            }
        )
    )
    (folder / "agents.json").write_text(
        json.dumps(
            {
                "agents": [
                    {
                        "name": "Writer",
                        "system_message_file": "prompts/writer.md",
                        "handoffs": {"after_work": "terminate"},
                    }
                ]
            }
        )
    )
    (folder / "tools.json").write_text(json.dumps({"tools": []}))
    return folder.parent
