"""`mozaiks serve` as a user runs it: embedded MongoDB, ready within 30 s, nothing left after SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
MOZAIKS = Path(sys.executable).parent / "mozaiks"


def children_of(pid: int) -> list[int]:
    """Every descendant process of `pid`, from /proc."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                found.append(int(entry.name))
                frontier.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def serve(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DATABASE_URI", "MOZAIKS_"))
    }
    environment.update({"MOZAIKS_DATA_DIR": str(tmp_path / ".mozaiks"), **env})
    return subprocess.Popen(
        [str(MOZAIKS), "serve", *args],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_ready(port: int, process: subprocess.Popen[bytes], within_s: float) -> httpx.Response:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"serve exited: {process.stderr.read().decode()[-2000:] if process.stderr else ''}"
            )
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready within {within_s} s")


def test_serve_on_the_embedded_default_is_ready_and_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    process = serve(tmp_path, "--port", str(port))
    try:
        ready = wait_ready(port, process, within_s=30)
        assert ready.json()["status"] == "ready"
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        workflows = httpx.get(f"http://127.0.0.1:{port}/api/workflows").json()["workflows"]
        assert {"Generator", "Analyzer", "Assistant"} <= {w["name"] for w in workflows}
        descendants = children_of(process.pid)
        assert descendants, "the embedded server runs as a child process"
        assert (tmp_path / ".mozaiks" / "data").is_dir()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a graceful shutdown
    said = process.stdout.read().decode() if process.stdout else ""
    assert f"mozaiks: workflows from {ROOT / 'workflows'}: Analyzer, Assistant, Brainstorm, Generator" in said
    assert b"Traceback" not in (process.stderr.read() if process.stderr else b"")
    time.sleep(0.2)
    assert [pid for pid in descendants if alive(pid)] == []


def test_embedded_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    port = free_port()
    # A workflows folder with nothing in it: the server starts all the same, and warns.
    process = serve(tmp_path, "--port", str(port), MOZAIKS_WORKFLOWS_PATH=str(tmp_path))
    try:
        wait_ready(port, process, within_s=30)
        descendants = children_of(process.pid)
    finally:
        process.kill()  # no chance to clean up: the kernel's parent-death signal must do it
        process.wait(30)
    warned = process.stderr.read().decode() if process.stderr else ""
    assert f"mozaiks: warning: no workflows loaded from {tmp_path}" in warned
    # The kernel kills it with its parent (PR_SET_PDEATHSIG): gone at once; the bound is for a loaded machine.
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in descendants if alive(pid)]
    assert left == [], f"processes {left} still run 60 s after their parent was killed"


def test_data_folder_held_by_another_server_is_a_one_line_error(tmp_path: Path) -> None:
    first_port, second_port = free_port(), free_port()
    first = serve(tmp_path, "--port", str(first_port))
    try:
        wait_ready(first_port, first, within_s=30)
        second = serve(tmp_path, "--port", str(second_port))
        _, err = second.communicate(timeout=60)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    assert second.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines[-1].startswith("mozaiks: error: ") and "in use by another running server" in lines[-1]
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10"])
def test_local_mode_refuses_a_public_address(tmp_path: Path, host: str) -> None:
    process = serve(tmp_path, "--host", host, "--port", str(free_port()))
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "without MOZAIKS_AUTH_SECRET" in err.decode()


def test_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        process = serve(tmp_path, "--port", str(port))
        _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert (
        err.decode().strip().splitlines()[-1].startswith(f"mozaiks: error: cannot listen on 127.0.0.1:{port}")
    )


def test_mozaiks_help_answers_without_importing_ag2_the_web_stack_or_the_driver() -> None:
    listing = subprocess.run(
        [sys.executable, "-c", "import sys; from app.cli import main; main(['--help'], standalone_mode=False); "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'autogen', 'openai', 'litestar', 'pymongo'}))"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert listing.splitlines()[-1] == "[]", listing
    assert "run          Run WORKFLOW on MESSAGE in the terminal" in listing


def test_the_command_list_s_help_lines_are_the_commands_own() -> None:
    import click

    from app.cli import _ELSEWHERE, main

    context = click.Context(main)
    for name, (_, line) in _ELSEWHERE.items():
        command = main.get_command(context, name)
        assert command is not None and command.get_short_help_str(200) == line, name
