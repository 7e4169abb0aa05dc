"""Fault injection on the wire server: a SecantusDB of its own started with `--enable-test-commands`.

Separate from the session's server, so a fail point never reaches another test. Fail points are
scoped by `appName` to the runtime node under test, and a process-wide PyMongo command listener
counts the faults the runtime actually met (failed commands, write-concern errors, slow replies).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pymongo import MongoClient, monitoring

from app.embedded import EmbeddedMongo


class FaultCounter(monitoring.CommandListener):
    """Counts, per server port and command name, the faults the runtime's clients saw."""

    def __init__(self) -> None:
        self.failures: dict[tuple[int, str], int] = {}
        self.wc_errors: dict[tuple[int, str], int] = {}
        self.slow_replies: dict[tuple[int, str], int] = {}
        self.slow_ms = 1e9
        self._lock = threading.Lock()

    def _bump(self, table: dict[tuple[int, str], int], event: Any) -> None:
        key = (int(event.connection_id[1]), str(event.command_name))
        with self._lock:
            table[key] = table.get(key, 0) + 1

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if isinstance(event.reply, dict) and event.reply.get("writeConcernError"):
            self._bump(self.wc_errors, event)
        if event.duration_micros / 1000 >= self.slow_ms:
            self._bump(self.slow_replies, event)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._bump(self.failures, event)
        if event.duration_micros / 1000 >= self.slow_ms:
            self._bump(self.slow_replies, event)

    def total(self, port: int, commands: tuple[str, ...] | None = None) -> dict[str, int]:
        """Counts on the server at `port`, of `commands` only when given."""
        with self._lock:
            out: dict[str, int] = {}
            for name, table in (
                ("failed", self.failures),
                ("write_concern", self.wc_errors),
                ("slow", self.slow_replies),
            ):
                out[name] = sum(
                    n for (p, c), n in table.items() if p == port and (commands is None or c in commands)
                )
            return out


COUNTER = FaultCounter()
monitoring.register(COUNTER)  # applies to every client created from now on (the nodes' included)


class FaultServer:
    """A durable embedded server with test commands; fail points, kill -9 and restart on the same data."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server = EmbeddedMongo(folder / "data", test_commands=True)
        self.control: MongoClient[dict[str, Any]] | None = None

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def uri_for(self, app_name: str) -> str:
        """The runtime's URI: its own appName (fail points target it); quick re-checks after a fault."""
        return f"{self.server.uri}&appName={app_name}&heartbeatFrequencyMS=500"

    def start(self) -> FaultServer:
        self.server.start()
        self.control = MongoClient(self.server.uri, serverSelectionTimeoutMS=30_000)
        return self

    def stop(self) -> None:
        if self.control is not None:
            self.control.close()
        self.server.stop()

    def arm(self, data: dict[str, Any], mode: Any) -> None:
        assert self.control is not None
        self.control.admin.command({"configureFailPoint": "failCommand", "mode": mode, "data": data})

    def off(self) -> None:
        assert self.control is not None
        self.control.admin.command({"configureFailPoint": "failCommand", "mode": "off"})

    @contextlib.contextmanager
    def failing(self, data: dict[str, Any], mode: Any) -> Iterator[None]:
        self.arm(data, mode)
        try:
            yield
        finally:
            self.off()

    def faults_seen(self, *commands: str) -> dict[str, int]:
        """What the runtime's clients met on this server (of `commands` only, when given)."""
        return COUNTER.total(self.port, commands or None)

    def kill9(self) -> None:
        """SIGKILL the server process: no shutdown, no flush beyond what it already synced."""
        process = self.server.process
        assert process is not None
        process.kill()
        process.wait()
        self.server.process = None

    def restart(self) -> None:
        """Start the server again on the same port and data folder."""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.server.start()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
