"""Structured outputs: the schema reaches the model (OpenAI `json_schema`, strict), every reply is
validated, invalid ones are recorded and retried with their errors, a valid one is `data.structured`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from app.runs.orchestrator import Orchestrator
from app.runs.workflows import WorkflowManager, load_workflow
from app.settings import Settings
from domain.store import MongoEventStore
from projections.rebuild import rebuild
from tests.llm_server import StreamingModel, text_reply

TICKET = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "title": "Title"},
        "priority": {"type": "integer", "title": "Priority", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "priority", "tags"],
    "additionalProperties": False,
}
VALID = {"title": "Printer on fire", "priority": 1, "tags": ["hardware"]}


def ticket_workflow(root: Path, replies: list[dict[str, Any]] | None, *, max_retries: int = 2) -> Path:
    """`Triage`: one visible agent, Clerk, answering in the `ticket` structure (declared in
    structured_outputs.json), with scripted offline replies."""
    folder = root / "workflows" / "Triage"
    (folder / "fixtures").mkdir(parents=True)
    (folder / "workflow.json").write_text(
        json.dumps({"name": "Triage", "visual_agents": ["Clerk"], "entry_agent": "Clerk", "max_turns": 4})
    )
    (folder / "structured_outputs.json").write_text(
        json.dumps({"outputs": [{"name": "ticket", "schema": TICKET, "max_retries": max_retries}]})
    )
    clerk = {"name": "Clerk", "structured_output": "ticket", "handoffs": {"after_work": "terminate"}}
    (folder / "agents.json").write_text(json.dumps({"agents": [clerk]}))
    if replies is not None:
        (folder / "fixtures" / "Clerk.json").write_text(json.dumps(replies))
    return folder.parent


async def run_triage(store: MongoEventStore, workflows: Path, **settings: Any) -> list[Any]:
    orchestrator = Orchestrator(
        store, WorkflowManager(workflows), Settings(workflows_path=workflows, **settings)
    )
    stream = await orchestrator.create_chat(workflow="Triage", user_id="u", app_id="a", message="Printer!")
    await orchestrator.run(stream)
    return [r async for r in store.read(stream.chat_id)]


async def test_an_invalid_reply_is_recorded_and_asked_again_then_the_valid_one_is_structured(
    store: MongoEventStore, tmp_path: Path
) -> None:
    workflows = ticket_workflow(
        tmp_path,
        [{"structured": {"title": "Printer on fire", "priority": "high", "tags": []}}, {"structured": VALID}],
    )
    records = await run_triage(store, workflows)
    types = [r.type for r in records]
    assert types[-1] == "run.completed", types
    [invalid] = [r for r in records if r.type == "output.invalid"]
    assert invalid.agent == "Clerk" and invalid.data["agent"] == "Clerk" and invalid.data["attempt"] == 1
    assert invalid.data["output"] == "ticket"
    assert [e["path"] for e in invalid.data["errors"]] == ["$.priority"]
    assert "'high' is not of type 'integer'" in invalid.data["errors"][0]["message"]
    [message] = [r for r in records if r.type == "message.agent"]
    assert message.data["structured"] == VALID and json.loads(message.data["content"]) == VALID
    # Not streamed: recorded whole, by its agent, with its recipient and AG2's own event kept.
    assert (message.agent, message.data["recipient"]) == ("Clerk", "chat_manager")
    assert re.fullmatch("[0-9a-f]{32}", message.data["message_id"]), message.data  # an id of its own
    assert message.ag2 is not None and json.loads(message.ag2)["content"]["sender"] == "Clerk"
    assert invalid.seq < message.seq
    # The invalid attempt is never shown as a half message: structured replies are not streamed.
    assert "message.delta" not in types

    # Metrics count the invalid attempt for the agent; a rebuild from the log recomputes it.
    await rebuild(store.db, store, names=["metrics"], chat_id=message.chat_id)
    metrics = await store.db["chat_metrics"].find_one({"_id": message.chat_id})
    assert metrics is not None
    assert metrics["invalid_outputs"] == 1 and metrics["agents"]["Clerk"]["invalid_outputs"] == 1


async def test_only_invalid_replies_fail_the_run_with_reason_output_naming_agent_and_error(
    store: MongoEventStore, tmp_path: Path
) -> None:
    workflows = ticket_workflow(tmp_path, [{"content": "Sure! It is urgent."}], max_retries=1)
    records = await run_triage(store, workflows)
    invalid = [r for r in records if r.type == "output.invalid"]
    assert [r.data["attempt"] for r in invalid] == [1, 2]
    assert (
        invalid[0].data["errors"][0]["path"] == "$" and "not JSON" in invalid[0].data["errors"][0]["message"]
    )
    failed = records[-1]
    assert failed.type == "run.failed" and failed.data["reason"] == "output"
    assert (
        "agent Clerk" in failed.data["error"]
        and "first error at $: the reply is not JSON" in failed.data["error"]
    )
    assert not [r for r in records if r.type == "message.agent"]


def test_schemas_are_checked_at_load_naming_file_and_json_path(tmp_path: Path) -> None:
    workflows = ticket_workflow(tmp_path, None)
    folder = workflows / "Triage"
    loose = {"type": "object", "properties": {"n": {"type": "nmber"}}}
    (folder / "structured_outputs.json").write_text(
        json.dumps({"outputs": [{"name": "ticket", "schema": loose}]})
    )
    clerk = {"name": "Clerk", "structured_output": "tiket"}
    inline = {
        "name": "Scribe",
        "structured_output": {
            "name": "note",
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        },
    }
    (folder / "agents.json").write_text(json.dumps({"agents": [clerk, inline]}))
    _, problems = load_workflow(folder)
    found = sorted((p.file, p.path, p.detail.split(":")[0]) for p in problems)
    assert found == [
        (
            "agents.json",
            "$.agents[0].structured_output",
            "unknown structured output 'tiket' (declared in structured_outputs.json",
        ),
        ("agents.json", "$.agents[1].structured_output.schema", 'strict mode needs "additionalProperties"'),
        (
            "agents.json",
            "$.agents[1].structured_output.schema",
            'strict mode needs every property in "required"; missing',
        ),
        ("structured_outputs.json", "$.outputs[0].schema.properties.n.type", "not a valid JSON Schema"),
    ], found


@pytest.fixture
def model() -> Any:
    server = StreamingModel(
        [text_reply('{"title": "Printer", "priority": 9, "tags": []}', 3), text_reply(json.dumps(VALID), 4)]
    )
    yield server
    server.close()


async def test_the_schema_reaches_an_openai_compatible_model_as_strict_json_schema_with_the_errors_after(
    store: MongoEventStore, tmp_path: Path, model: StreamingModel
) -> None:
    workflows = ticket_workflow(tmp_path, None)
    records = await run_triage(
        store, workflows, openai_api_key="sk-test", openai_base_url=model.base_url, openai_model="m"
    )
    assert records[-1].type == "run.completed"
    first, second = model.requests
    assert first["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "ticket", "schema": TICKET, "strict": True},
    }
    assert second["response_format"] == first["response_format"]
    # Asked again with what was wrong, after its own invalid reply.
    assert second["messages"][-2] == {
        "role": "assistant",
        "content": '{"title": "Printer", "priority": 9, "tags": []}',
    }
    assert "$.priority: 9 is greater than the maximum of 5" in second["messages"][-1]["content"]
    [message] = [r for r in records if r.type == "message.agent"]
    assert message.data["structured"] == VALID
