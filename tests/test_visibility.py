"""Hidden stays hidden: no record a user may read, on any transport, names a hidden agent or carries its words.

The `Veiled` test workflow (tests/workflows/) is a RoundRobin whose first speaker (Scout, with a tool)
and last speaker (Closer) are hidden; only Guide is visual. Its hidden agents' scripted words carry
markers (`scoutsecret`, `closersecret`) that must never reach a user.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from app.embedded import free_port
from app.http.auth import issue_token
from app.runs.recorder import RunMapper
from domain.events import MessageAgent
from tests.test_agui import body, read_sse

VEILED = Path(__file__).parent / "workflows"
SECRET = "v" * 32
HIDDEN = ("Scout", "Closer", "scoutsecret", "closersecret")
TERMINAL = ("run.completed", "run.failed", "run.stopped")


def leaks(where: str, payload: Any) -> list[str]:
    """The hidden names and words found in what a user got (empty when none)."""
    text = json.dumps(payload)
    return [f"{where}: {word!r}" for word in HIDDEN if word in text]


async def events_until_run_ends(ws: ClientConnection, runs: int) -> list[dict[str, Any]]:
    """Frames until the `runs`-th terminal record (heartbeats answered and dropped)."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while runs:
            frame = json.loads(await ws.recv())
            if frame["type"] == "heartbeat":
                await ws.send(json.dumps({"type": "pong"}))
                continue
            frames.append(frame)
            if frame["type"] == "event" and frame["event"]["type"] in TERMINAL:
                runs -= 1
    return frames


async def test_a_user_never_sees_a_hidden_agent_over_rest_websocket_or_agui(start_node) -> None:
    node = await start_node(workflows_path=VEILED, auth_secret=SECRET)
    user_token = issue_token(SECRET, "ann", "app1", ["user"])
    user = {"Authorization": f"Bearer {user_token}"}
    auditor = {"Authorization": f"Bearer {issue_token(SECRET, 'audrey', 'app1', ['auditor'])}"}
    seen: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
        started = await http.post(
            "/api/chats", json={"workflow": "Veiled", "message": "Count these words"}, headers=user
        )
        assert started.status_code == 201, started.text
        chat_id = started.json()["chat_id"]
        url = f"{node.ws_url}/ws/chats/{chat_id}?after=0"
        async with connect(url, subprotocols=[f"bearer.{user_token}"]) as ws:
            seen["ws first run"] = await events_until_run_ends(ws, 1)
            # A second turn sent over the socket: its records reach this client live.
            await ws.send(json.dumps({"type": "user.message", "text": "Once more"}))
            seen["ws live run"] = await events_until_run_ends(ws, 1)
        async with connect(url, subprotocols=[f"bearer.{user_token}"]) as ws:
            replay: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                while not replay or replay[-1]["type"] != "replay.done":
                    replay.append(json.loads(await ws.recv()))
            seen["ws replay"] = replay
        # A third turn over AG-UI: the history snapshot and the run's live events.
        async with (
            asyncio.timeout(60),
            http.stream(
                "POST", "/ag-ui/Veiled", json=body(chat_id, ("m3", "And again")), headers=user
            ) as response,
        ):
            assert response.status_code == 200
            seen["ag-ui"] = [e.event for e in await read_sse(response)]
        for what, path in {
            "rest events": f"/api/chats/{chat_id}/events?limit=1000",
            "rest chat session": f"/api/chats/{chat_id}",
            "rest app events": f"/api/events?chat_id={chat_id}&limit=1000",
            "rest chat list": "/api/chats",
        }.items():
            answer = await http.get(path, headers=user)
            assert answer.status_code == 200, f"{what}: {answer.text}"
            seen[what] = answer.json()
        ndjson = await http.get(f"/api/chats/{chat_id}/events?format=ndjson", headers=user)
        seen["rest events ndjson"] = ndjson.text
        full = (await http.get(f"/api/chats/{chat_id}/events?limit=1000", headers=auditor)).json()["events"]

    assert [word for what, payload in seen.items() for word in leaks(what, payload)] == []
    # Auditors still read everything: the hidden agents' records are in the log, of every kind.
    hidden_types = {r["type"] for r in full if r["agent"] in ("Scout", "Closer")}
    assert {"speaker.selected", "message.delta", "message.agent", "llm.call", "tool.called"} <= hidden_types
    assert {"tool.result", "handoff"} <= hidden_types
    assert any(r["type"] == "handoff" and r["data"]["target"] == "Closer" and not r["visible"] for r in full)
    # A user reads exactly the visible records, every record type among them, on each transport.
    visible = [r for r in full if r["visible"]]
    assert [r["seq"] for r in seen["rest events"]["events"]] == [r["seq"] for r in visible]
    streamed = [f["seq"] for f in seen["ws first run"] + seen["ws live run"] if f["type"] == "event"]
    assert streamed == [r["seq"] for r in visible if r["seq"] <= streamed[-1]]
    assert {r["type"] for r in visible} >= {
        "chat.created", "message.user", "run.started", "speaker.selected", "message.delta",
        "message.agent", "llm.call", "context.updated", "run.completed",
    }  # fmt: skip
    # Each run's summary is the last words a user saw (Guide's), never the hidden Closer's.
    summaries = [r["data"]["summary"] for r in full if r["type"] == "run.completed"]
    assert summaries == ["Your text has three words."] * 3
    finished = [e for e in seen["ag-ui"] if e["type"] == "RUN_FINISHED"]
    assert finished[-1]["result"] == "Your text has three words."


async def test_a_hidden_agent_s_failed_model_call_fails_the_run_without_naming_it(start_node) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/v1"  # refuses connections: Scout's first call fails
    node = await start_node(workflows_path=VEILED, openai_base_url=nobody, llm_attempts=1)
    async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
        created = await http.post("/api/chats", json={"workflow": "Veiled", "message": "Count these words"})
        chat_id = created.json()["chat_id"]
        async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0") as ws:
            frames = await events_until_run_ends(ws, 1)
        full = (await http.get(f"/api/chats/{chat_id}/events")).json()["events"]  # local mode reads all
    failed = frames[-1]["event"]
    assert (failed["type"], failed["data"]["reason"]) == ("run.failed", "model")
    assert "model call for a hidden agent failed" in failed["data"]["error"], failed["data"]["error"]
    assert leaks("ws", frames) == []
    assert any(
        r["type"] == "llm.call"
        and r["agent"] == "Scout"
        and r["data"]["status"] == "connection"
        and not r["visible"]
        for r in full
    )


def test_a_users_error_text_names_no_hidden_agent_even_one_whose_name_extends_another() -> None:
    # `Scout-Lead` starts with the hidden `Scout`: replacing `Scout` first would leave `-Lead`.
    mapper = RunMapper(
        run_id="r",
        group_agents={"Scout", "Scout-Lead", "Guide"},
        visual_agents=frozenset({"Guide"}),
        user_agent="user",
    )
    said = "Scout-Lead failed after Scout; Guide and Scouting stay"
    assert mapper.unnamed(said) == "a hidden agent failed after a hidden agent; Guide and Scouting stay"


def test_a_record_naming_a_hidden_agent_is_hidden_and_its_words_never_become_the_summary() -> None:
    mapper = RunMapper(
        run_id="r", group_agents={"Scout", "Guide"}, visual_agents=frozenset({"Guide"}), user_agent="user"
    )
    # A handoff by Guide is shown when it names Guide or no agent at all (a target's display name),
    # and hidden when it names the hidden Scout; a raw AG2 event is never shown.
    assert [
        mapper.visible("Guide", True, named) for named in (("Guide",), ("Revert to User",), ("Scout",))
    ] == [
        True,
        True,
        False,
    ]
    assert not mapper.visible("Guide", False) and mapper.visible("user", True) and mapper.visible(None, True)
    # A run whose users saw no agent's words completes without a summary.
    mapper.pending(MessageAgent(content="scoutsecret"), "Scout", None)
    assert mapper.summary is None
    mapper.pending(MessageAgent(content="Three words."), "Guide", None)
    assert mapper.summary == "Three words."
