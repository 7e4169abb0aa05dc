"""Workflow manifests: the examples load, and each broken manifest gives its precise error while the others load."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app.cli.runs import validate_command
from app.runs.workflows import WorkflowManager
from tools import files

EXAMPLES = Path(__file__).resolve().parent.parent / "workflows"


def test_example_workflows_load_without_problems() -> None:
    manager = WorkflowManager(EXAMPLES)
    assert manager.errors == []
    assert {"Generator", "Analyzer", "Assistant"} <= set(manager.names())
    patterns = {manager.get(name).pattern for name in manager.names()}
    assert patterns == {"Default", "Auto", "RoundRobin", "Random"}
    generator = manager.get("Generator")
    assert generator.prompts["Orchestrator"].startswith("You are the Orchestrator")
    assert set(generator.tools) == {"generate_content", "write_file", "text_statistics"}
    assert generator.context == {"audience": "general", "drafts": 0}
    assert "Orchestrator" not in generator.visual_agents


def _edit_json(folder: Path, file: str, change: Callable[[Any], Any]) -> None:
    path = folder / file
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _set_agent(index: int, **fields: Any) -> Callable[[Any], Any]:
    def change(doc: Any) -> Any:
        doc["agents"][index].update(fields)
        return doc

    return change


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "bad_json": (
        lambda d: (d / "agents.json").write_text('{"agents": [\n  {"name": "Collector",}\n]}'),
        "workflow 'Broken': agents.json at $: invalid JSON: JSON is malformed: trailing comma in object (line 2, column 24)",
    ),
    "unknown_field": (
        lambda d: _edit_json(d, "agents.json", _set_agent(1, colour="blue")),
        "workflow 'Broken': agents.json at $.agents[1]: Object contains unknown field `colour`",
    ),
    "unknown_entry_agent": (
        lambda d: _edit_json(d, "workflow.json", lambda w: {**w, "entry_agent": "Nobody"}),
        "workflow 'Broken': workflow.json at $.entry_agent: unknown agent 'Nobody' (agents: Collector, Analyst, Summarizer)",
    ),
    "missing_prompt": (
        lambda d: _edit_json(d, "agents.json", _set_agent(2, system_message_file="prompts/missing.md")),
        "workflow 'Broken': agents.json at $.agents[2].system_message_file: prompt file 'prompts/missing.md' not found",
    ),
    "tool_function_not_found": (
        lambda d: _edit_json(
            d,
            "tools.json",
            lambda t: {
                "tools": [{"name": "text_statistics", "function": "tools.text_stats:nope"}, t["tools"][1]]
            },
        ),
        "workflow 'Broken': tools.json at $.tools[0].function: tool not found: tools.text_stats has no function 'nope'",
    ),
    "tool_not_declared": (
        lambda d: _edit_json(d, "agents.json", _set_agent(0, tools=["text_statistics", "shell"])),
        "workflow 'Broken': agents.json at $.agents[0].tools[1]: tool not found: 'shell' is not declared in tools.json",
    ),
    "tool_outside_tools_package": (
        lambda d: _edit_json(
            d,
            "tools.json",
            lambda t: {"tools": [t["tools"][0], {"name": "reference_lookup", "function": "os:system"}]},
        ),
        "workflow 'Broken': tools.json at $.tools[1].function: 'os:system' must be 'tools.<module>:<function>'",
    ),
    "wrong_type": (
        lambda d: _edit_json(d, "workflow.json", lambda w: {**w, "max_turns": "many"}),
        "workflow 'Broken': workflow.json at $.max_turns: Expected `int`, got `str`",
    ),
    "unknown_handoff_target": (
        lambda d: _edit_json(d, "agents.json", _set_agent(0, handoffs={"after_work": "Ghost"})),
        (
            "workflow 'Broken': agents.json at $.agents[0].handoffs.after_work: unknown agent 'Ghost' "
            "(agents: Analyst, Collector, Summarizer; or terminate, user, group_manager, stay)"
        ),
    ),
}


@pytest.fixture
def workflows_dir(tmp_path: Path) -> Path:
    """A workflows folder with two good copies of Analyzer (Good, Broken) to break one of them."""
    for name in ("Good", "Broken"):
        shutil.copytree(EXAMPLES / "Analyzer", tmp_path / name)
        _edit_json(tmp_path / name, "workflow.json", lambda w, n=name: {**w, "name": n})
    return tmp_path


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_gives_its_precise_error_and_the_others_still_load(
    workflows_dir: Path, case: str
) -> None:
    breaks, message = BROKEN[case]
    breaks(workflows_dir / "Broken")
    manager = WorkflowManager(workflows_dir)
    assert [str(error) for error in manager.errors] == [message]
    assert manager.names() == ["Good"]


def test_all_problems_are_reported_at_once(workflows_dir: Path) -> None:
    for case in ("missing_prompt", "unknown_entry_agent", "tool_function_not_found"):
        BROKEN[case][0](workflows_dir / "Broken")
    manager = WorkflowManager(workflows_dir)
    assert sorted(str(e) for e in manager.errors) == sorted(
        BROKEN[c][1] for c in ("missing_prompt", "unknown_entry_agent", "tool_function_not_found")
    )


def test_validate_command_lists_every_problem_and_fails(workflows_dir: Path) -> None:
    BROKEN["missing_prompt"][0](workflows_dir / "Broken")
    BROKEN["bad_json"][0](workflows_dir / "Good")
    result = CliRunner().invoke(validate_command, [str(workflows_dir)])
    assert result.exit_code == 1
    assert BROKEN["bad_json"][1].replace("'Broken'", "'Good'") in result.output
    # Bad JSON in agents.json makes the prompt check impossible for Good, but Broken's is reported.
    assert BROKEN["missing_prompt"][1] in result.output
    assert "2 problems" in result.output


def test_validate_command_passes_on_the_examples() -> None:
    result = CliRunner().invoke(validate_command, [str(EXAMPLES)])
    assert result.exit_code == 0, result.output
    assert "Generator" in result.output and "ok" in result.output


def test_file_tool_stays_inside_its_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOZAIKS_WORKSPACE", str(tmp_path / "ws"))
    (tmp_path / "secret.txt").write_text("top secret")
    assert files.write_file("notes/a.md", "hello") == "wrote 5 bytes to notes/a.md"
    assert files.read_file("notes/a.md") == "hello"
    assert files.list_files() == "notes/a.md"
    os.symlink(tmp_path / "secret.txt", tmp_path / "ws" / "link.txt")
    for escape in ("../secret.txt", str(tmp_path / "secret.txt"), "notes/../../secret.txt", "link.txt"):
        with pytest.raises(files.WorkspaceError, match="outside the workspace"):
            files.read_file(escape)
    with pytest.raises(files.WorkspaceError, match="outside the workspace"):
        files.write_file("../escaped.txt", "x")
    assert not (tmp_path / "escaped.txt").exists()
