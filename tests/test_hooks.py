"""Hooks, derived context variables and context handoffs, on the Guarded example, against the real wire server."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app.cli.runs import validate_command
from app.runs.orchestrator import Orchestrator
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.events import MessageUser, Pending, Record, StreamRef
from domain.store import MongoEventStore

EXAMPLES = Path(__file__).resolve().parent.parent / "workflows"


@pytest.fixture(autouse=True)
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOZAIKS_WORKSPACE", str(tmp_path / "workspace"))
    return tmp_path / "workspace"


def guarded_copy(tmp_path: Path, hooks: list[dict[str, Any]] | None = None) -> Path:
    """A workflows folder holding a copy of Guarded (with other hooks when given)."""
    folder = tmp_path / "flows"
    shutil.copytree(EXAMPLES / "Guarded", folder / "Guarded")
    if hooks is not None:
        (folder / "Guarded" / "hooks.json").write_text(json.dumps({"hooks": hooks}))
    return folder


def orchestrator_on(store: MongoEventStore, folder: Path, **settings: Any) -> Orchestrator:
    return Orchestrator(store, WorkflowManager(folder), Settings(workflows_path=folder, **settings))


async def run_chat(orchestrator: Orchestrator, message: str = "Write notes about bees") -> list[Record]:
    stream = await orchestrator.create_chat(workflow="Guarded", user_id="u1", app_id="app", message=message)
    await asyncio.wait_for(orchestrator.run(stream), 30)
    return [r async for r in orchestrator.store.read(stream.chat_id)]


def by_seq(records: list[Record]) -> dict[int, Record]:
    return {r.seq: r for r in records}


async def test_hooks_fire_in_order_refuse_a_tool_and_derive_context_that_routes_and_persists(
    store: MongoEventStore, workspace: Path
) -> None:
    orchestrator = orchestrator_on(store, EXAMPLES)
    records = await run_chat(orchestrator)
    assert records[-1].type == "run.completed"
    hooks = [r for r in records if r.type == "hook.called"]
    assert [(h.data["event"], h.agent, h.data["outcome"]) for h in hooks] == [
        ("before_chat", None, "ok"),
        ("before_agent", "Writer", "ok"),
        ("after_agent", "Writer", "ok"),
        ("before_tool", "Writer", "refused"),
        ("before_agent", "Writer", "ok"),
        ("after_agent", "Writer", "ok"),
        ("before_tool", "Writer", "ok"),
        ("after_tool", "Writer", "ok"),
        ("before_agent", "Writer", "ok"),
        ("after_agent", "Writer", "ok"),
        ("after_chat", None, "ok"),
    ]
    assert all(h.data["duration_ms"] >= 0 and h.run_id == records[2].run_id for h in hooks)
    types = [r.type for r in records]
    # In place: before_chat after run.started; each tool hook between tool.called and tool.result.
    assert types.index("hook.called") > types.index("run.started")
    calls = [r for r in records if r.type == "tool.called"]
    results = [r for r in records if r.type == "tool.result"]
    tool_hooks = [h for h in hooks if h.data["event"] in ("before_tool", "after_tool")]
    assert calls[0].seq < tool_hooks[0].seq < results[0].seq < calls[1].seq
    assert calls[1].seq < tool_hooks[1].seq < tool_hooks[2].seq < results[1].seq
    assert hooks[-1].seq > max(r.seq for r in records if r.type == "message.agent")
    # The refusal is the tool's result the agent got; the tool never ran.
    refused = tool_hooks[0]
    assert refused.data["reason"] == "path '../outside.md' is outside the workspace"
    assert results[0].data["content"] == "Refused: path '../outside.md' is outside the workspace"
    assert not (workspace.parent / "outside.md").exists() and (workspace / "notes" / "bees.md").exists()

    seqs = by_seq(records)
    updates = {r.data["name"]: r for r in records if r.type == "context.updated"}
    cause = {name: seqs[u.data["cause"]] for name, u in updates.items()}
    assert (updates["topic"].data["new"], cause["topic"].type) == ("bees", "message.user")
    assert (updates["saved_path"].data["new"], cause["saved_path"].type) == ("notes/bees.md", "tool.result")
    assert cause["saved_path"].seq == results[1].seq
    assert (updates["status"].data["old"], updates["status"].data["new"]) == ("drafting", "ready")
    assert cause["status"].type == "message.agent" and cause["status"].data["content"].endswith(
        "Status: ready"
    )
    assert (updates["tool_calls"].data["new"], cause["tool_calls"].data["event"]) == (1, "after_tool")
    assert cause["started_by"].data["event"] == "before_chat" and updates["started_by"].data["new"] == "u1"
    # The context handoff routes on the derived variable, with the expression that fired.
    [routed] = [r for r in records if r.type == "handoff" and r.data["kind"] == "context_condition"]
    assert (routed.data["target"], routed.data["expression"]) == ("Reviewer", "${status} == 'ready'")
    assert routed.seq > updates["status"].seq

    # A continued chat starts from the restored variables: Writer hands off at once, no model call.
    first = records[0]
    ref = StreamRef(
        chat_id=first.chat_id, app_id=first.app_id, user_id=first.user_id, workflow=first.workflow
    )
    await store.append(ref, [Pending(event=MessageUser(content="And a review please"))], expected_seq=None)
    assert await asyncio.wait_for(orchestrator.run(ref), 30) == "run.completed"
    later = [r async for r in store.read(ref.chat_id) if r.seq > records[-1].seq]
    first_handoff = next(r for r in later if r.type == "handoff")
    assert (first_handoff.data["kind"], first_handoff.data["target"]) == ("context_condition", "Reviewer")
    assert [r.agent for r in later if r.type == "llm.call"] == ["Reviewer"]


@pytest.mark.parametrize(
    ("hook", "settings", "error"),
    [
        (
            {"event": "before_tool", "function": "tools.guards:explode"},
            {},
            "RuntimeError: hook exploded at before_tool",
        ),
        (
            {"event": "before_agent", "function": "tools.guards:linger", "agents": ["Writer"]},
            {"hook_timeout_s": 0.3},
            "timed out after 0.3 s",
        ),
    ],
    ids=["raises", "too_slow"],
)
async def test_a_failing_hook_ends_the_run_with_reason_hook_naming_the_function(
    store: MongoEventStore, tmp_path: Path, hook: dict[str, Any], settings: dict[str, Any], error: str
) -> None:
    orchestrator = orchestrator_on(store, guarded_copy(tmp_path, [hook]), **settings)
    records = await run_chat(orchestrator)
    last = records[-1]
    assert last.type == "run.failed" and last.data["reason"] == "hook"
    assert hook["function"] in last.data["error"] and error in last.data["error"]
    [called] = [r for r in records if r.type == "hook.called"]
    assert called.data["outcome"] == "error" and error in called.data["error"]
    assert (await store.verify(last.chat_id)).ok


def _edit(folder: Path, file: str, change: Callable[[Any], Any]) -> None:
    path = folder / "Guarded" / file
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _condition(expression: str) -> Callable[[Any], Any]:
    def change(doc: Any) -> Any:
        doc["agents"][0]["handoffs"]["context_conditions"][0]["expression"] = expression
        return doc

    return change


def _derived_match(regex: str) -> Callable[[Any], Any]:
    def change(doc: Any) -> Any:
        doc["variables"][0]["derived"]["match"] = regex
        return doc

    return change


BAD: dict[str, tuple[str, Callable[[Any], Any], str]] = {
    "unknown_hook_event": (
        "hooks.json",
        lambda h: {"hooks": [{"event": "before_lunch", "function": "tools.guards:start_chat"}]},
        "hooks.json at $.hooks[0].event: Invalid enum value 'before_lunch'",
    ),
    "missing_function": (
        "hooks.json",
        lambda h: {"hooks": [{"event": "before_chat", "function": "tools.guards:nope"}]},
        "hooks.json at $.hooks[0].function: function not found: tools.guards has no function 'nope'",
    ),
    "bad_signature": (
        "hooks.json",
        lambda h: {"hooks": [{"event": "before_chat", "function": "tools.files:write_file"}]},
        "hooks.json at $.hooks[0].function: tools.files:write_file must take exactly one argument",
    ),
    "bad_regex": (
        "context_variables.json",
        _derived_match("Status: (\\w+"),
        "context_variables.json at $.variables[0].derived.match: bad regular expression",
    ),
    "unknown_variable": (
        "agents.json",
        _condition("${mood} == 'ready'"),
        "agents.json at $.agents[0].handoffs.context_conditions[0].expression: unknown context variable 'mood'",
    ),
    "negative_budget": (
        "workflow.json",
        lambda w: {**w, "budget": {"max_tokens": -5}},
        "workflow.json at $.budget.max_tokens: Expected `int` >= 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_guard_rail_manifests_fail_validate_naming_file_and_path(tmp_path: Path, case: str) -> None:
    folder = guarded_copy(tmp_path)
    file, change, message = BAD[case]
    _edit(folder, file, change)
    result = CliRunner().invoke(validate_command, [str(folder)])
    assert result.exit_code == 1
    assert f"workflow 'Guarded': {message}" in result.output, result.output
