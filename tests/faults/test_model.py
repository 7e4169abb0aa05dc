"""Model faults against a local OpenAI-compatible server: each try recorded, retried per the policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from domain.store import MongoEventStore
from tests.faults.checks import assert_chat_sound, drive_to_end, records_of
from tests.faults.model_server import FaultyModel, solo_workflow
from tests.faults.report import Report


async def start(fault_node: Any, model: FaultyModel, tmp_path: Path, **settings: Any) -> Any:
    return await fault_node(
        "m",
        openai_base_url=model.base_url,
        openai_api_key="sk-test",
        workflows_path=solo_workflow(tmp_path),
        llm_backoff_s=0.05,
        llm_timeout_s=1.0,
        **settings,
    )


async def chat(http: httpx.AsyncClient) -> str:
    created = await http.post("/api/chats", json={"workflow": "Solo", "message": "How are the bees?"})
    assert created.status_code == 201, created.text
    return str(created.json()["chat_id"])


async def test_429_500_stall_and_reset_are_retried_and_each_try_is_an_llm_call(
    fault_store: MongoEventStore, fault_node: Any, report: Report, tmp_path: Path
) -> None:
    name = "model: 429 Retry-After, 500, stall, connection reset"
    model = FaultyModel(["429", "500", "stall", "reset"], stall_s=3.0)
    try:
        node = await start(fault_node, model, tmp_path, llm_attempts=5)
        async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
            chat_id = await chat(http)
            assert await drive_to_end(http, fault_store, chat_id) == "run.completed"
            calls = [r.data for r in await records_of(fault_store, chat_id) if r.type == "llm.call"]
            assert [(c["status"], c["attempt"]) for c in calls] == [
                ("http_429", 1),
                ("http_500", 2),
                ("timeout", 3),
                ("connection", 4),
                ("ok", 5),
            ]
            assert all(c["error"] for c in calls[:4]) and calls[4]["error"] is None
            sound = await assert_chat_sound(http, fault_store, chat_id, node.runtime.orchestrator.reports)
        injected = model.faults_served
        assert injected == 4
    finally:
        model.close()
    report.record(name, injected, sound, {"tries recorded": len(calls)})


async def test_a_spent_retry_budget_fails_the_run_with_reason_model(
    fault_store: MongoEventStore, fault_node: Any, report: Report, tmp_path: Path
) -> None:
    name = "model: retry budget spent"
    model = FaultyModel([], after="503")
    try:
        node = await start(fault_node, model, tmp_path, llm_attempts=3)
        async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
            chat_id = await chat(http)
            assert await drive_to_end(http, fault_store, chat_id) == "run.failed"
            records = await records_of(fault_store, chat_id)
            calls = [r.data for r in records if r.type == "llm.call"]
            assert [(c["status"], c["attempt"]) for c in calls] == [
                ("http_503", 1),
                ("http_503", 2),
                ("http_503", 3),
            ]
            failed = records[-1]
            assert failed.type == "run.failed" and failed.data["reason"] == "model"
            assert "after 3 tries (http_503)" in failed.data["error"]
            injected = model.faults_served
            model.after = "ok"  # the model is back: the chat goes on
            sound = await assert_chat_sound(http, fault_store, chat_id, node.runtime.orchestrator.reports)
    finally:
        model.close()
    report.record(name, injected, sound, {"tries": 3})
