"""Model I/O, replay, diff and fixtures export (issue 25) against the local OpenAI-compatible server.

Chats are recorded online (the real `openai` SDK against `tests/llm_server.py`), on the real wire server.
"""

from __future__ import annotations

import json
import shutil
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.http.auth import issue_token
from app.runs.orchestrator import Orchestrator
from app.runs.replay import replay, run_turn
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.events import ChatCreated, MessageUser, Pending, StreamRef, UiResponded
from domain.model_io import PARTS_COLLECTION, call_hashes, canonical
from domain.store import MongoEventStore
from tests.cli import invoke
from tests.llm_server import Reply, StreamingModel, ToolCall, solo_workflow

SECRET = "test-secret-of-at-least-thirty-two-bytes!"
PROMPT = "You are the Writer. Count words with text_statistics."
# Twenty turns of two calls each: the 40-call chat the storage promise is measured on.
QUESTIONS = [
    "Count: one two three",
    "Count: four five",
    *(f"Count: {' '.join(['word'] * (n % 5 + 1))} {n}" for n in range(17)),
    "Count: six",
]


def script() -> list[Reply]:
    """Per question: a tool call, then the answer (two model calls a turn)."""
    replies: list[Reply] = []
    for n, question in enumerate(QUESTIONS):
        text = question.split(": ")[1]
        replies.append(
            Reply(tool_calls=[ToolCall(f"call_{n}", "text_statistics", json.dumps({"text": text}))])
        )
        replies.append(Reply(chunks=[f"{len(text.split())} words", "."], prompt_tokens=40 + n))
    return replies


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    return solo_workflow(tmp_path, tool="text_statistics:tools.text_stats:text_statistics", prompt=PROMPT)


@pytest.fixture
def model() -> Iterator[StreamingModel]:
    server = StreamingModel(script())
    yield server
    server.close()


@pytest.fixture
def env(mongo_uri: str, db_name: str, workflows: Path, model: StreamingModel) -> dict[str, str]:
    """The CLI's environment: the test database, the workflows, the local model server."""
    return {
        "DATABASE_URI": mongo_uri,
        "MOZAIKS_DB": db_name,
        "MOZAIKS_AUTH_SECRET": SECRET,
        "MOZAIKS_WORKFLOWS_PATH": str(workflows),
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_MODEL": "test-model",
        "MOZAIKS_LLM_ATTEMPTS": "1",
    }


def audit(*args: str, env: dict[str, str]) -> Any:
    from app.cli.audit import audit_group

    return invoke(audit_group, *args, env=env)


def online(model: StreamingModel, workflows: Path, **fields: Any) -> Settings:
    return Settings(
        openai_api_key="sk-test",
        openai_base_url=model.base_url,
        openai_model="test-model",
        workflows_path=workflows,
        llm_attempts=1,
        **fields,
    )


async def converse(orchestrator: Orchestrator, store: MongoEventStore, questions: list[str]) -> StreamRef:
    """A chat of `questions`, one run each (the history grows: call k repeats call k-1's messages)."""
    stream = await orchestrator.create_chat(workflow="Solo", user_id="u", app_id="P", message=questions[0])
    assert await orchestrator.run(stream) == "run.completed"
    for question in questions[1:]:
        await store.append(stream, [Pending(event=MessageUser(content=question))], expected_seq=None)
        assert await orchestrator.run(stream) == "run.completed"
    return stream


async def test_every_call_is_recorded_exactly_and_stored_once(
    store: MongoEventStore,
    db: Any,
    workflows: Path,
    model: StreamingModel,
    start_node: Any,
    env: dict[str, str],
) -> None:
    settings = online(model, workflows)
    orchestrator = Orchestrator(store, WorkflowManager(workflows), settings)
    stream = await converse(orchestrator, store, QUESTIONS)
    calls = [r async for r in store.find(stream.chat_id, types=["llm.call"])]
    assert len(calls) == len(model.requests) == 40
    assert all(c.data["io"] == "full" and c.data["request"] and c.data["response"] for c in calls)

    # Storage grows with distinct content: every distinct piece of every request, once.
    distinct: dict[bytes, None] = {}
    for body in model.requests:
        pieces = [{k: v for k, v in body.items() if k not in ("messages", "tools")}, body.get("tools")]
        for piece in [*pieces, *body["messages"]]:
            distinct[json.dumps(piece, sort_keys=True, separators=(",", ":")).encode()] = None
    distinct_bytes = sum(len(p) for p in distinct)
    parts = [doc async for doc in db[PARTS_COLLECTION].find()]
    responses = {c.data["response"] for c in calls}
    stored = sum(len(p["body"].encode()) for p in parts if p["_id"] not in responses)
    naive = sum(len(json.dumps(body, separators=(",", ":")).encode()) for body in model.requests)
    print(
        f"\nmodel I/O: {stored:,} B of request parts, distinct {distinct_bytes:,} B, naive copy {naive:,} B"
    )
    # Each distinct piece is stored once; a naive copy of every request grows with the square of the chat.
    assert stored <= 1.5 * distinct_bytes and naive > 2 * stored

    node = await start_node(auth_secret=SECRET, workflows_path=workflows)
    owner = {"Authorization": f"Bearer {issue_token(SECRET, 'u', 'P', ['user'])}"}
    stranger = {"Authorization": f"Bearer {issue_token(SECRET, 'v', 'P', ['user'])}"}
    async with httpx.AsyncClient(base_url=node.url) as http:
        for call, sent in zip(calls, model.requests, strict=True):
            got = await http.get(f"/api/chats/{stream.chat_id}/calls/{call.seq}", headers=owner)
            assert got.status_code == 200, got.text
            body = got.json()
            assert canonical(body["request"]) == canonical(sent), call.seq
            assert body["response"]["choices"][0]["finish_reason"] == call.data["finish_reason"]
            assert body["agent"] == "Writer" and body["io"] == "full" and not body["missing"]
        last = calls[-1]
        answer = (await http.get(f"/api/chats/{stream.chat_id}/calls/{last.seq}", headers=owner)).json()
        assert answer["response"]["choices"][0]["message"]["content"] == "1 words."
        assert answer["response"]["usage"]["prompt_tokens"] == 40 + len(QUESTIONS) - 1
        refused = await http.get(f"/api/chats/{stream.chat_id}/calls/{last.seq}", headers=stranger)
        assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
        not_a_call = await http.get(f"/api/chats/{stream.chat_id}/calls/1", headers=owner)
        assert (not_a_call.status_code, not_a_call.json()["error"]) == (404, "not_found")
        unknown = await http.get("/api/chats/nope/calls/1", headers=owner)
        assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_chat")
        verified = (await http.get(f"/api/chats/{stream.chat_id}/verify", headers=owner)).json()
        assert verified["ok"] is True

        exported = audit("export", "--chat", stream.chat_id, "--with-model-io", env=env)
        lines = [json.loads(line) for line in exported.stdout.splitlines()]
        shipped = {line["model_io_part"]: line["body"] for line in lines if "model_io_part" in line}
        assert exported.returncode == 0 and set(shipped) == {h for c in calls for h in call_hashes(c.data)}

        # A part changed in the database is reported like a broken link, at the first call naming it.
        tampered = calls[-1].data["response"]
        await db[PARTS_COLLECTION].update_one({"_id": tampered}, {"$set": {"body": '{"forged":true}'}})
        verified = (await http.get(f"/api/chats/{stream.chat_id}/verify", headers=owner)).json()
        assert (verified["ok"], verified["broken_seq"]) == (False, last.seq)
        assert "does not match its hash" in verified["detail"]
        assert audit("verify", env=env).returncode == 1


@pytest.mark.parametrize("mode", ["hashes", "off"])
async def test_hashes_mode_keeps_no_content_and_off_keeps_neither(
    mode: str, store: MongoEventStore, db: Any, workflows: Path, model: StreamingModel
) -> None:
    orchestrator = Orchestrator(
        store, WorkflowManager(workflows), online(model, workflows, record_model_io=mode)
    )
    stream = await converse(orchestrator, store, QUESTIONS[:1])
    calls = [r async for r in store.find(stream.chat_id, types=["llm.call"])]
    assert len(calls) == 2 and all(c.data["io"] == mode for c in calls)
    assert await db[PARTS_COLLECTION].count_documents({}) == 0
    if mode == "hashes":
        # The hashes prove what was sent: the first request's parts hash to what the server got.
        from domain.model_io import split_request

        assert calls[0].data["request"] == split_request(model.requests[0])[0]
    else:
        assert all(not c.data["request"] and c.data["response"] is None for c in calls)


def replay_cli(*args: str, env: dict[str, str]) -> Any:
    from app.cli import main

    return invoke(main, *args, env=env)


def conversation(records: list[Any]) -> list[tuple[str, str | None, str]]:
    """What a replay must reproduce: messages, tool calls (with arguments) and tool results, in order."""
    kept = {
        "message.user": "content",
        "message.agent": "content",
        "tool.called": "arguments",
        "tool.result": "content",
        "input.received": "text",
    }
    return [
        (
            r.type,
            r.agent,
            f"{r.data.get('tool', '')}|{r.data.get('call_id', '')}|{r.data.get('is_error', '')}|{r.data[kept[r.type]]}",
        )
        for r in records
        if r.type in kept
    ]


def new_chat(output: str) -> str:
    return output.split("new chat ")[1].split()[0]


async def test_a_recorded_replay_equals_its_original_and_a_changed_prompt_diverges(
    store: MongoEventStore, workflows: Path, model: StreamingModel, env: dict[str, str], tmp_path: Path
) -> None:
    orchestrator = Orchestrator(store, WorkflowManager(workflows), online(model, workflows))
    original = await converse(orchestrator, store, QUESTIONS[:2])
    sent = len(model.requests)

    # Recorded: no model call reaches the server, and the conversation is the original's, byte for byte.
    done = replay_cli("replay", original.chat_id, env={**env, "OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""})
    assert done.returncode == 0, done.stderr + done.stdout
    assert "turn 1/2: run.completed" in done.stdout and "turn 2/2: run.completed" in done.stdout
    assert "no divergence" in done.stdout and len(model.requests) == sent
    copy = new_chat(done.stdout)
    first = [r async for r in store.read(original.chat_id)]
    again = [r async for r in store.read(copy)]
    assert conversation(again) == conversation(first)
    assert again[0].data["replay_of"] == {"chat_id": original.chat_id, "model": "recorded"}
    same = replay_cli("diff", original.chat_id, copy, env=env)
    assert same.returncode == 0 and same.stdout.startswith("same: 0 of 6 turns changed"), same.stdout

    # A copy of the workflow with a changed prompt: the first call diverges at its system message.
    changed = tmp_path / "changed"
    shutil.copytree(workflows, changed)
    (changed / "Solo" / "prompts" / "writer.md").write_text(PROMPT + " Answer in French.")
    live = replay_cli("replay", original.chat_id, "--workflows", str(changed), env=env)
    assert live.returncode == 0, live.stderr + live.stdout
    first_call = next(r for r in first if r.type == "llm.call")
    assert (
        f"first diverging call: seq {first_call.seq}, agent Writer, message 0 (system) differs" in live.stdout
    )
    assert "+You are the Writer. Count words with text_statistics. Answer in French." in live.stdout
    assert len(model.requests) > sent  # --on-diverge live (the default) asked the model server
    diverged = new_chat(live.stdout)
    different = replay_cli("diff", original.chat_id, diverged, "--format", "json", env=env)
    assert different.returncode == 1
    body = json.loads(different.stdout)
    assert body["same"] is False and body["summary"]["turns_changed"] >= 1
    assert any("text" in t["changed"] or "tool_calls" in t["changed"] for t in body["turns"])

    stopped = replay_cli(
        "replay", original.chat_id, "--workflows", str(changed), "--on-diverge", "stop", env=env
    )
    assert stopped.returncode == 1 and "turn 1/2: run.failed" in stopped.stdout
    sent = len(model.requests)
    nexts = replay_cli(
        "replay", original.chat_id, "--workflows", str(changed), "--on-diverge", "recorded-next", env=env
    )
    assert nexts.returncode == 0 and "4 recorded, 0 live calls" in nexts.stdout, nexts.stdout
    assert len(model.requests) == sent  # every call answered from the recording, in the agent's order
    played = [r async for r in store.read(new_chat(nexts.stdout))]
    assert conversation(played) == conversation(first)
    assert "agent Writer, message 0 (system) differs" in stopped.stdout


def said(records: list[Any]) -> list[tuple[str, str | None, str]]:
    """The visible messages of a chat, as its user saw them."""
    return [
        (r.type, r.agent, r.data["content"])
        for r in records
        if r.visible and r.type in ("message.user", "message.agent")
    ]


async def test_fixtures_from_a_chat_run_offline_and_bad_input_is_refused_writing_nothing(
    store: MongoEventStore,
    db: Any,
    workflows: Path,
    model: StreamingModel,
    env: dict[str, str],
    tmp_path: Path,
    start_node: Any,
) -> None:
    orchestrator = Orchestrator(store, WorkflowManager(workflows), online(model, workflows))
    original = await converse(orchestrator, store, QUESTIONS[:2])
    first = [r async for r in store.read(original.chat_id)]

    copy = tmp_path / "offline"
    shutil.copytree(workflows, copy)
    exported = replay_cli("fixtures", "export", original.chat_id, "--to", str(copy / "Solo"), env=env)
    assert exported.returncode == 0 and "Writer.json (4 replies)" in exported.stdout, exported.stderr
    offline = Orchestrator(store, WorkflowManager(copy), Settings(workflows_path=copy))
    assert offline.settings.offline
    again = await converse(offline, store, QUESTIONS[:2])
    assert said([r async for r in store.read(again.chat_id)]) == said(first)

    # Bad input: each refusal names its code, and nothing is written.
    other_app = StreamRef(chat_id="of-app-q", app_id="Q", user_id="u", workflow="Solo")
    await store.append(other_app, [Pending(event=ChatCreated())], expected_seq=0)
    broken = tmp_path / "broken"
    shutil.copytree(workflows, broken)
    (broken / "Solo" / "agents.json").write_text('{"agents": [{"name": "Writer", "tools": 3}]}')
    before = await db["events"].count_documents({})
    stranger = issue_token(SECRET, "v", "P", ["user"])
    owner = issue_token(SECRET, "u", "P", ["user"])
    refusals = {
        "unknown_chat": ("replay", "no-such-chat"),
        "forbidden": ("replay", original.chat_id, "--token", stranger),
        "bad_request": ("replay", original.chat_id, "--workflows", str(broken)),
    }
    for code, args in refusals.items():
        refused = replay_cli(*args, env=env)
        assert refused.returncode == 2 and f"[{code}]" in refused.stderr, (code, refused.stderr)
    across = replay_cli("diff", original.chat_id, other_app.chat_id, "--token", owner, env=env)
    assert across.returncode == 2 and "[forbidden]" in across.stderr and "of-app-q" in across.stderr
    assert await db["events"].count_documents({}) == before

    node = await start_node(auth_secret=SECRET, workflows_path=workflows)
    async with httpx.AsyncClient(base_url=node.url) as http:
        mine = {"Authorization": f"Bearer {owner}"}
        compared = await http.get(f"/api/chats/{original.chat_id}/diff/{again.chat_id}", headers=mine)
        assert compared.status_code == 200 and compared.json()["summary"]["turns_a"] == 6
        refused = await http.get(f"/api/chats/{original.chat_id}/diff/{other_app.chat_id}", headers=mine)
        assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")


def replies_of(parts: dict[str, Any], calls: list[Any]) -> list[Reply]:
    """The recorded answers of `calls`, as the local model server's scripted replies (in call order)."""
    replies = []
    for call in calls:
        answer = parts[call.data["response"]]
        message = answer["choices"][0]["message"]
        replies.append(
            Reply(
                chunks=[message["content"]] if message.get("content") else [],
                tool_calls=[
                    ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
                    for c in message.get("tool_calls") or []
                ],
                prompt_tokens=answer["usage"]["prompt_tokens"],
                completion_tokens=answer["usage"]["completion_tokens"],
            )
        )
    return replies


# The Intake chat's answers to its form, choice and confirm (the offline original gets them in order).
INTAKE_ANSWERS = [{"name": "Ada", "email": "ada@x.io", "team_size": 3}, "Team", True]


@pytest.mark.parametrize("workflow", ["Analyzer", "Assistant", "Brainstorm", "Generator", "Intake"])
async def test_a_recorded_replay_of_each_example_workflow_equals_its_online_original(
    workflow: str, store: MongoEventStore
) -> None:
    """An online chat per example workflow (the local model server answering what the fixtures script,
    random speakers, input answers and UI answers included), then its recorded replay: the same
    conversation. Intake (AgentDriven, no user message) waits on a form, a choice and a confirm: each
    replay answers them with the original's `ui.responded`, in order."""
    examples = Path(__file__).parent.parent / "workflows"
    manager = WorkflowManager(examples)
    offline = Orchestrator(store, manager, Settings(workflows_path=examples))
    message = None if workflow == "Intake" else "bees"
    scripted = await offline.create_chat(workflow=workflow, user_id="u", app_id="P", message=message)
    answers = deque(UiResponded(request_id="", answer=a) for a in INTAKE_ANSWERS)
    # Each waiting UI request ends its run `run.suspended`; its answer's next run goes on.
    outcomes = [await run_turn(offline, store, scripted, ["exit"], answers)]
    while outcomes[-1] == "run.suspended" and len(outcomes) < 6:
        outcomes.append(await run_turn(offline, store, scripted, [], answers))
    runs = ["run.suspended"] * 3 + ["run.completed"] if workflow == "Intake" else ["run.completed"]
    assert outcomes == runs
    calls = [r async for r in store.find(scripted.chat_id, types=["llm.call"])]
    server = StreamingModel(
        replies_of(await offline.parts.values(call_hashes(c.data)[-1] for c in calls), calls)
    )
    try:
        online_settings = online(server, examples)
        # The scripted chat driven live against the local model server: an online chat, recorded.
        recorded = await replay(store, online_settings, manager, scripted.chat_id, model="live")
        assert recorded.outcomes == runs and recorded.live == len(calls) == len(server.requests)
        again = await replay(store, Settings(workflows_path=examples), manager, recorded.chat_id)
        assert again.outcomes == runs and again.divergence is None
        assert again.recorded == len(calls) and len(server.requests) == len(calls)
    finally:
        server.close()
    first = [r async for r in store.read(recorded.chat_id)]
    second = [r async for r in store.read(again.chat_id)]
    assert conversation(second) == conversation(first) and len(conversation(first)) >= 3
    if workflow == "Intake":
        assert not answers
        for chat in (first, second):
            ui = [r.data["answer"] for r in chat if r.type == "ui.responded"]
            assert ui == INTAKE_ANSWERS and chat[1].type == "message.user" and not chat[1].visible
            filed = [r for r in chat if r.type == "message.agent" and r.agent == "Recorder"]
            assert filed[-1].data["structured"]["plan"] == "Team"
