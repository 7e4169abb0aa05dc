"""Orchestration on AG2 against the real wire server: every AG2 event recorded, patterns, tools, input, stop."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from autogen import ConversableAgent
from autogen.agentchat.group.targets.transition_target import (
    AgentNameTarget,
    AgentTarget,
    TransitionTarget,
)
from autogen.events.agent_events import (
    ExecutedFunctionEvent,
    ExecuteFunctionEvent,
    TextEvent,
    ToolCallEvent,
)
from pydantic import BaseModel, ConfigDict, field_serializer

from app.runs.orchestrator import Orchestrator
from app.runs.recorder import RunMapper, live_object
from app.runs.ui import UiNote
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.events import (
    Ag2Event,
    InputReceived,
    MessageUser,
    Pending,
    Record,
    RunStopped,
    StreamRef,
    ToolCalled,
    ToolResult,
    UiRequested,
)
from domain.store import MongoEventStore
from tests.bare import run_bare

EXAMPLES = Path(__file__).resolve().parent.parent / "workflows"
MESSAGE = "Write about solar energy and keep notes"
# Records the runtime writes itself around AG2's events (besides llm.call / context.updated / terminal).
OWN_PREFIX = ["chat.created", "message.user", "run.started"]


@pytest.fixture(autouse=True)
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file tool's sandbox for this test."""
    monkeypatch.setenv("MOZAIKS_WORKSPACE", str(tmp_path / "workspace"))
    return tmp_path / "workspace"


@pytest.fixture
def orchestrator(store: MongoEventStore) -> Orchestrator:
    settings = Settings(workflows_path=EXAMPLES)
    assert settings.offline
    return Orchestrator(store, WorkflowManager(EXAMPLES), settings)


async def records_of(store: MongoEventStore, chat_id: str) -> list[Record]:
    return [record async for record in store.read(chat_id)]


class Answerer:
    """Answers each `input.requested` of a chat by appending `input.received` to the log (as the API would)."""

    def __init__(
        self, store: MongoEventStore, stream: StreamRef, answers: list[str], *, with_id: bool = True
    ):
        self.answers = list(answers)
        self.given: list[str] = []
        self.task = asyncio.create_task(self._answer(store, stream, with_id))

    async def _answer(self, store: MongoEventStore, stream: StreamRef, with_id: bool) -> None:
        async for record in store.subscribe(stream.chat_id):
            if record.type == "input.requested" and self.answers:
                text = self.answers.pop(0)
                self.given.append(text)
                request_id = record.data["request_id"] if with_id else None
                await store.append(
                    stream,
                    [Pending(event=InputReceived(request_id=request_id, text=text))],
                    expected_seq=None,
                )

    def close(self) -> None:
        self.task.cancel()


ANSWERS: dict[str, list[str]] = {"Assistant": ["Please add honey facts", "exit"]}


@pytest.mark.parametrize("name", ["Generator", "Analyzer", "Assistant", "Brainstorm"])
async def test_example_workflow_runs_end_to_end_with_every_event_recorded(
    orchestrator: Orchestrator, store: MongoEventStore, name: str
) -> None:
    stream = await orchestrator.create_chat(workflow=name, user_id="u1", app_id="app", message=MESSAGE)
    answerer = Answerer(store, stream, ANSWERS.get(name, []))
    try:
        outcome = await asyncio.wait_for(orchestrator.run(stream), 30)
    finally:
        answerer.close()
    assert outcome == "run.completed"
    records = await records_of(store, stream.chat_id)
    types = [r.type for r in records]
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert types[:3] == OWN_PREFIX and types[-1] == "run.completed"
    assert (await store.verify(stream.chat_id)).ok

    report = orchestrator.last_report
    assert report is not None and report.outcome == "run.completed"
    from_ag2 = [r for r in records if r.ag2 is not None]
    # Every AG2 event seen became exactly one record, in the order it was seen, kept whole.
    assert [json.loads(r.ag2)["content"]["uuid"] for r in from_ag2] == report.ag2_uuids  # type: ignore[arg-type]
    own = [r for r in records if r.ag2 is None]
    inputs = types.count("input.received")
    assert len(own) == len(OWN_PREFIX) + report.runtime_events + inputs
    assert len(records) == report.ag2_events + report.runtime_events + len(OWN_PREFIX) + inputs
    assert {r.type for r in own} <= {
        *OWN_PREFIX,
        "llm.call",
        "context.updated",
        "input.received",
        "run.completed",
        "message.delta",
        "message.agent",
    }
    assert report.deltas == types.count("message.delta") > 0
    assert all(r.run_id == report.run_id for r in records[2:] if r.type != "input.received")

    if name != "Brainstorm":  # Random picks differ between runs; the others are deterministic
        # Counted independently: the same workflow on bare AG2 (no recording) yields as many events.
        bare_events, bare_backend = await run_bare(
            orchestrator.workflows.get(name), MESSAGE, answers=ANSWERS.get(name)
        )
        assert len(from_ag2) == len(bare_events)
        assert [json.loads(r.ag2)["type"] for r in from_ag2] == [e.type for e in bare_events]  # type: ignore[arg-type]
        assert types.count("llm.call") == bare_backend.calls


async def test_visibility_follows_visual_agents(orchestrator: Orchestrator, store: MongoEventStore) -> None:
    stream = await orchestrator.create_chat(workflow="Generator", user_id="u", app_id="a", message=MESSAGE)
    await orchestrator.run(stream)
    records = await records_of(store, stream.chat_id)
    by_agent = {(r.agent, r.visible) for r in records if r.type == "message.agent"}
    assert by_agent == {("Orchestrator", False), ("Generator", True), ("Reviewer", True)}
    assert all(r.visible for r in records if r.agent is None and r.type != "ag2.event")
    assert not any(r.visible for r in records if r.type == "ag2.event")


def speakers(records: list[Record]) -> list[str]:
    """Agents given the floor, without the tool executor and its hand-back to the same agent."""
    order: list[str] = []
    for record in records:
        speaker = record.data.get("speaker") if record.type == "speaker.selected" else None
        if speaker not in (None, "_Group_Tool_Executor") and (not order or order[-1] != speaker):
            order.append(speaker)
    return order


async def run_workflow(
    orchestrator: Orchestrator, store: MongoEventStore, name: str, answers: list[str] | None = None
) -> list[Record]:
    stream = await orchestrator.create_chat(workflow=name, user_id="u", app_id="a", message=MESSAGE)
    answerer = Answerer(store, stream, answers or [])
    try:
        await asyncio.wait_for(orchestrator.run(stream), 30)
    finally:
        answerer.close()
    return await records_of(store, stream.chat_id)


async def test_round_robin_gives_the_floor_in_agent_order(
    orchestrator: Orchestrator, store: MongoEventStore
) -> None:
    records = await run_workflow(orchestrator, store, "Analyzer")
    order = speakers(records)
    cycle = ["Collector", "Analyst", "Summarizer"]
    assert order == [cycle[i % 3] for i in range(len(order))] and len(order) >= 3
    handoffs = [(r.data["source"], r.data["target"]) for r in records if r.type == "handoff"]
    assert handoffs[:2] == [("Collector", "Analyst"), ("Analyst", "Summarizer")]


async def test_default_pattern_follows_the_llm_handoff(
    orchestrator: Orchestrator, store: MongoEventStore
) -> None:
    records = await run_workflow(orchestrator, store, "Assistant", ["exit"])
    handoff = next(r for r in records if r.type == "handoff")
    assert (handoff.data["source"], handoff.data["target"], handoff.data["kind"]) == (
        "Concierge",
        "Researcher",
        "llm_condition",
    )
    assert handoff.data["reason"] == "Transfer to Researcher"  # the target's own description
    assert speakers(records)[:3] == ["Concierge", "Researcher", "user"]
    # The handoff event held live AG2 objects; its JSON was written by the recorder itself.
    raw = json.loads(handoff.ag2)  # type: ignore[arg-type]
    assert raw["type"] == "on_condition_l_l_m_transition"
    assert raw["content"]["source_agent"] == "Concierge"
    assert raw["content"]["transition_target"]["agent_name"] == "Researcher"


def test_an_ag2_events_live_objects_are_stored_as_json_each_in_its_documented_form() -> None:
    # An agent as its name, a transition target as its type, name and fields (type and name alone
    # when its fields do not serialise), an exception as its type and message, a model as its
    # fields, a callback as null, anything else as its repr.
    scout = ConversableAgent("Scout", llm_config=False)

    class Exotic(TransitionTarget):
        weight: int = 1

        @field_serializer("weight")
        def _refuse(self, weight: int) -> int:
            raise ValueError("not serialisable")

        def display_name(self) -> str:
            return "exotic"

    class Then(TransitionTarget):
        then: TransitionTarget  # a field typed with the base class keeps its subclass's fields
        by: Any = None  # a live agent inside a target: its name

        def display_name(self) -> str:
            return "then"

    class Note(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        by: Any
        error: Any
        target: TransitionTarget
        n: int = 2

    assert live_object(scout) == "Scout"
    assert live_object(AgentTarget(scout)) == {
        "target_type": "AgentTarget",
        "display_name": "Scout",
        "agent_name": "Scout",
    }
    assert live_object(Exotic()) == {"target_type": "Exotic", "display_name": "exotic"}
    assert live_object(Then(then=AgentNameTarget(agent_name="Closer"), by=scout)) == {
        "target_type": "Then",
        "display_name": "then",
        "then": {"agent_name": "Closer"},
        "by": "Scout",
    }
    assert live_object(ValueError("no model")) == {"error_type": "ValueError", "message": "no model"}
    assert live_object(Note(by=scout, error=KeyError("k"), target=AgentNameTarget(agent_name="Guide"))) == {
        "by": "Scout",
        "error": {"error_type": "KeyError", "message": "'k'"},
        "target": {"agent_name": "Guide"},
        "n": 2,
    }
    assert live_object(len) is None
    assert live_object(3j) == "3j"


def test_an_ag2_event_that_is_not_a_model_is_kept_as_its_type_and_repr_and_names_only_a_group_agent() -> None:
    mapper = RunMapper(
        run_id="r", group_agents={"Scout", "Guide"}, visual_agents=frozenset({"Guide"}), user_agent="user"
    )

    class Odd:
        def __init__(self, sender: str) -> None:
            self.sender = sender

        def __repr__(self) -> str:
            return f"Odd({self.sender})"

    for sender, agent in (("Scout", "Scout"), ("user", "user"), ("stranger", None)):
        pending = mapper.map_one(Odd(sender))
        assert json.loads(pending.ag2 or "") == {"type": "Odd", "repr": f"Odd({sender})"}
        assert (pending.event, pending.agent, pending.visible, pending.run_id) == (
            Ag2Event(name="Odd"),
            agent,
            False,
            "r",
        )


def test_a_tool_call_is_recorded_under_its_caller_with_its_arguments_as_written() -> None:
    mapper = RunMapper(
        run_id="r", group_agents={"Scout", "Guide"}, visual_agents=frozenset({"Guide"}), user_agent="user"
    )
    called = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
    asked = mapper.map_one(ToolCallEvent(tool_calls=[called], sender="Scout", recipient="Guide"))
    # AG2's own tool_call event stays raw (never shown), under the agent that asked.
    assert (asked.event, asked.agent, asked.visible) == (Ag2Event(name="tool_call"), "Scout", False)
    run = mapper.map_one(
        ExecuteFunctionEvent(func_name="lookup", call_id="c1", arguments={}, recipient="Guide")
    )
    assert (run.event, run.agent) == (ToolCalled(tool="lookup", call_id="c1", arguments="{}"), "Scout")
    # A call whose tool_call event was not seen: the executor's recipient and the arguments it got.
    unseen = ExecuteFunctionEvent(func_name="lookup", call_id="c7", arguments={"n": 1}, recipient="Guide")
    assert (mapper.map_one(unseen).event, mapper.map_one(unseen).agent) == (
        ToolCalled(tool="lookup", call_id="c7", arguments='{"n": 1}'),
        "Guide",
    )
    # A call without an id (AG2's older function calls): its call, its result and a UI request it
    # makes carry an empty call id; a result is text whatever the tool returned.
    legacy = ExecuteFunctionEvent(func_name="legacy", call_id=None, arguments={}, recipient="Guide")
    assert mapper.map_one(legacy).event == ToolCalled(tool="legacy", call_id="", arguments="{}")
    returned = ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], {"n": 1})
    results = [
        mapper.map_one(
            ExecutedFunctionEvent(
                func_name="legacy",
                call_id=None,
                arguments={},
                content=content,
                recipient="Guide",
                is_exec_success=True,
            )
        )
        for content in returned
    ]
    assert [(r.event, r.agent) for r in results] == [
        (ToolResult(tool="legacy", call_id="", content="a\nb"), "Guide"),
        (ToolResult(tool="legacy", call_id="", content="{'n': 1}"), "Guide"),
    ]
    form = UiRequested(request_id="q1", tool_call_id="", tool="legacy", component="form")
    assert mapper.map_ui(UiNote(form)).event == form
    # A reply event without content is an empty message of its agent.
    said = mapper.map_one(TextEvent(content=None, sender="Guide", recipient="Scout"))
    assert (said.event.content, said.agent, said.visible) == ("", "Guide", True)  # type: ignore[union-attr]


async def test_random_pattern_picks_other_agents_of_the_set(
    orchestrator: Orchestrator, store: MongoEventStore
) -> None:
    records = await run_workflow(orchestrator, store, "Brainstorm")
    order = [r.data["speaker"] for r in records if r.type == "speaker.selected"]
    assert order[0] == "Ideator" and len(order) >= 4
    assert set(order) <= {"Ideator", "Critic", "Optimist"}
    assert all(
        a != b for a, b in itertools.pairwise(order)
    )  # a random after-work never picks the speaker itself
    assert {r.data["target"] for r in records if r.type == "handoff"} == {"random"}
    # A random handoff names the agents it chose among: the set's others.
    for handoff in (r for r in records if r.type == "handoff"):
        among = handoff.data["reason"].removeprefix("random choice among ").split(", ")
        assert len(among) == 2 and set(among) < {"Ideator", "Critic", "Optimist"}, handoff.data


async def test_auto_pattern_lets_the_group_manager_choose(
    orchestrator: Orchestrator, store: MongoEventStore
) -> None:
    records = await run_workflow(orchestrator, store, "Generator")
    assert speakers(records) == ["Orchestrator", "Generator", "Reviewer"]
    # Each choice after the entry agent was made by the manager's own LLM call, just before it.
    for speaker in ("Generator", "Reviewer"):
        index = next(
            i for i, r in enumerate(records) if r.type == "speaker.selected" and r.data["speaker"] == speaker
        )
        calls = [r for r in records[:index] if r.type == "llm.call"]
        assert calls[-1].agent == "chat_manager"


async def test_a_raising_tool_gives_an_error_result_and_the_run_continues(
    orchestrator: Orchestrator, store: MongoEventStore
) -> None:
    records = await run_workflow(orchestrator, store, "Analyzer")
    result = next(r for r in records if r.type == "tool.result" and r.data["tool"] == "reference_lookup")
    assert result.data["is_error"] is True
    assert "lookup service unavailable for key 'short-prose'" in result.data["content"]
    after = records[records.index(result) :]
    assert any(r.type == "message.agent" and r.agent == "Analyst" for r in after)
    assert any(r.type == "message.agent" and r.agent == "Summarizer" for r in after)
    assert records[-1].type == "run.completed"


async def test_a_tool_missing_from_tools_json_is_never_callable(
    store: MongoEventStore, tmp_path: Path, workspace: Path
) -> None:
    folder = tmp_path / "workflows"
    shutil.copytree(EXAMPLES / "Analyzer", folder / "Analyzer")
    # The model asks for write_file: a real function of tools/, but not in this workflow's tools.json.
    (folder / "Analyzer" / "fixtures" / "Collector.json").write_text(
        json.dumps(
            [
                {"tool_calls": [{"name": "write_file", "arguments": {"path": "pwned.txt", "content": "x"}}]},
                {"content": "ok"},
            ]
        )
    )
    orchestrator = Orchestrator(store, WorkflowManager(folder), Settings(workflows_path=folder))
    records = await run_workflow(orchestrator, store, "Analyzer")
    assert not (workspace / "pwned.txt").exists()
    assert not any(r.type == "tool.called" and r.data["tool"] == "write_file" for r in records)
    result = next(r for r in records if r.type == "tool.result")
    assert result.data["is_error"] and "Function write_file not found" in result.data["content"]
    assert records[-1].type == "run.completed"


async def test_llm_call_totals_equal_the_scripted_clients_own_count(
    orchestrator: Orchestrator, store: MongoEventStore
) -> None:
    records = await run_workflow(orchestrator, store, "Generator")
    calls = [r for r in records if r.type == "llm.call"]
    report = orchestrator.last_report
    assert report is not None and report.scripted is not None
    n, prompt, completion = report.scripted
    assert len(calls) == n
    assert sum(r.data["prompt_tokens"] for r in calls) == prompt
    assert sum(r.data["completion_tokens"] for r in calls) == completion
    assert all(r.data["offline"] for r in calls)
    # AG2's own summary misses the group manager's speaker-selection calls; ours does not.
    completion_event = json.loads(
        next(r.ag2 for r in records if r.ag2 and '"type":"run_completion"' in r.ag2)
    )
    ag2_prompt = sum(
        usage["prompt_tokens"]
        for key, usage in completion_event["content"]["cost"]["usage_including_cached_inference"].items()
        if key != "total_cost"
    )
    assert ag2_prompt < prompt


async def test_human_input_is_answered_through_the_log(
    orchestrator: Orchestrator, store: MongoEventStore
) -> None:
    stream = await orchestrator.create_chat(workflow="Assistant", user_id="u", app_id="a", message=MESSAGE)
    # The second answer carries no request id: it answers whatever request is open.
    answerer = Answerer(store, stream, ["Please add honey facts", "exit"], with_id=False)
    try:
        assert await asyncio.wait_for(orchestrator.run(stream), 30) == "run.completed"
    finally:
        answerer.close()
    records = await records_of(store, stream.chat_id)
    requested = [r for r in records if r.type == "input.requested"]
    received = [r for r in records if r.type == "input.received"]
    assert len(requested) == 2 and [r.data["text"] for r in received] == ["Please add honey facts", "exit"]
    for request, answer in zip(requested, received, strict=True):
        assert request.seq < answer.seq
        assert json.loads(request.ag2)["content"]["respond"] is None  # type: ignore[arg-type]
        # The question shown to the user is AG2's prompt.
        assert (
            request.data["prompt"] and request.data["prompt"] == json.loads(request.ag2)["content"]["prompt"]
        )  # type: ignore[arg-type]
    # AG2 took the answer as the user's reply: the next message the Researcher saw is the human's.
    echo = next(r for r in records if r.seq > received[0].seq and r.ag2 and '"type":"text"' in r.ag2)
    assert json.loads(echo.ag2)["content"]["content"] == "Please add honey facts"  # type: ignore[arg-type]


async def test_a_run_stopped_in_the_log_cancels_the_run(
    orchestrator: Orchestrator, store: MongoEventStore
) -> None:
    stream = await orchestrator.create_chat(workflow="Assistant", user_id="u", app_id="a", message=MESSAGE)
    run_id = "run-to-stop"

    async def stop_when_asked() -> None:
        async for record in store.subscribe(stream.chat_id):
            if record.type == "input.requested":
                await store.append(
                    stream, [Pending(event=RunStopped(by="u"), run_id=run_id)], expected_seq=None
                )
                return

    stopper = asyncio.create_task(stop_when_asked())
    assert await asyncio.wait_for(orchestrator.run(stream, run_id=run_id), 30) == "run.stopped"
    await stopper
    records = await records_of(store, stream.chat_id)
    terminal = [r.type for r in records if r.type in ("run.completed", "run.failed", "run.stopped")]
    assert terminal == ["run.stopped"]
    assert [r.seq for r in records] == list(range(1, len(records) + 1))


async def test_a_follow_up_run_continues_the_conversation(
    orchestrator: Orchestrator, store: MongoEventStore
) -> None:
    stream = await orchestrator.create_chat(
        workflow="Brainstorm", user_id="u", app_id="a", message="Ideas for our school"
    )
    assert await orchestrator.run(stream) == "run.completed"
    await store.append(stream, [Pending(event=MessageUser(content="More please"))], expected_seq=None)
    assert await orchestrator.run(stream) == "run.completed"
    records = await records_of(store, stream.chat_id)
    assert [r.type for r in records].count("run.started") == 2
    assert [r.seq for r in records] == list(range(1, len(records) + 1))


async def test_unknown_workflow_and_taken_chat_id_are_refused(orchestrator: Orchestrator) -> None:
    from app.runs.workflows import UnknownWorkflow
    from domain.errors import Conflict

    with pytest.raises(UnknownWorkflow, match="'Nope' is not loaded"):
        await orchestrator.create_chat(workflow="Nope", user_id="u", app_id="a", message="hi")
    await orchestrator.create_chat(
        workflow="Analyzer", user_id="u", app_id="a", message="hi", chat_id="fixed"
    )
    with pytest.raises(Conflict):
        await orchestrator.create_chat(
            workflow="Analyzer", user_id="u", app_id="a", message="hi", chat_id="fixed"
        )


def test_cli_run_prints_events_asks_for_input_and_summarises(
    mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from app.cli.runs import run_command

    env = {
        "DATABASE_URI": mongo_uri,
        "MOZAIKS_DB": db_name,
        "MOZAIKS_WORKFLOWS_PATH": str(EXAMPLES),
        "MOZAIKS_WORKSPACE": str(tmp_path / "ws"),
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
    }
    result = CliRunner().invoke(
        run_command, ["Assistant", "Take notes about bees"], input="Add honey\nexit\n", env=env
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("offline mode")
    # Agent text streams onto the line of its first delta; the final message points back at it.
    assert any(
        "Researcher" in line and "message.delta" in line and "I saved notes/research.md" in line
        for line in lines
    )
    assert any(
        "Researcher" in line and "message.agent" in line and "streamed above" in line for line in lines
    )
    assert any("input.received" in line and "Add honey" in line for line in lines)
    assert "run.completed" in lines[-2]
    summary = lines[-1]
    assert (
        summary.startswith("chat ")
        and "· run.completed · 4 LLM calls ·" in summary
        and summary.endswith("offline")
    )
