"""The end conditions every fault scenario checks, in one place."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

import httpx

from app.runs.orchestrator import RunReport
from domain.events import TERMINAL_TYPES, Record
from domain.store import MongoEventStore
from projections.projector import fold
from projections.runner import default_projectors


async def records_of(store: MongoEventStore, chat_id: str) -> list[Record]:
    return [r async for r in store.read(chat_id)]


async def wait_for(store: MongoEventStore, chat_id: str, done: Any, timeout: float = 120) -> list[Record]:
    """The chat's records once `done(records)` holds (polls the log; no timing asserts).

    Fails naming the chat and its last records if `done` does not hold within `timeout` seconds.
    """
    records: list[Record] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                records = await records_of(store, chat_id)
                if done(records):
                    return records
                await asyncio.sleep(0.05)
    except TimeoutError:
        last = [f"{r.seq} {r.type}" for r in records[-5:]]
        raise AssertionError(
            f"chat {chat_id}: {getattr(done, '__name__', 'the condition')} did not hold within {timeout} s; "
            f"{len(records)} records, the last {last}"
        ) from None


def run_end(records: list[Record], run_index: int = -1) -> str | None:
    """The terminal type of the chat's run number `run_index` (in run.started order), if it ended."""
    runs = [r.run_id for r in records if r.type == "run.started"]
    if not runs:
        return None
    run_id = runs[run_index]
    return next((r.type for r in records if r.run_id == run_id and r.type in TERMINAL_TYPES), None)


def waiting_for_input(records: list[Record]) -> bool:
    """The chat's last record is an open input request of a live run."""
    return bool(records) and records[-1].type == "input.requested"


def longer_than(count: int) -> Any:
    return lambda records: len(records) > count


def runs_in(records: list[Record]) -> int:
    return sum(r.type == "run.started" for r in records)


async def drive_to_end(
    http: httpx.AsyncClient, store: MongoEventStore, chat_id: str, runs: int = 1, timeout: float = 120
) -> str:
    """Let the chat's run number `runs` finish: answer each input request with "exit"; returns its terminal type."""
    async with asyncio.timeout(timeout):
        while True:
            records = await wait_for(
                store,
                chat_id,
                lambda rs: runs_in(rs) >= runs and (waiting_for_input(rs) or run_end(rs) is not None),
            )
            ended = run_end(records)
            if ended is not None:
                return ended
            answered = await http.post(f"/api/chats/{chat_id}/messages", json={"message": "exit"})
            assert answered.status_code == 202, answered.text
            await wait_for(store, chat_id, longer_than(len(records)))


class Soundness:
    """What `assert_chat_sound` checked."""

    def __init__(self, events: int, runs: int, duplicated: int, lost: int) -> None:
        self.events = events
        self.runs = runs
        self.duplicated = duplicated
        self.lost = lost


def ag2_uuids(records: list[Record]) -> Counter[str]:
    """How often each AG2 event (by its uuid) is in the records."""
    found = (json.loads(r.ag2).get("content", {}).get("uuid") for r in records if r.ag2 is not None)
    return Counter(str(u) for u in found if u)


def check_log(records: list[Record]) -> tuple[int, int]:
    """Gapless seqs, no AG2 event twice, one terminal per run and last in it; returns (runs, duplicated)."""
    seqs = [r.seq for r in records]
    assert seqs == list(range(1, len(records) + 1)), f"log has gaps or repeats: {seqs}"
    uuids = ag2_uuids(records)
    twice = {u: n for u, n in uuids.items() if n > 1}
    assert not twice, f"AG2 events recorded twice: {twice}"
    ids = Counter(r.id for r in records)
    assert max(ids.values()) == 1
    runs = [r.run_id for r in records if r.type == "run.started"]
    assert len(set(runs)) == len(runs)
    for run_id in runs:
        own = [r for r in records if r.run_id == run_id]
        terminals = [r.type for r in own if r.type in TERMINAL_TYPES]
        assert len(terminals) == 1, (
            f"run {run_id} has terminal records {terminals}: {[(r.seq, r.type, r.run_id) for r in records]}"
        )
        assert own[-1].type in TERMINAL_TYPES, (
            f"run {run_id}: {own[-1].type} recorded after its terminal record"
        )
    return len(runs), sum(n - 1 for n in uuids.values())


async def assert_projections_equal_rebuild(
    store: MongoEventStore, chat_id: str, records: list[Record]
) -> None:
    """The live chat_sessions/chat_metrics documents equal the chat's log folded from scratch."""
    db = store.db
    for projector in default_projectors():
        expected = fold(projector, None, records)
        async with asyncio.timeout(60):
            while True:
                live = await db[projector.collection].find_one({"_id": chat_id})
                if live is not None and live.get("last_seq") == records[-1].seq:
                    break
                await asyncio.sleep(0.05)
        # chain_heads' `dirty` is the anchor writer's mark (cleared once the head is anchored), not the log's.
        writer_state = {"dirty"} if projector.name == "chain_heads" else set()
        assert {k: v for k, v in live.items() if k not in writer_state} == {
            k: v for k, v in expected.items() if k not in writer_state
        }, f"{projector.name} differs from a rebuild"


def lost_events(records: list[Record], reports: Mapping[str, RunReport] | None) -> int:
    """AG2 events the orchestrator saw in this chat's runs (its RunReports) that are not in the log."""
    if reports is None:
        return 0
    runs = {r.run_id for r in records if r.type == "run.started"}
    seen = {u for run_id in runs if run_id in reports for u in reports[run_id].ag2_uuids if u}
    assert runs <= set(reports), "a run of the chat has no report in this process"
    return len(seen - set(ag2_uuids(records)))


async def assert_chat_sound(
    http: httpx.AsyncClient,
    store: MongoEventStore,
    chat_id: str,
    reports: Mapping[str, RunReport] | None = None,
) -> Soundness:
    """Every fault scenario's end: sound log and projections, and the chat goes on with a new message.

    `reports`: the in-process orchestrator's run reports; every AG2 event they saw must be in the log.
    """
    before = await records_of(store, chat_id)
    check_log(before)
    verified = (await http.get(f"/api/chats/{chat_id}/verify")).json()
    assert verified["ok"] is True and verified["checked"] == len(before), verified
    await assert_projections_equal_rebuild(store, chat_id, before)
    sent = await http.post(f"/api/chats/{chat_id}/messages", json={"message": "and wasps?"})
    assert sent.status_code == 202 and sent.json()["recorded"] == "message.user", sent.text
    assert await drive_to_end(http, store, chat_id, runs=runs_in(before) + 1) == "run.completed"
    after = await records_of(store, chat_id)
    assert [r.id for r in after[: len(before)]] == [r.id for r in before], "records changed or vanished"
    runs, duplicated = check_log(after)
    assert (await store.verify(chat_id)).ok
    await assert_projections_equal_rebuild(store, chat_id, after)
    lost = lost_events(after, reports)
    assert lost == 0, f"{lost} AG2 events the runs produced are not in the log"
    return Soundness(events=len(after), runs=runs, duplicated=duplicated, lost=lost)


def assert_client_saw_the_log(seen: list[int], records: list[Record]) -> None:
    """What one WebSocket client received is the log's visible records under the replay rule.

    Every visible record once and in order, except the deltas of a message that had finished when
    the client's replay read it: those come as the `message.agent` alone. A message's deltas arrive
    all or none, and none only when its `message.agent` arrived.
    """
    assert seen == sorted(set(seen)), f"a record came twice or out of order: {seen}"
    visible = [r for r in records if r.visible]
    got = set(seen)
    assert got <= {r.seq for r in visible}, "the client got a record the log does not show it"
    missed = [r for r in visible if r.seq not in got]
    assert all(r.type == "message.delta" for r in missed), (
        f"never reached the client: {[(r.seq, r.type) for r in missed]}"
    )
    final = {str(r.data.get("message_id")): r.seq for r in visible if r.type == "message.agent"}
    deltas: dict[str, list[int]] = {}
    for r in visible:
        if r.type == "message.delta":
            deltas.setdefault(str(r.data["message_id"]), []).append(r.seq)
    for message_id, seqs in deltas.items():
        arrived = [seq for seq in seqs if seq in got]
        assert arrived in ([], seqs), f"message {message_id}: only deltas {arrived} of {seqs} arrived"
        assert arrived or final.get(message_id) in got, (
            f"message {message_id}: neither its deltas nor its text arrived"
        )
