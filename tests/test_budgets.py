"""Budgets against the real wire server: chat and daily limits stop runs before a model call, the
bound on overshoot under racing runs, 429 `budget_exceeded`, GET /api/budgets, and the spend
projection rebuilt equal to the live one."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from app.runs.orchestrator import Orchestrator
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.budgets import BudgetsFile
from domain.events import Record
from domain.store import MongoEventStore
from projections.budgets import COLLECTION
from projections.rebuild import rebuild
from tests.llm_server import Reply, StreamingModel
from tests.test_agui import body

EXAMPLES = Path(__file__).resolve().parent.parent / "workflows"
# Every scripted call of the Spender workflow spends exactly this many tokens (4 calls a run).
CALL_TOKENS = 100


@pytest.fixture(autouse=True)
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOZAIKS_WORKSPACE", str(tmp_path / "workspace"))
    return tmp_path / "workspace"


def spender(tmp_path: Path, budget: dict[str, Any] | None) -> Path:
    """A workflows folder with Spender: Guarded without hooks, each call 100 tokens, `budget` per chat."""
    folder = tmp_path / "flows" / "Spender"
    shutil.copytree(EXAMPLES / "Guarded", folder)
    (folder / "hooks.json").unlink()
    manifest = json.loads((folder / "workflow.json").read_text())
    manifest.update(name="Spender", **({"budget": budget} if budget else {}))
    (folder / "workflow.json").write_text(json.dumps(manifest))
    for fixture in (folder / "fixtures").glob("*.json"):
        replies = json.loads(fixture.read_text())
        for reply in replies:
            reply.update(prompt_tokens=CALL_TOKENS - 10, completion_tokens=10)
        fixture.write_text(json.dumps(replies))
    return folder.parent


def orchestrator_on(
    store: MongoEventStore, folder: Path, budgets: dict[str, Any] | None = None
) -> Orchestrator:
    orchestrator = Orchestrator(store, WorkflowManager(folder), Settings(workflows_path=folder))
    if budgets is not None:
        import msgspec

        orchestrator.budgets.file = msgspec.convert(budgets, BudgetsFile)
    return orchestrator


async def run_chat(orchestrator: Orchestrator, user: str = "u1") -> list[Record]:
    stream = await orchestrator.create_chat(
        workflow="Spender", user_id=user, app_id="app", message="notes about bees"
    )
    await asyncio.wait_for(orchestrator.run(stream), 60)
    return [r async for r in orchestrator.store.read(stream.chat_id)]


def tokens(records: list[Record]) -> list[int]:
    return [r.data["prompt_tokens"] + r.data["completion_tokens"] for r in records if r.type == "llm.call"]


async def test_a_chat_budget_stops_the_run_before_the_call_that_would_start_over_it(
    store: MongoEventStore, tmp_path: Path
) -> None:
    orchestrator = orchestrator_on(store, spender(tmp_path, {"max_tokens": 250}))
    records = await run_chat(orchestrator)
    last = records[-1]
    assert last.type == "run.stopped" and last.data["reason"] == "budget"
    assert last.data["budget"]["limit"] == "chat.max_tokens"
    assert (last.data["budget"]["spend"], last.data["budget"]["max"]) == (300, 250)
    assert last.data["budget"]["resets_at"] is None
    # Calls started at 0, 100 and 200 tokens; the fourth (at 300) was never made.
    assert tokens(records) == [100, 100, 100]
    assert (await store.verify(last.chat_id)).ok


async def test_a_daily_app_budget_stops_runs_in_two_chats(store: MongoEventStore, tmp_path: Path) -> None:
    orchestrator = orchestrator_on(
        store, spender(tmp_path, None), {"apps": {"app": {"daily": {"max_tokens": 250}}}}
    )
    first = await run_chat(orchestrator, "u1")
    second = await run_chat(orchestrator, "u2")
    assert tokens(first) == [100, 100, 100] and tokens(second) == []
    for records in (first, second):
        stop = records[-1]
        assert stop.type == "run.stopped" and stop.data["budget"]["limit"] == "app_day.max_tokens"
        assert stop.data["budget"]["spend"] == 300 and stop.data["budget"]["resets_at"].endswith(
            "T00:00:00+00:00"
        )


async def test_racing_runs_overshoot_a_budget_by_no_more_than_the_calls_in_flight(
    store: MongoEventStore, tmp_path: Path
) -> None:
    limit = 1000
    orchestrator = orchestrator_on(
        store, spender(tmp_path, None), {"apps": {"app": {"daily": {"max_tokens": limit}}}}
    )
    runs = 10
    chats = await asyncio.gather(*(run_chat(orchestrator, f"u{i}") for i in range(runs)))
    spent = sum(sum(tokens(records)) for records in chats)
    stopped = [records[-1] for records in chats if records[-1].type == "run.stopped"]
    assert stopped and all(r.data["budget"]["limit"] == "app_day.max_tokens" for r in stopped)
    # Each run has at most one call in flight: a call starts only under the limit, so the spend
    # ends at most `runs` calls past it (README "Budgets").
    assert limit <= spent < limit + runs * CALL_TOKENS, spent


async def test_over_http_429_budgets_endpoint_prometheus_and_a_rebuilt_projection(
    start_node: Any, store: MongoEventStore, db: Any, tmp_path: Path
) -> None:
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({"default": {"daily": {"max_tokens": 500}}}))
    node = await start_node(workflows_path=spender(tmp_path, {"max_tokens": 250}), budgets_path=budgets)
    async with httpx.AsyncClient(base_url=node.url) as http:

        async def chat_until_stopped() -> tuple[str, dict[str, Any]]:
            chat_id = (await http.post("/api/chats", json={"workflow": "Spender", "message": "bees"})).json()[
                "chat_id"
            ]
            async with asyncio.timeout(60):
                while True:
                    events = (await http.get(f"/api/chats/{chat_id}/events")).json()["events"]
                    if events[-1]["type"] in ("run.completed", "run.failed", "run.stopped"):
                        return chat_id, events[-1]
                    await asyncio.sleep(0.1)

        first, stop = await chat_until_stopped()
        assert (stop["type"], stop["data"]["budget"]["limit"]) == ("run.stopped", "chat.max_tokens")
        refused = await http.post(f"/api/chats/{first}/messages", json={"message": "more"})
        assert refused.status_code == 429 and refused.json()["error"] == "budget_exceeded"
        assert "chat.max_tokens" in refused.json()["detail"] and "retry-after" not in refused.headers
        # The ChatUI sends over the socket: the same refusal comes back as an error frame.
        async with connect(f"{node.ws_url}/ws/chats/{first}?after=1000000") as ws:
            await ws.send(json.dumps({"type": "user.message", "text": "more"}))
            async with asyncio.timeout(10):
                while (frame := json.loads(await ws.recv()))["type"] != "error":
                    pass
        assert frame["code"] == "budget_exceeded" and "chat.max_tokens" in frame["message"]
        # And over AG-UI: the new turn is refused up front (the REST route's check and error shape).
        before = await store.last_seq(first)
        agui = await http.post("/ag-ui/Spender", json=body(first, ("m-more", "more")))
        assert (agui.status_code, agui.json()["error"]) == (429, "budget_exceeded"), agui.text
        assert "chat.max_tokens" in agui.json()["detail"] and await store.last_seq(first) == before
        # The app has 300 of 500 left: a second chat runs until the app's daily limit stops it.
        second, stop = await chat_until_stopped()
        assert (stop["data"]["budget"]["limit"], stop["data"]["budget"]["spend"]) == (
            "app_day.max_tokens",
            500,
        )
        for refused in (
            await http.post("/api/chats", json={"workflow": "Spender", "message": "again"}),
            await http.post(f"/api/chats/{second}/messages", json={"message": "more"}),
        ):
            assert refused.status_code == 429 and refused.json()["error"] == "budget_exceeded"
            assert "app_day.max_tokens" in refused.json()["detail"]
            assert 0 < int(refused.headers["retry-after"]) <= 86400
        # A new AG-UI thread of the spent app: refused before its chat is created (nothing started).
        agui = await http.post("/ag-ui/Spender", json=body("t-spent", ("m1", "again")))
        assert (agui.status_code, agui.json()["error"]) == (429, "budget_exceeded"), agui.text
        assert "app_day.max_tokens" in agui.json()["detail"] and "retry-after" in agui.headers
        assert await store.last_seq("t-spent") == 0
        shown = (await http.get("/api/budgets")).json()
        assert shown["app"]["spent_tokens"] == 500 and shown["app"]["remaining_tokens"] == 0
        assert shown["resets_at"].endswith("T00:00:00+00:00")
        metrics = (await http.get("/metrics")).text
        assert 'mozaiks_budget_stops_total{kind="chat"}' in metrics
        assert 'mozaiks_budget_stops_total{kind="app_day"}' in metrics
    await node.runtime.projections.wait_caught_up(30)
    live = {doc["_id"]: doc async for doc in db[COLLECTION].find({})}
    assert {doc["tokens"] for doc in live.values()} == {300, 200}
    await rebuild(db, store, names=["budgets"])
    rebuilt = {doc["_id"]: doc async for doc in db[COLLECTION].find({})}
    assert rebuilt == live


async def test_through_an_openai_compatible_server_the_refused_call_never_reaches_the_model(
    store: MongoEventStore, tmp_path: Path
) -> None:
    folder = spender(tmp_path, {"max_tokens": CALL_TOKENS})
    model = StreamingModel(
        [
            Reply(chunks=["Saved.", " Status: ready"], prompt_tokens=CALL_TOKENS - 10, completion_tokens=10),
            Reply(chunks=["Approved."], prompt_tokens=CALL_TOKENS - 10, completion_tokens=10),
        ]
    )
    try:
        settings = Settings(openai_base_url=model.base_url, workflows_path=folder)
        orchestrator = Orchestrator(store, WorkflowManager(folder), settings)
        records = await run_chat(orchestrator)
    finally:
        model.close()
    # The Writer's call (100 tokens) was made; the Reviewer's, at 100 of 100, was not.
    assert len(model.requests) == 1 and tokens(records) == [CALL_TOKENS]
    stop = records[-1]
    assert (stop.type, stop.data["reason"], stop.data["budget"]["limit"]) == (
        "run.stopped",
        "budget",
        "chat.max_tokens",
    )
