"""The embedded MongoDB-wire server (SecantusDB) run as a child process for the zero-setup default.

SecantusDB is GPL-2.0, so it is only ever started as a separate process (`secantusd-py`), never
imported. The child is killed when its parent dies (PR_SET_PDEATHSIG), so no server is left
running after a crash of the runtime. SIGKILL, not SIGTERM: SecantusDB's own shutdown can wedge
(seen under load: a connection thread's lock held against `storage.close()`, the server alive a
minute on), and only `stop()` can fall back to a kill; a parent that died cannot.

No `--sync-on-commit`: SecantusDB journals (fsyncs) a commit when the write asks for `j: true`, and
everything a crash must not lose is written so (`domain.commit.DURABLE`: the log, model I/O parts,
anchors, uploads, run leases), so a kill, or a power cut, loses nothing acknowledged (the database
kill -9 fault test). The projections, which the log rebuilds, are written without: syncing each of
their updates cost the server about a third of its CPU per model call and most of its wall time
(README "Performance").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from domain.errors import MozaiksError

if TYPE_CHECKING:
    from pymongo import MongoClient

_PR_SET_PDEATHSIG = 1
# What the server prints for the start-up failures a user can fix, and what to tell them.
_KNOWN_CAUSES = {
    "already being managed by another process": "data folder {storage} is in use by another running server "
    "(stop it, or set MOZAIKS_DATA_DIR to another folder)",
    "Address already in use": "port {port} is already in use",
    "No space left on device": "no space left on the disk holding {storage}",
    "Permission denied": "no permission to write the data folder {storage}",
}


class EmbeddedServerError(MozaiksError):
    """The embedded server could not be started; the message is one line a user can act on."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _server_executable() -> str:
    beside = Path(sys.executable).parent / "secantusd-py"
    if beside.exists():
        return str(beside)
    found = shutil.which("secantusd-py")
    if found is None:
        raise EmbeddedServerError(
            "secantusd-py not found: install the runtime's dependencies (pip install -e .) "
            "or set DATABASE_URI to a MongoDB server"
        )
    return found


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to kill it when the parent dies.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class EmbeddedMongo:
    """A SecantusDB child process on a free loopback port; use as a (sync or async) context manager."""

    def __init__(
        self,
        storage: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        test_commands: bool = False,
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.storage = storage
        self.host = host
        self.port = port
        self.test_commands = test_commands
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child process

    @property
    def uri(self) -> str:
        """Connection string for the running server (retryable writes off; see ARCHITECTURE.md)."""
        return f"mongodb://{self.host}:{self.port}/?retryWrites=false&directConnection=true"

    def start(self) -> str:
        """Start the server and wait until it answers `ping`; returns its URI.

        Call it from a thread that outlives the server: the server is killed when that thread ends.
        """
        self.launch()
        return self.wait_ready()

    def launch(self) -> str:
        """Start the server process without waiting for it; returns its URI (`wait_ready` waits).

        The server takes a second or two to boot: `mozaiks serve` imports the app meanwhile.
        """
        storage = str(self.storage)
        if storage != ":memory:":
            try:
                Path(storage).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise EmbeddedServerError(f"cannot create data folder {storage}: {exc.strerror}") from None
        self.port = self.port or free_port(self.host)
        argv = [
            _server_executable(),
            "--host", self.host,
            "--port", str(self.port),
            "--storage-path", storage,
            "--log-level", "ERROR",
        ]  # fmt: skip
        if self.test_commands:
            argv.append("--enable-test-commands")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the server in order.
        )
        return self.uri

    def wait_ready(self) -> str:
        """Wait until the launched server answers `ping`; returns its URI.

        Raises EmbeddedServerError (one line a user can act on) when it exits or does not answer.
        """
        self._wait_ready()
        return self.uri

    def _wait_ready(self) -> None:
        from pymongo import MongoClient  # here, so `mozaiks --help` never loads the driver
        from pymongo.errors import PyMongoError

        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        client: MongoClient[dict[str, object]] = MongoClient(self.uri, serverSelectionTimeoutMS=250)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise EmbeddedServerError(
                        f"embedded MongoDB server (data {self.storage}, port {self.port}) exited "
                        f"at start-up: {self._last_log_line()}"
                    )
                try:
                    client.admin.command("ping")
                    return
                except PyMongoError:
                    time.sleep(0.1)
        finally:
            client.close()
        self.stop()
        raise EmbeddedServerError(
            f"embedded MongoDB server did not answer ping on {self.host}:{self.port} "
            f"within {self.startup_timeout_s:.0f} s: {self._last_log_line()}"
        )

    def _last_log_line(self) -> str:
        self._log.seek(0)
        output = self._log.read().decode(errors="replace")
        for marker, meaning in _KNOWN_CAUSES.items():
            if marker in output:
                return meaning.format(storage=self.storage, port=self.port)
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["no output"])[-1][:300]

    def stop(self, *_: object, timeout_s: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM), killing it if it does not exit in time.

        Extra positional arguments are ignored, so it can serve as any shutdown hook.
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                process.wait(0.05)
                return
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    break
            # On SIGTERM the server joins its accept thread, which sits in accept() until a client
            # connects (up to 2 s): connect, so it sees the stop at once.
            with contextlib.suppress(OSError):
                socket.create_connection((self.host, self.port or 0), timeout=0.5).close()
        process.kill()
        process.wait()

    def __enter__(self) -> EmbeddedMongo:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedMongo:
        # Started on the loop's own thread, never a worker's: the child dies with the *thread* that
        # started it (PR_SET_PDEATHSIG), and executor threads come and go (the model pool's do).
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)
