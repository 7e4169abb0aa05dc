"""Start modes: an AgentDriven chat's run starts on creation (its agent speaks first, after the
workflow's hidden `initial_message`); a UserDriven chat created without a message waits for one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from app.runs.workflows import load_workflow
from domain.store import MongoEventStore
from tests.test_agui import body
from tests.test_agui import run as agui_run
from tests.test_api import wait_for_terminal

INITIAL = "Greet the visitor and ask what brings them here."


def desk_workflow(root: Path, name: str, **start: Any) -> None:
    """A one-agent workflow `name` whose Host says a scripted greeting and ends the run."""
    folder = root / name
    (folder / "fixtures").mkdir(parents=True)
    (folder / "workflow.json").write_text(
        json.dumps({"name": name, "visual_agents": ["Host"], "entry_agent": "Host", "max_turns": 4, **start})
    )
    host = {"name": "Host", "handoffs": {"after_work": "terminate"}}
    (folder / "agents.json").write_text(json.dumps({"agents": [host]}))
    (folder / "fixtures" / "Host.json").write_text(
        json.dumps([{"content": "Welcome! What brings you here?"}])
    )


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    desk_workflow(tmp_path, "Intake", startup_mode="AgentDriven", initial_message=INITIAL)
    desk_workflow(tmp_path, "Desk")
    return tmp_path


async def client_view(ws_url: str, chat_id: str) -> list[dict[str, Any]]:
    """The records a ChatUI is shown, as the WebSocket replays them."""
    events: list[dict[str, Any]] = []
    async with connect(f"{ws_url}/ws/chats/{chat_id}?after=0") as ws, asyncio.timeout(30):
        while (frame := json.loads(await ws.recv()))["type"] != "replay.done":
            if frame["type"] == "event":
                events.append(frame["event"])
    return events


async def test_an_agent_driven_chat_starts_on_creation_and_its_agent_speaks_first(
    start_node: Any, store: MongoEventStore, workflows: Path
) -> None:
    node = await start_node(workflows_path=workflows)
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        listed = {
            w["name"]: w["startup_mode"] for w in (await http.get("/api/workflows")).json()["workflows"]
        }
        assert listed == {"Intake": "AgentDriven", "Desk": "UserDriven"}
        created = await http.post("/api/chats", json={"workflow": "Intake"})
        assert created.status_code == 201, created.text
        chat_id = created.json()["chat_id"]
        assert created.json()["run_id"]
        assert await wait_for_terminal(http, chat_id) == "run.completed"
        seen = await client_view(node.ws_url, chat_id)
        chats = (await http.get("/api/chats")).json()["chats"]
    records = [r async for r in store.read(chat_id)]
    [initial] = [r for r in records if r.type == "message.user"]
    assert initial.data["content"] == INITIAL and initial.data["origin"] == "initial_message"
    assert initial.visible is False and initial.seq == 2
    # The client is never shown the initial message: the first message it sees is the agent's.
    messages = [e for e in seen if e["type"].startswith("message.") and e["type"] != "message.delta"]
    assert messages and messages[0]["type"] == "message.agent" and messages[0]["agent"] == "Host"
    assert all(e["type"] != "message.user" for e in seen)
    # Nor is it the chat's title.
    assert [c["title"] for c in chats if c["chat_id"] == chat_id] == [""]

    # Over AG-UI, a new thread with no messages starts the agent's run too (its greeting streamed).
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        events = await agui_run(http, "Intake", body("t-agent"))
        again = await agui_run(http, "Intake", body("t-agent"))  # repeated: nothing new recorded
    assert [e.type for e in events][:2] == ["RUN_STARTED", "STATE_SNAPSHOT"]
    assert events[-1].type == "RUN_FINISHED" and events[-1].event["outcome"] == {"type": "success"}
    said = [e.event["delta"] for e in events if e.type == "TEXT_MESSAGE_CONTENT"]
    assert "".join(said) == "Welcome! What brings you here?" and INITIAL not in json.dumps(
        [e.event for e in events]
    )
    assert [e.event for e in again] == [e.event for e in events]
    agui = [r async for r in store.read("t-agent")]
    assert [r.type for r in agui if r.type in ("message.user", "run.started")] == [
        "message.user",
        "run.started",
    ]
    assert agui[1].data["origin"] == "initial_message" and not agui[1].visible


async def test_a_user_driven_chat_created_without_a_message_waits_for_its_first_message(
    start_node: Any, store: MongoEventStore, workflows: Path
) -> None:
    node = await start_node(workflows_path=workflows)
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        created = await http.post("/api/chats", json={"workflow": "Desk"})
        assert created.status_code == 201, created.text
        chat_id = created.json()["chat_id"]
        assert created.json()["run_id"] is None
        assert [r.type async for r in store.read(chat_id)] == ["chat.created"]
        sent = await http.post(f"/api/chats/{chat_id}/messages", json={"message": "Hello"})
        assert sent.status_code == 202 and sent.json()["recorded"] == "message.user"
        assert await wait_for_terminal(http, chat_id) == "run.completed"
    types = [r.type async for r in store.read(chat_id)]
    assert types[:3] == ["chat.created", "message.user", "run.started"] and "message.agent" in types
    # Over AG-UI, a UserDriven workflow still needs a user message to start (400, no chat created).
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        refused = await http.post("/ag-ui/Desk", json=body("t-desk"))
    assert (refused.status_code, refused.json()["error"]) == (400, "bad_request"), refused.text
    assert "no user message" in refused.json()["detail"] and await store.last_seq("t-desk") == 0


def test_an_agent_driven_workflow_without_an_initial_message_is_refused_at_load(tmp_path: Path) -> None:
    desk_workflow(tmp_path, "Intake", startup_mode="AgentDriven")
    _, problems = load_workflow(tmp_path / "Intake")
    assert [(p.file, p.path) for p in problems] == [("workflow.json", "$.initial_message")]
    assert "AgentDriven workflow needs an initial_message" in problems[0].detail
