"""Forks on a real node and wire server: a chat forked at a middle message continues on its own, the
parent stays as it was, and the fork's verify checks its anchor in the parent's log."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase
from rich.console import Console

from app.cli.audit import _verify
from app.http.auth import issue_token
from domain.events import ChatCreated, MessageAgent, MessageUser, Pending, RunStarted, StreamRef
from domain.store import MongoEventStore

SECRET = "lineage-test-secret-of-at-least-thirty-two-bytes"
ANSWERS = ["First answer.", "Second answer.", "Third answer."]


def bearer(user: str, app: str = "A") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, user, app, ['user'])}"}


def desk(root: Path) -> Path:
    """A one-agent workflow whose Host answers each message from its script, then ends the run."""
    folder = root / "Desk"
    (folder / "fixtures").mkdir(parents=True)
    (folder / "workflow.json").write_text(
        json.dumps({"name": "Desk", "visual_agents": ["Host"], "entry_agent": "Host", "max_turns": 4})
    )
    host = {"name": "Host", "handoffs": {"after_work": "terminate"}}
    (folder / "agents.json").write_text(json.dumps({"agents": [host]}))
    (folder / "fixtures" / "Host.json").write_text(json.dumps([{"content": a} for a in ANSWERS]))
    return root


async def runs_ended(
    http: httpx.AsyncClient, chat_id: str, count: int, headers: dict[str, str]
) -> list[dict[str, Any]]:
    """The chat's records once `count` of its runs have ended."""
    async with asyncio.timeout(60):
        while True:
            events = (await http.get(f"/api/chats/{chat_id}/events", headers=headers)).json()["events"]
            if sum(e["type"] in ("run.completed", "run.failed", "run.stopped") for e in events) >= count:
                return list(events)
            await asyncio.sleep(0.05)


def messages(events: list[dict[str, Any]]) -> list[tuple[str, str | None, str]]:
    return [
        (e["type"], e["agent"], e["data"].get("content", e["data"].get("text")))
        for e in events
        if e["type"] in ("message.user", "message.agent", "input.received")
    ]


async def test_a_fork_at_a_middle_message_continues_alone_and_its_verify_checks_the_anchor(
    start_node: Any, store: MongoEventStore, db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    node = await start_node(workflows_path=desk(tmp_path), auth_secret=SECRET)
    ada = bearer("ada")
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        start = {"workflow": "Desk", "message": "Hello", "context": {"topic": "bees"}}
        chat_id = (await http.post("/api/chats", json=start, headers=ada)).json()["chat_id"]
        await runs_ended(http, chat_id, 1, ada)
        sent = await http.post(f"/api/chats/{chat_id}/messages", json={"message": "And then?"}, headers=ada)
        assert sent.status_code == 202, sent.text
        parent = await runs_ended(http, chat_id, 2, ada)
        # The first run's answer: a message in the middle of the chat, of a run that has ended.
        at = next(e for e in parent if e["type"] == "message.agent")
        before = [
            (d["seq"], d["hash"]) async for d in db["events"].find({"chat_id": chat_id}, sort=[("seq", 1)])
        ]

        forked = await http.post(f"/api/chats/{chat_id}/fork", json={"at_seq": at["seq"]}, headers=ada)
        assert forked.status_code == 201, forked.text
        fork = forked.json()
        assert fork["forked_from"] == {"chat_id": chat_id, "seq": at["seq"], "hash": at["hash"]}
        fork_id = fork["chat_id"]
        # The fork's conversation is the parent's up to the fork point, its context the parent's then.
        copied = (await http.get(f"/api/chats/{fork_id}/events", headers=ada)).json()["events"]
        up_to = [e for e in parent if e["seq"] <= at["seq"]]
        assert (
            messages(copied)
            == messages(up_to)
            == [("message.user", None, "Hello"), ("message.agent", "Host", ANSWERS[0])]
        )
        assert (
            copied[0]["data"]["context"]["topic"] == "bees"
            and copied[0]["data"]["forked_from"]["seq"] == at["seq"]
        )
        # It continues with a new answer of its own; the parent had answered "Second answer." there.
        sent = await http.post(
            f"/api/chats/{fork_id}/messages", json={"message": "Something else"}, headers=ada
        )
        assert sent.status_code == 202, sent.text
        grown = await runs_ended(http, fork_id, 1, ada)
        assert messages(grown)[: len(messages(up_to))] == messages(up_to)
        assert messages(grown)[len(messages(up_to)) :] == [
            ("message.user", None, "Something else"),
            ("message.agent", "Host", ANSWERS[0]),
        ]
        after = [
            (d["seq"], d["hash"]) async for d in db["events"].find({"chat_id": chat_id}, sort=[("seq", 1)])
        ]
        assert after == before, "forking must not write to the parent's log"
        for chat in (chat_id, fork_id):
            verified = (await http.get(f"/api/chats/{chat}/verify", headers=ada)).json()
            assert verified["ok"] is True, verified
        assert verified["forked_from"]["chat_id"] == chat_id

        # Refusals, each naming why: past the end, not a message, not the caller's chat.
        last = parent[-1]["seq"]
        past = await http.post(f"/api/chats/{chat_id}/fork", json={"at_seq": last + 1}, headers=ada)
        assert past.status_code == 422 and past.json()["error"] == "bad_fork_point"
        assert f"seqs 1 to {last}" in past.json()["detail"]
        run_started = next(e["seq"] for e in parent if e["type"] == "run.started")
        marker = await http.post(f"/api/chats/{chat_id}/fork", json={"at_seq": run_started}, headers=ada)
        assert marker.status_code == 422 and "run.started record, not a message" in marker.json()["detail"]
        unknown = await http.post(
            f"/api/chats/{chat_id}/fork", json={"at_seq": at["seq"], "workflow": "Nope"}, headers=ada
        )
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_workflow"
        other = await http.post(
            f"/api/chats/{chat_id}/fork", json={"at_seq": at["seq"]}, headers=bearer("eve")
        )
        assert other.status_code == 403
        stranger = await http.post(
            f"/api/chats/{chat_id}/fork", json={"at_seq": at["seq"]}, headers=bearer("ada", "B")
        )
        assert stranger.status_code == 403

        # Inside a run still going: 409.
        going = StreamRef(chat_id="going", app_id="A", user_id="ada", workflow="Desk")
        await store.append(going, [Pending(event=ChatCreated()), Pending(event=MessageUser(content="hi"))], 0)
        await store.append(
            going, [Pending(event=RunStarted(pattern="Default", max_turns=4), run_id="r1")], None
        )
        await store.append(
            going, [Pending(event=MessageAgent(content="working"), agent="Host", run_id="r1")], None
        )
        busy = await http.post("/api/chats/going/fork", json={"at_seq": 4}, headers=ada)
        assert busy.status_code == 409 and busy.json()["error"] == "run_active"
        assert "still going" in busy.json()["detail"]

        # Tampering with the parent's record at the fork point breaks the fork's anchor, and says where.
        await db["events"].update_one(
            {"chat_id": chat_id, "seq": at["seq"]}, {"$set": {"data.content": "forged"}}
        )
        broken = (await http.get(f"/api/chats/{fork_id}/verify", headers=ada)).json()
        assert broken["ok"] is False and broken["broken_seq"] == 1, broken
        assert f"forked_from chat {chat_id} seq {at['seq']}" in broken["detail"], broken
        assert f"record seq {at['seq']} is broken" in broken["detail"], broken

    # The app-wide verify (`mozaiks audit verify`) reports the fork too, with the same check and words.
    everything = await store.verify_all(None)
    by_chat = {v.chat_id: v for v in everything.broken}
    assert everything.forks == 1 and set(by_chat) == {chat_id, fork_id}, everything
    assert by_chat[fork_id].detail == broken["detail"], by_chat[fork_id]
    assert by_chat[fork_id].broken_seq == 1
    out = io.StringIO()
    assert await _verify(node.settings, None, Console(file=out, width=500)) == 1
    assert fork_id in out.getvalue() and f"forked_from chat {chat_id} seq {at['seq']}" in out.getvalue()


@pytest.mark.parametrize("unused", [None])
def test_fork_point_rules_name_the_reason(unused: None) -> None:
    from datetime import UTC, datetime

    from domain.events import GENESIS_HASH, Record
    from domain.lineage import ForkRefused, fork_point

    def record(seq: int, type_: str, run_id: str | None = None) -> Record:
        return Record(
            id=str(seq), chat_id="c", seq=seq, type=type_, ts=datetime.now(UTC), app_id="a", user_id="u",
            workflow="w", run_id=run_id, agent=None, visible=True, data={}, prev_hash=GENESIS_HASH, hash=str(seq),
        )  # fmt: skip

    log = [record(1, "chat.created"), record(2, "message.user"), record(3, "run.started", "r"),
           record(4, "message.agent", "r"), record(5, "run.completed", "r")]  # fmt: skip
    assert fork_point("c", log, 4).seq == 4 and fork_point("c", log, 2).seq == 2
    for seq, reason in ((0, "past_end"), (6, "past_end"), (3, "not_a_message"), (1, "not_a_message")):
        with pytest.raises(ForkRefused) as refused:
            fork_point("c", log, seq)
        assert refused.value.reason == reason
    with pytest.raises(ForkRefused) as refused:
        fork_point("c", log[:4], 4)
    assert refused.value.reason == "run_active"
