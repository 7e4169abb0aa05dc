"""Plain-install smoke: `mozaiks serve` from a venv holding only `pip install .`, driven as the ChatUI would.

Run by scripts/plain-install (from scripts/test, before pytest) with the plain venv's Python:
starts `mozaiks serve` on the embedded default (offline, a temporary data folder, the repository's
`./workflows`), checks the ChatUI page, creates a chat over REST and follows it over the WebSocket
to its terminal record. Exit 0 when all of that works; else one line saying what failed.

It uses the standard library only: the smoke checks the server's WebSocket support, so its client
must not lean on the WebSocket library the plain install is meant to bring (nor on test extras).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MOZAIKS = Path(sys.executable).parent / "mozaiks"
TERMINAL = ("run.completed", "run.failed", "run.stopped")
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455


class SmokeFailed(Exception):
    """What went wrong, in one line."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(port: int, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Socket:
    """The least of an RFC 6455 client: one text frame at a time, masked sends, no extensions."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: mozaiks.v1\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise SmokeFailed(f"the server closed the WebSocket handshake on {path} without an answer")
            head += chunk
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 101 " not in f"{status} ":
            raise SmokeFailed(
                f"the server refused the WebSocket on {path}: {status!r} (is a WebSocket library, "
                "`websockets`, installed with the package? uvicorn answers 405 without one)"
            )
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if f"sec-websocket-accept: {accept}".lower().encode() not in head.lower():
            raise SmokeFailed("the WebSocket handshake's Sec-WebSocket-Accept is wrong")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SmokeFailed("the server closed the WebSocket mid-frame")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def receive(self) -> dict[str, Any]:
        """The next text frame, decoded as JSON (pings answered; a close is a failure)."""
        message = b""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(length)
            opcode = first & 0x0F
            if opcode == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                raise SmokeFailed(
                    f"the server closed the WebSocket ({code}: {payload[2:].decode(errors='replace')})"
                )
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            message += payload
            if first & 0x80 and opcode in (0x0, 0x1):
                return dict(json.loads(message))

    def send(self, frame: dict[str, Any]) -> None:
        self._send(0x1, json.dumps(frame).encode())

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        head = bytes([0x80 | opcode]) + (
            bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + struct.pack(">H", length)
        )
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self) -> None:
        self.sock.close()


def wait_ready(port: int, process: subprocess.Popen[bytes], within_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if process.poll() is not None:
            raise SmokeFailed(f"mozaiks serve exited with {process.returncode} before it was ready")
        try:
            if http(port, "GET", "/health/ready")[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.1)
    raise SmokeFailed(f"mozaiks serve was not ready within {within_s:.0f} s")


def follow_a_chat(port: int) -> list[str]:
    """Create a chat over REST and follow it over the WebSocket to its terminal record; its record types."""
    status, page = http(port, "GET", "/")
    if status != 200 or b"<html" not in page.lower():
        raise SmokeFailed(f"GET / (the ChatUI) answered {status}")
    status, created = http(
        port, "POST", "/api/chats", {"workflow": "Analyzer", "message": "Count these words"}
    )
    if status != 201:
        raise SmokeFailed(f"POST /api/chats answered {status}: {created[:300]!r}")
    chat_id = json.loads(created)["chat_id"]
    ws = Socket(port, f"/ws/chats/{chat_id}?after=0")
    types: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while not types or types[-1] not in TERMINAL:
            if time.monotonic() > deadline:
                raise SmokeFailed(f"chat {chat_id} did not end within 90 s over the WebSocket (got {types})")
            frame = ws.receive()
            if frame["type"] == "heartbeat":
                ws.send({"type": "pong"})
            elif frame["type"] == "event":
                types.append(frame["event"]["type"])
    finally:
        ws.close()
    if types[-1] != "run.completed":
        raise SmokeFailed(f"chat {chat_id} ended with {types[-1]}, not run.completed")
    return types


def main() -> int:
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DATABASE_URI", "MOZAIKS_"))
        }
        env.pop("PYTHONPATH", None)  # the installed package, never the source tree
        env["MOZAIKS_DATA_DIR"] = str(Path(folder) / ".mozaiks")
        log = Path(folder) / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(MOZAIKS), "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=out
            )
        try:
            ready_s = wait_ready(port, process, within_s=60)
            types = follow_a_chat(port)
            said = log.read_text(errors="replace")
            if "mozaiks: workflows from " not in said:
                raise SmokeFailed("mozaiks serve did not say which workflows folder it loaded")
        except SmokeFailed as exc:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            print(
                f"plain-install smoke FAILED: {exc}\n--- mozaiks serve said (last lines):\n{tail}",
                file=sys.stderr,
            )
            return 1
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    print(
        f"plain-install smoke: ready in {ready_s:.1f} s, ChatUI served, a chat followed over the WebSocket "
        f"to run.completed ({len(types)} records)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
