"""Model I/O, replay, diff and fixtures export (issue 25) against the local OpenAI-compatible server.

Chats are recorded online (the real `openai` SDK against `tests/llm_server.py`), on the real wire server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app.http.auth import issue_token
from app.runs.orchestrator import Orchestrator
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.events import MessageUser, Pending, StreamRef
from domain.model_io import PARTS_COLLECTION, call_hashes, canonical
from domain.store import MongoEventStore
from tests.cli import invoke
from tests.llm_server import Reply, StreamingModel, ToolCall, solo_workflow

SECRET = "test-secret-of-at-least-thirty-two-bytes!"
PROMPT = "You are the Writer. Count words with text_statistics."
QUESTIONS = ["Count: one two three", "Count: four five", "Count: six"]


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
    return solo_workflow(
        tmp_path, tool="text_statistics:tools.text_stats:text_statistics", prompt=PROMPT
    )


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
    store: MongoEventStore, db: Any, workflows: Path, model: StreamingModel, start_node: Any, env: dict[str, str]
) -> None:
    settings = online(model, workflows)
    orchestrator = Orchestrator(store, WorkflowManager(workflows), settings)
    stream = await converse(orchestrator, store, QUESTIONS)
    calls = [r async for r in store.find(stream.chat_id, types=["llm.call"])]
    assert len(calls) == len(model.requests) == 6
    assert all(c.data["io"] == "full" and c.data["request"] and c.data["response"] for c in calls)

    # Storage grows with distinct content: every distinct piece of every request, once.
    distinct: dict[bytes, None] = {}
    for body in model.requests:
        pieces = [{k: v for k, v in body.items() if k not in ("messages", "tools")}, body.get("tools")]
        for piece in [*pieces, *body["messages"]]:
            distinct[json.dumps(piece, sort_keys=True).encode()] = None
    distinct_bytes = sum(len(p) for p in distinct)
    parts = [doc async for doc in db[PARTS_COLLECTION].find()]
    responses = {c.data["response"] for c in calls}
    stored = sum(len(p["body"].encode()) for p in parts if p["_id"] not in responses)
    naive = sum(len(json.dumps(body).encode()) for body in model.requests)
    print(f"\nmodel I/O: {stored:,} B of request parts, distinct {distinct_bytes:,} B, naive copy {naive:,} B")
    assert stored <= 1.5 * distinct_bytes

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
        assert answer["response"]["usage"]["prompt_tokens"] == 42
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
    orchestrator = Orchestrator(store, WorkflowManager(workflows), online(model, workflows, record_model_io=mode))
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
