"""Servers for tests and benchmarks: a runtime node on a real loopback socket, and a wire server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from app.embedded import EmbeddedMongo


async def stop_nodes(nodes: list[Node]) -> None:
    """A fixture's teardown: stop every node, newest first. A node's own failure was its test's to
    see; a node that would not shut down fails the teardown (after every other node got its stop)."""
    stuck: list[NodeStuck] = []
    for node in reversed(nodes):
        try:
            await node.stop()
        except NodeStuck as exc:
            stuck.append(exc)
        except Exception:  # noqa: BLE001 - the node's start or run failed: its test saw (or expected) that
            continue
    if stuck:
        raise stuck[0]


@contextlib.contextmanager
def benchmark_mongo_uri() -> Iterator[str]:
    """MOZAIKS_TEST_MONGO_URI if set, else a durable embedded server in a temporary folder."""
    given = os.environ.get("MOZAIKS_TEST_MONGO_URI")
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory() as folder, EmbeddedMongo(Path(folder) / "data") as server:
        yield server.uri


class QuietHandler(BaseHTTPRequestHandler):
    """Handler base of a test's tiny HTTP server (an identity provider, a trace collector): logs nothing."""

    def reply(self, payload: bytes, content_type: str) -> None:
        """Answer 200 with `payload`."""
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on 127.0.0.1 from a thread of its own; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# A stopped node's requests still in flight get this long before uvicorn cancels them (`mozaiks
# serve` gives SHUTDOWN_GRACE_S); a node not down STOP_WAIT_S after its stop fails the test.
STOP_GRACE_S = 2
STOP_WAIT_S = 30.0


class NodeStuck(RuntimeError):
    """A node that did not shut down: its tasks would outlive the test (and the session's database)."""


class Node:
    """One runtime process's app served by uvicorn on a real loopback socket, in the test's event loop."""

    def __init__(self, settings: Any) -> None:
        import uvicorn

        from app.embedded import free_port
        from app.http.server import create_app

        self.settings = settings
        self.port = free_port()
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            ws_max_size=settings.max_frame_bytes,
            ws_ping_interval=None,
            ws_per_message_deflate=False,  # as `mozaiks serve` runs
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=STOP_GRACE_S,
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def runtime(self) -> Any:
        """The app's state: its services (`store`, `hub`, `supervisor`, …) as the lifespans built them."""
        return self.app.state

    async def _serve(self) -> None:
        try:
            await self.server.serve()
        except SystemExit as exc:
            # uvicorn exits the process when the app's startup fails: here that would stop the test's
            # event loop and end the whole session, so it fails the test that started the node instead.
            raise RuntimeError(
                f"node {self.settings.node_id} did not start (uvicorn exit {exc.code}); its error is logged above"
            ) from exc

    async def start(self) -> Node:
        self.task = asyncio.create_task(self._serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.02)
        return self

    async def stop(self) -> None:
        """Shut down as on SIGTERM: in-flight requests cut after STOP_GRACE_S, then the app's shutdown.

        Never cancels the serve task: that would skip the app's shutdown and leave its runs, streams
        and sweeps running on in the test's event loop (where, once the session's database is gone,
        their cancellation can wait forever inside the driver)."""
        self.server.should_exit = True
        if self.task is None:
            return
        done, _ = await asyncio.wait({self.task}, timeout=STOP_WAIT_S)
        if not done:
            raise NodeStuck(f"node {self.settings.node_id} did not shut down within {STOP_WAIT_S} s")
        self.task.result()

    async def kill(self) -> None:
        """Drop every connection abruptly (as a crashed process would), then shut the app down."""
        for server in self.server.servers:
            server.close()
        for connection in list(self.server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        await self.stop()
