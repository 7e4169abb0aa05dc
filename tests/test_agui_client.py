"""Conformance: the official AG-UI JavaScript client (`@ag-ui/client`, npm) against a real `mozaiks serve`.

For each example workflow, `tests/agui/run.mjs` runs two turns on one thread with the client's own
`HttpAgent` (a run that ends with an interrupt is resumed the AG-UI way): the client's event
verification must pass, the messages it assembles must equal the log's visible messages, and the
second turn (a fresh client that knows only the thread id) must continue the same chat.

`scripts/test` installs the client into `tests/agui/node_modules` (`npm ci --prefix tests/agui`);
without it (or without Debian's `node`) these tests skip, or fail under MOZAIKS_REQUIRE_NODE=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.http.auth import issue_token
from tests.browser.conftest import Runtime, start_runtime, stop_runtime
from tests.test_agui import validated

HERE = Path(__file__).resolve().parent / "agui"
NODE = shutil.which("node")
SECRET = "agui-conformance-secret-0123456789"
EXAMPLES = sorted(p.parent.name for p in (HERE.parents[1] / "workflows").glob("*/workflow.json"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """A real `mozaiks serve` (offline fixtures, auth on) and the client installed beside run.mjs."""
    missing = None
    if NODE is None:
        missing = "no `node` (apt-get install nodejs npm)"
    elif not (HERE / "node_modules" / "@ag-ui" / "client").is_dir():
        missing = "@ag-ui/client is not installed (npm ci --prefix tests/agui, as scripts/test does)"
    if missing is not None:
        if os.environ.get("MOZAIKS_REQUIRE_NODE") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    server = start_runtime(tmp_path_factory.mktemp("agui"), {"MOZAIKS_AUTH_SECRET": SECRET})
    server.token = issue_token(SECRET, "ada", "app1", ["user"])
    try:
        yield server
    finally:
        stop_runtime(server)


def client_view(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The messages the JS client assembled, flattened to comparable tuples."""
    flat: list[tuple[Any, ...]] = []
    for m in messages:
        match m["role"]:
            case "user":
                flat.append(("user", m["id"], m["content"]))
            case "assistant":
                if m.get("content"):
                    flat.append(("assistant", m["id"], m.get("name"), m["content"]))
                for call in m.get("toolCalls") or ():
                    flat.append(
                        ("call", m["id"], call["id"], call["function"]["name"], call["function"]["arguments"])
                    )
            case "tool":
                flat.append(("result", m["id"], m["toolCallId"], m["content"]))
    return flat


def log_view(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The log's visible messages (read through the REST audit endpoint), flattened the same way."""
    flat: list[tuple[Any, ...]] = []
    for r in records:
        data = r["data"]
        match r["type"]:
            case "message.user":
                flat.append(("user", data["message_id"], data["content"]))
            case "message.agent":
                flat.append(("assistant", data.get("message_id") or r["id"], r["agent"], data["content"]))
            case "tool.called":
                flat.append(("call", r["id"], data["call_id"], data["tool"], data["arguments"]))
            case "tool.result":
                flat.append(("result", r["id"], data["call_id"], data["content"]))
    return flat


def run_client(served: Runtime, workflow: str, thread: str, turns: list[dict[str, Any]]) -> dict[str, Any]:
    config = {
        "url": f"{served.base_url}/ag-ui/{workflow}",
        "threadId": thread,
        "headers": served.headers(),
        "turns": turns,
    }
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(HERE / "run.mjs"), json.dumps(config)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "SUPPRESS_TRANSFORMATION_WARNINGS": "true"},
    )
    assert done.returncode == 0, (
        f"the AG-UI client rejected the stream:\n{done.stderr[-4000:]}\n{served.log_tail()}"
    )
    output: dict[str, Any] = json.loads(done.stdout)
    return output


# The answers a workflow's interrupts get, in order: human input takes text; the Intake's UI tools
# take a form's object, a choice's option and a confirm's boolean (the client answers each interrupt with
# `resume`, as it must; a `tool` message answer is checked in tests/test_ui.py).
INTAKE = [{"name": "Ada", "email": "ada@example.com", "team_size": 3}, "Team", True]
ANSWERS = {"Intake": (INTAKE, INTAKE)}


@pytest.mark.parametrize("workflow", EXAMPLES)
async def test_the_official_agui_client_runs_every_example_workflow(served: Runtime, workflow: str) -> None:
    thread = f"agui-{workflow}-{uuid.uuid4().hex[:8]}"
    first, second = ANSWERS.get(workflow, (["yes, go on", "exit"], ["exit"]))
    turns = [
        {"message": "Tell me about bees", "answers": first},
        {"message": "And about wasps?", "answers": second, "fresh": True},
    ]
    output = run_client(served, workflow, thread, turns)
    log = await served.events(thread)
    users = [r for r in log if r["type"] == "message.user"]
    assert [u["data"]["content"] for u in users] == ["Tell me about bees", "And about wasps?"]
    assert [r["type"] for r in log].count("chat.created") == 1 and all(r["user_id"] == "ada" for r in log)
    visible = [r for r in log if r["visible"]]
    # Turn 1's client saw the log up to turn 2; turn 2's fresh client, knowing only the thread id,
    # holds the whole conversation: the first turn reached it from the log.
    expected = [[r for r in visible if r["seq"] < users[1]["seq"]], visible]
    for number, (turn, records) in enumerate(zip(output["turns"], expected, strict=True), start=1):
        runs = turn["runs"]
        assert runs[-1]["outcome"] == "success", f"turn {number}: {[r['outcome'] for r in runs]}"
        assert all(r["outcome"] == "interrupt" for r in runs[:-1])
        for one_run in runs:
            for event in one_run["events"]:
                validated(json.dumps(event))  # what the client received parses as AG-UI in Python too
        assert client_view(turn["messages"]) == log_view(records), f"turn {number}"


def test_the_client_is_refused_without_a_token(served: Runtime) -> None:
    response = httpx.post(
        f"{served.base_url}/ag-ui/{EXAMPLES[0]}",
        json={"threadId": "t", "runId": "r", "messages": [{"id": "m", "role": "user", "content": "hi"}]},
    )
    assert response.status_code == 401
