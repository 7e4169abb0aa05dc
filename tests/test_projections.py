"""Projections against the real wire server: exactly-once application, restarts, rebuilds, prices, percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from domain.events import (
    AnyEvent,
    ChatCreated,
    Handoff,
    InputReceived,
    InputRequested,
    LlmCall,
    MessageAgent,
    MessageDelta,
    MessageUser,
    Pending,
    Record,
    RunCompleted,
    RunFailed,
    RunStarted,
    RunStopped,
    SpeakerSelected,
    StreamRef,
    ToolCalled,
    ToolResult,
    seal,
)
from domain.store import MongoEventStore
from projections import queries, sketch
from projections import writer as writer_module
from projections.metrics import ChatMetricsProjector
from projections.prices import PriceFile, PriceTable, PriceVersion
from projections.projector import fold
from projections.rebuild import UnknownProjection, rebuild
from projections.runner import CHECKPOINTS, ProjectionRunner, default_projectors
from projections.sessions import ChatSessionsProjector
from projections.update import ProjectionError
from projections.writer import MAX_ATTEMPTS, ProjectionWriter, catch_up
from tests.faults.server import FaultServer

COLLECTIONS = ("chat_sessions", "chat_metrics")
MODELS = ("gpt-4o-mini", "gpt-4o-2024-08-06", "gpt-4.1", "no-such-model")
AGENTS = ("Planner", "Writer", "Critic", "_Hidden.Tool$er")


def stream(chat_id: str, app_id: str = "app", user_id: str = "u1") -> StreamRef:
    return StreamRef(chat_id=chat_id, app_id=app_id, user_id=user_id, workflow="Generator")


def p(event: AnyEvent, agent: str | None = None, run_id: str | None = None, visible: bool = True) -> Pending:
    return Pending(event=event, agent=agent, run_id=run_id, visible=visible)


def synthetic_chat(rng: random.Random, runs: int) -> list[list[Pending]]:
    """Bursts of events like a recorded chat: runs of agent turns, tool calls, LLM calls and a terminal event."""
    bursts: list[list[Pending]] = [[p(ChatCreated(offline=False)), p(MessageUser(content="hello"))]]
    for n in range(runs):
        run_id = f"r{n}-{rng.randrange(10**6)}"
        offline = rng.random() < 0.2
        bursts.append([p(RunStarted(pattern="RoundRobin", max_turns=10, offline=offline), run_id=run_id)])
        for _ in range(rng.randrange(2, 7)):
            agent = rng.choice(AGENTS)
            burst = [p(SpeakerSelected(speaker=agent), agent, run_id)]
            for _ in range(rng.randrange(1, 3)):
                latency = math.exp(rng.gauss(6.0, 1.0)) if rng.random() > 0.05 else 0.0
                burst.append(
                    p(
                        LlmCall(
                            model=rng.choice(MODELS),
                            prompt_tokens=rng.randrange(10, 3000),
                            completion_tokens=rng.randrange(0, 800),
                            latency_ms=latency,
                            offline=offline,
                            error="timeout" if rng.random() < 0.05 else None,
                            ttft_ms=latency * rng.random() if rng.random() < 0.8 else None,
                            stream_ms=latency * rng.random() / 2 if rng.random() < 0.7 else None,
                        ),
                        agent,
                        run_id,
                        visible=False,
                    )
                )
            if rng.random() < 0.4:
                call_id = f"c{rng.randrange(10**9)}"
                burst.append(
                    p(ToolCalled(tool="search", call_id=call_id, arguments='{"q": "x"}'), agent, run_id)
                )
                burst.append(
                    p(
                        ToolResult(tool="search", call_id=call_id, content="r", is_error=rng.random() < 0.3),
                        agent,
                        run_id,
                    )
                )
            if rng.random() < 0.2:
                burst.append(p(Handoff(source=agent, target=rng.choice(AGENTS)), agent, run_id))
            burst.append(
                p(MessageAgent(content=f"turn by {agent}"), agent, run_id, visible=not agent.startswith("_"))
            )
            bursts.append(burst)
        if rng.random() < 0.3:
            bursts.append([p(InputRequested(request_id="q1", prompt="more?"), run_id=run_id)])
            bursts.append(
                [p(InputReceived(request_id="q1", text="yes"), run_id=run_id), p(MessageUser(content="yes"))]
            )
        ending = rng.random()
        terminal: AnyEvent = (
            RunCompleted() if ending < 0.7 else RunFailed(error="boom") if ending < 0.85 else RunStopped()
        )
        bursts.append([p(terminal, run_id=None if isinstance(terminal, RunStopped) else run_id)])
    return bursts


async def append_chats(
    store: MongoEventStore,
    chats: int,
    seed: int,
    *,
    prefix: str = "chat",
    app_ids: tuple[str, ...] = ("app",),
) -> dict[str, list[list[Pending]]]:
    """Write `chats` synthetic chats burst by burst, interleaved across chats; returns the bursts left unwritten."""
    rng = random.Random(seed)
    plans = {f"{prefix}-{i}": synthetic_chat(rng, rng.randrange(1, 4)) for i in range(chats)}
    refs = {chat_id: stream(chat_id, app_id=app_ids[i % len(app_ids)]) for i, chat_id in enumerate(plans)}
    await asyncio.gather(*(append_bursts(store, refs[c], bursts) for c, bursts in plans.items()))
    return plans


async def append_bursts(store: MongoEventStore, ref: StreamRef, bursts: list[list[Pending]]) -> None:
    for burst in bursts:
        await store.append(ref, burst, None)


async def rebuilt_chats(
    db: AsyncDatabase[Any], store: MongoEventStore, chats: int, seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """`chats` synthetic chats, projected by a rebuild; returns the projections' snapshot."""
    await append_chats(store, chats, seed=seed)
    await rebuild(db, store)
    return await snapshot(db)


async def snapshot(db: AsyncDatabase[Any]) -> dict[str, dict[str, dict[str, Any]]]:
    return {name: {doc["_id"]: doc async for doc in db[name].find({})} for name in COLLECTIONS}


def assert_same(
    live: dict[str, dict[str, dict[str, Any]]], rebuilt: dict[str, dict[str, dict[str, Any]]]
) -> None:
    for name in COLLECTIONS:
        assert sorted(live[name]) == sorted(rebuilt[name]), name
        for chat_id, doc in rebuilt[name].items():
            for field, value in doc.items():
                assert live[name][chat_id].get(field) == value, (name, chat_id, field)
            assert set(live[name][chat_id]) == set(doc), (name, chat_id)


@pytest.fixture
async def runners(db: AsyncDatabase[Any], store: MongoEventStore) -> AsyncIterator[Callable[..., Any]]:
    """Start projection runners as tasks; every one still running is cancelled at the end."""
    started: list[asyncio.Task[None]] = []

    def start(runner: ProjectionRunner | None = None) -> tuple[ProjectionRunner, asyncio.Task[None]]:
        runner = runner or ProjectionRunner(db, store)
        task = asyncio.create_task(runner.run())
        started.append(task)
        return runner, task

    yield start
    for task in started:
        task.cancel()
    for task in started:
        try:
            await task
        except BaseException:  # noqa: BLE001 - teardown: the task's own failure was asserted (or not) by the test
            pass


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---- the documents ----------------------------------------------------------------------------


async def test_chat_session_has_the_seed_shape_with_status_and_hidden_messages(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    runner, _ = runners()
    await runner.wait_caught_up(30)
    ref = stream("s1", app_id="shop", user_id="ann")
    await store.append(ref, [p(ChatCreated()), p(MessageUser(content="Create a landing page"))], 0)
    await store.append(ref, [p(RunStarted(pattern="Default", max_turns=5), run_id="run1")], None)
    await store.append(
        ref,
        [
            p(SpeakerSelected(speaker="Generator"), "Generator", "run1"),
            p(MessageAgent(content="plan"), "Orchestrator", "run1", visible=False),
            p(MessageAgent(content="I'll help you create..."), "Generator", "run1"),
            p(InputRequested(request_id="q"), run_id="run1"),
        ],
        None,
    )
    await runner.wait_caught_up(30)
    doc = await db.chat_sessions.find_one({"_id": "s1"})
    assert doc is not None
    assert doc["status"] == "waiting_input" and doc["last_seq"] == 7 and doc["last_run_id"] == "run1"
    assert {k: doc[k] for k in ("chat_id", "app_id", "user_id", "workflow", "message_count")} == {
        "chat_id": "s1", "app_id": "shop", "user_id": "ann", "workflow": "Generator", "message_count": 2,
    }  # fmt: skip
    records = [r async for r in store.read("s1")]
    assert doc["created_at"] == records[0].ts and doc["updated_at"] == records[-1].ts
    assert [(m["role"], m["agent"], m["content"], m["visible"]) for m in doc["messages"]] == [
        ("user", None, "Create a landing page", True),
        ("assistant", "Orchestrator", "plan", False),
        ("assistant", "Generator", "I'll help you create...", True),
    ]
    assert [m["timestamp"] for m in doc["messages"]] == [records[1].ts, records[5].ts, records[6].ts]
    await store.append(
        ref,
        [p(InputReceived(request_id="q", text="ok"), run_id="run1"), p(RunCompleted(), run_id="run1")],
        None,
    )
    await runner.wait_caught_up(30)
    session = await queries.get_session(db, "s1", visible_only=True)
    assert session is not None and session["status"] == "completed" and session["last_seq"] == 9
    assert [m["content"] for m in session["messages"]] == ["Create a landing page", "I'll help you create..."]


async def test_metrics_count_per_chat_and_agent_with_cost_by_date_and_duration(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    runner, _ = runners()
    ref = stream("m1")
    await store.append(ref, [p(ChatCreated()), p(MessageUser(content="go"))], 0)
    await store.append(ref, [p(RunStarted(pattern="Auto", max_turns=5), run_id="r1")], None)
    calls = [
        p(
            LlmCall(
                model="gpt-4o-mini",
                prompt_tokens=1000,
                completion_tokens=200,
                latency_ms=120.0,
                ttft_ms=20.0,
                stream_ms=100.0,
            ),
            "Writer",
            "r1",
        ),
        p(
            LlmCall(
                model="gpt-4o",
                prompt_tokens=100,
                completion_tokens=10,
                latency_ms=80.0,
                error="x",
                ttft_ms=60.0,
                stream_ms=10.0,
            ),
            "Critic",
            "r1",
        ),
        p(
            LlmCall(model="gpt-4o-mini", prompt_tokens=7, completion_tokens=3, latency_ms=0.0, offline=True),
            "Writer",
            "r1",
        ),
        p(
            LlmCall(
                model="mystery",
                prompt_tokens=5,
                completion_tokens=5,
                latency_ms=10.0,
                ttft_ms=4.0,
                stream_ms=5.0,
            ),
            "Writer",
            "r1",
        ),
    ]
    tools = [
        p(ToolCalled(tool="t", call_id="1", arguments="{}"), "Writer", "r1"),
        p(ToolResult(tool="t", call_id="1", content="bad", is_error=True), "Writer", "r1"),
        p(ToolCalled(tool="t", call_id="2", arguments="{}"), "Writer", "r1"),
        p(ToolResult(tool="t", call_id="2", content="ok"), "Writer", "r1"),
    ]
    turns = [p(MessageAgent(content="a"), "Writer", "r1"), p(MessageAgent(content="b"), "Critic", "r1")]
    await store.append(ref, calls + tools + turns, None)
    await store.append(ref, [p(RunFailed(error="boom"), run_id="r1")], None)
    await runner.wait_caught_up(30)
    records = [r async for r in store.read("m1")]
    table = PriceTable.load()
    day = records[3].ts
    writer_cost = table.cost_nanousd("gpt-4o-mini", 1000, 200, day)
    critic_cost = table.cost_nanousd("gpt-4o", 100, 10, day)
    assert writer_cost is not None and critic_cost is not None
    view = await queries.chat_metrics(db, "m1")
    assert view is not None
    assert view["turns"] == 2 and view["tool_calls"] == 2 and view["tool_failures"] == 1
    assert (view["prompt_tokens"], view["completion_tokens"], view["total_tokens"]) == (1112, 218, 1330)
    assert view["cost_nanousd"] == writer_cost + critic_cost
    assert view["cost"] == pytest.approx((writer_cost + critic_cost) / 1e9)
    assert view["llm"]["count"] == 4 and view["llm"]["failures"] == 1
    assert view["llm"]["offline"] == 1 and view["llm"]["unpriced"] == 1
    assert view["llm"]["latency_ms"]["max"] == 120.0 and view["llm"]["latency_ms"]["sum"] == 210.0
    assert view["errors"] == 2 and view["run_failures"] == 1 and view["runs"] == 1 and not view["running"]
    assert view["duration_s"] == (records[-1].ts - records[2].ts).total_seconds()
    writer, critic = view["agents"]["Writer"], view["agents"]["Critic"]
    assert (writer["turns"], writer["tool_calls"], writer["tool_failures"], writer["total_tokens"]) == (
        1,
        2,
        1,
        1220,
    )
    assert writer["cost_nanousd"] == writer_cost and critic["cost_nanousd"] == critic_cost
    assert writer["llm"]["count"] == 3 and critic["llm"]["latency_ms"]["p95"] == pytest.approx(80.0, rel=0.01)
    # Streaming: TTFT of every call that streamed (failed ones too); speed of the successful ones.
    assert view["llm"]["ttft_ms"]["p50"] == pytest.approx(20.0, rel=0.01)
    # DDSketch's rank q·(n−1) over the three TTFTs 4, 20, 60 ms: p95 is the 1.9th, i.e. 20 ms.
    assert view["llm"]["ttft_ms"]["p95"] == pytest.approx(20.0, rel=0.01)
    assert view["llm"]["output_tokens_per_s"] == pytest.approx((200 + 5) / 0.105)
    assert writer["llm"]["output_tokens_per_s"] == pytest.approx(205 / 0.105)
    assert critic["llm"]["output_tokens_per_s"] is None and critic["llm"]["ttft_ms"]["p50"] == pytest.approx(
        60.0, rel=0.01
    )
    aggregate = await queries.aggregate_metrics(db)
    assert aggregate["llm"]["ttft_ms"] == view["llm"]["ttft_ms"]
    assert aggregate["llm"]["output_tokens_per_s"] == view["llm"]["output_tokens_per_s"]
    assert aggregate["agents"]["Critic"]["llm"]["ttft_ms"] == critic["llm"]["ttft_ms"]
    # gpt-4o's price changed on 2024-10-02: the date of the call decides which applies.
    assert table.cost_nanousd("gpt-4o", 1_000_000, 0, day.replace(year=2024, month=6)) == 5 * 10**9
    assert (
        table.cost_nanousd("gpt-4o-2024-08-06", 1_000_000, 0, day.replace(year=2024, month=11)) == 25 * 10**8
    )


async def append_dated(store: MongoEventStore, ref: StreamRef, dated: list[tuple[datetime, Pending]]) -> None:
    """Records stamped at the given past times, chained as the store chains them (the store stamps "now")."""
    prev, docs = "0" * 64, []
    for seq, (ts, pending) in enumerate(dated, start=1):
        doc = seal(ref, pending, seq, prev, ts)
        docs.append(doc)
        prev = doc["hash"]
    await store.events.insert_many(docs)


async def test_a_call_is_priced_by_the_table_in_force_on_its_own_date_live_and_on_rebuild(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    # Per million tokens: $1 in / $2 out from 2020, $10 in / $20 out from 2025 (and still today).
    table = PriceTable(
        PriceFile(
            models={
                "m": [
                    PriceVersion(effective=date(2025, 1, 1), input=Decimal(10), output=Decimal(20)),
                    PriceVersion(effective=date(2020, 1, 1), input=Decimal(1), output=Decimal(2)),
                ]
            }
        )
    )
    runner, _ = runners(ProjectionRunner(db, store, default_projectors(table)))
    await runner.wait_caught_up(30)
    million = 1_000_000
    await append_dated(
        store,
        stream("old"),
        [
            (datetime(2022, 6, 1, 12, tzinfo=UTC), p(ChatCreated())),
            (datetime(2022, 6, 1, 12, 1, tzinfo=UTC), p(LlmCall(model="m", prompt_tokens=million), "Writer")),
            (
                datetime(2019, 3, 1, tzinfo=UTC),
                p(LlmCall(model="m-2019", completion_tokens=million), "Writer"),
            ),
            (
                datetime(2024, 12, 31, 23, 59, tzinfo=UTC),
                p(LlmCall(model="m", prompt_tokens=million), "Critic"),
            ),
            (
                datetime(2025, 1, 1, 0, 1, tzinfo=UTC),
                p(LlmCall(model="m", completion_tokens=million), "Critic"),
            ),
        ],
    )
    # 2022: $1; 2019 (before the first version): that first version, $2; the last day of 2024: $1; 2025: $20.
    expected = {"cost_nanousd": 24 * 10**9, "Writer": 3 * 10**9, "Critic": 21 * 10**9}

    async def costs() -> dict[str, int]:
        doc = await db.chat_metrics.find_one({"_id": "old"})
        assert doc is not None and doc["last_seq"] == 5
        return {
            "cost_nanousd": doc["cost_nanousd"],
            **{a: doc["agents"][a]["cost_nanousd"] for a in ("Writer", "Critic")},
        }

    await runner.wait_caught_up(30)
    assert await costs() == expected
    await rebuild(db, store, names=["metrics"], prices=table)
    assert await costs() == expected

    def bucket_costs(doc: Mapping[str, Any]) -> int:
        return sum(
            per_agent["cost_nanousd"]
            for hour in doc["hours"].values()
            for model in hour.values()
            for per_agent in model.values()
        )

    await db.metrics_buckets.delete_many({})
    await rebuild(db, store, names=["metrics_buckets"], prices=table)
    buckets = await db.metrics_buckets.find_one({"_id": "old"})
    assert buckets is not None and bucket_costs(buckets) == expected["cost_nanousd"]
    with pytest.raises(UnknownProjection) as unknown:
        await rebuild(db, store, names=["metrics", "nope"])
    assert str(unknown.value) == (
        "unknown projection(s) ['nope']; known: ['chat_sessions', 'metrics', 'metrics_buckets', 'chain_heads', 'budgets']"
    )


# ---- exactly once -----------------------------------------------------------------------------


async def test_repeated_reordered_and_gapped_delivery_applies_each_event_once(
    db: AsyncDatabase[Any], store: MongoEventStore
) -> None:
    await append_chats(store, 6, seed=1)
    log = {doc: [r async for r in store.read(doc)] for doc in [f"chat-{i}" for i in range(6)]}
    rng = random.Random(2)
    writers = [ProjectionWriter(db, store, projector) for projector in default_projectors()]
    # Two independent writers (two runners) get every event, duplicated, shuffled and in random batches.
    rival = [ProjectionWriter(db, store, projector) for projector in default_projectors()]
    deliveries = [r for records in log.values() for r in records] * 2
    rng.shuffle(deliveries)

    async def deliver(targets: list[ProjectionWriter], items: list[Record]) -> None:
        while items:
            cut = rng.randrange(1, 40)
            batch, items = items[:cut], items[cut:]
            by_chat: dict[str, list[Record]] = {}
            for record in batch:
                by_chat.setdefault(record.chat_id, []).append(record)
            await asyncio.gather(*(writer.apply(by_chat) for writer in targets))

    await asyncio.gather(deliver(writers, list(deliveries)), deliver(rival, deliveries[::-1]))
    for writer in writers:
        for chat_id, records in log.items():
            stored = await writer.collection.find_one({"_id": chat_id})
            assert stored == fold(writer.projector, None, records), (writer.projector.name, chat_id)
    sessions = {doc["_id"]: doc async for doc in db.chat_sessions.find({})}
    expected_messages = sum(
        r.type in {"message.user", "message.agent"} and r.visible for rs in log.values() for r in rs
    )
    assert sum(doc["message_count"] for doc in sessions.values()) == expected_messages


async def test_a_gap_filled_from_the_log_stops_before_a_corrupt_or_missing_record_and_names_it(
    db: AsyncDatabase[Any], store: MongoEventStore, caplog: pytest.LogCaptureFixture
) -> None:
    await append_chats(store, 3, seed=3)
    chats = ("chat-0", "chat-1", "chat-2")
    log = {chat: [r async for r in store.read(chat)] for chat in chats}
    await store.events.update_one({"chat_id": "chat-0", "seq": 3}, {"$set": {"type": "no.such.type"}})
    await store.events.delete_one({"chat_id": "chat-1", "seq": 3})
    writer = ProjectionWriter(db, store, ChatSessionsProjector())
    # Delivered: 1, 2, then each chat's last record; the gap is read from the log.
    assert await writer.apply({chat: log[chat][:2] for chat in chats}) == 6
    assert await writer.apply({chat: log[chat][-1:] for chat in chats}) == len(log["chat-2"]) - 2
    assert writer.stuck == {"chat-0": 3, "chat-1": 3}
    for chat, applied in (("chat-0", 2), ("chat-1", 2), ("chat-2", len(log["chat-2"]))):
        stored = await writer.collection.find_one({"_id": chat})
        assert stored == fold(writer.projector, None, log[chat][:applied]), chat
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"projection {writer.projector.name} stops at chat chat-0: chat chat-0, seq 3: stored record is "
        "malformed: Invalid value 'no.such.type' - at `$.event.type`"
    ]


async def test_a_writer_started_mid_run_reads_the_runs_start_before_recording_its_end(
    db: AsyncDatabase[Any], store: MongoEventStore
) -> None:
    prices = PriceTable.load(None)
    await store.append(
        stream("mid"),
        [p(MessageUser(content="hi")), p(RunStarted(pattern="RoundRobin", max_turns=4), run_id="r1")],
        0,
    )
    await store.append(stream("mid"), [p(MessageAgent(content="a"), "Writer", "r1")], 2)
    await store.append(stream("mid"), [p(RunCompleted(), run_id="r1")], 3)
    log = [r async for r in store.read("mid")]
    await ProjectionWriter(db, store, ChatMetricsProjector(prices)).apply({"mid": log[:2]})
    # A restarted runner's writer: the message needs none of the document's state, the run's end does.
    restarted = ProjectionWriter(db, store, ChatMetricsProjector(prices))
    assert await restarted.apply({"mid": log[2:3]}) == 1
    assert await restarted.apply({"mid": log[3:]}) == 1
    assert await db.chat_metrics.find_one({"_id": "mid"}) == fold(restarted.projector, None, log)


async def test_a_chat_whose_document_a_rival_wrote_first_does_not_hold_up_the_others_in_its_write(
    db: AsyncDatabase[Any], store: MongoEventStore
) -> None:
    await append_chats(store, 3, seed=22)
    log = {chat: [r async for r in store.read(chat)] for chat in ("chat-0", "chat-1", "chat-2")}
    await ProjectionWriter(db, store, ChatSessionsProjector()).apply({"chat-0": log["chat-0"][:2]})
    writer = ProjectionWriter(db, store, ChatSessionsProjector())
    await writer.apply({"chat-1": log["chat-1"][:2]})  # known to this writer: its next write is an update
    # This writer takes chat-0 for new: its insert meets the rival's document, first in the write, and
    # only the records the rival had not applied are applied after reading that document. chat-1's
    # update and chat-2's insert in the same write land, and count, once.
    assert await writer.apply(log) == sum(map(len, log.values())) - 4
    for chat, records in log.items():
        assert await db.chat_sessions.find_one({"_id": chat}) == fold(writer.projector, None, records), chat


async def test_writes_that_keep_failing_their_guard_raise_naming_the_projection_and_the_first_chats(
    db: AsyncDatabase[Any], store: MongoEventStore
) -> None:
    await append_chats(store, 7, seed=21)  # one app: a unique app_id admits one chat's document
    await db.chat_metrics.create_index("app_id", unique=True, name="one_chat_per_app")
    writer = ProjectionWriter(db, store, ChatMetricsProjector(PriceTable.load(None)))
    delivered = {chat: [r async for r in store.read(chat)] for chat in await store.chats()}
    try:
        with pytest.raises(ProjectionError) as failed:
            await writer.apply(delivered)
        written = [doc["_id"] async for doc in db.chat_metrics.find({}, {"_id": 1})]
    finally:
        await db.chat_metrics.drop_index("one_chat_per_app")
    # Each retry meets the same duplicate key: six chats stay unwritten, the message names five.
    assert len(written) == 1
    unwritten = sorted(set(delivered) - set(written))
    assert str(failed.value) == (
        f"metrics: chats {unwritten[:5]} kept missing their last_seq guard after {MAX_ATTEMPTS} attempts"
    )


async def test_log_of_many_chats_with_runner_restart_and_duplicates_equals_a_clean_rebuild(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    runner, task = runners()
    await runner.wait_caught_up(30)
    await append_chats(store, 12, seed=3, prefix="a", app_ids=("app1", "app2"))
    await stop(task)  # midway: whatever was applied is applied; the rest waits in the log
    await append_chats(store, 12, seed=4, prefix="b")
    # Meanwhile another process re-delivers a shuffled slice of the log with repeats.
    extra = [r async for r in store.find()][::3]
    random.Random(5).shuffle(extra)
    rival = [ProjectionWriter(db, store, projector) for projector in default_projectors()]
    for start in range(0, len(extra), 50):
        by_chat: dict[str, list[Record]] = {}
        for record in extra[start : start + 50]:
            by_chat.setdefault(record.chat_id, []).append(record)
        await asyncio.gather(*(writer.apply(by_chat) for writer in rival))
    restarted, _ = runners()
    await append_chats(store, 6, seed=6, prefix="c")
    await restarted.wait_caught_up(60)
    assert restarted.caught_up and restarted.lag()["events_behind"] == 0
    live = await snapshot(db)
    assert len(live["chat_metrics"]) == 30
    summary = await rebuild(db, store)
    assert summary.events == await store.events.count_documents({}) and summary.chats == 30
    assert_same(live, await snapshot(db))


async def test_rounds_coalesced_under_load_apply_each_record_once_with_a_rival_redelivering(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    runner, _ = runners(ProjectionRunner(db, store, min_interval_s=0.2))
    rounds: list[int] = []
    runner.on_applied = lambda records, _at: rounds.append(len(records))
    await runner.wait_caught_up(30)
    rival = [ProjectionWriter(db, store, projector) for projector in default_projectors()]

    async def redeliver() -> None:  # another runner applying what it sees, repeats included
        by_chat: dict[str, list[Record]] = {}
        async for record in store.find():
            by_chat.setdefault(record.chat_id, []).append(record)
        await asyncio.gather(*(writer.apply(by_chat) for writer in rival))

    await asyncio.gather(*(append_chats(store, 6, seed=s, prefix=f"load{s}") for s in range(4)), redeliver())
    await runner.wait_caught_up(60)
    live = await snapshot(db)
    assert len(live["chat_metrics"]) == 24
    assert len(rounds) < sum(rounds) / 2, f"rounds were not coalesced: {rounds}"
    await rebuild(db, store)
    assert_same(live, await snapshot(db))


async def test_streamed_text_is_projected_with_its_chats_next_record_or_the_next_checkpoint_round_once(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    # Rounds as the runtime runs them; no checkpoint round comes by itself until the last step.
    runner, _ = runners(ProjectionRunner(db, store, min_interval_s=0.05, checkpoint_every_s=3600))
    rounds: list[list[tuple[str, int]]] = []
    runner.on_applied = lambda records, _at: rounds.append([(r.chat_id, r.seq) for r in records])
    await runner.wait_caught_up(30)

    def delta(message_id: str, index: int) -> Pending:
        return p(MessageDelta(message_id=message_id, index=index, text=f"part {index} "), "Writer", "r1")

    async def until(what: str, done: Callable[[], bool]) -> None:
        for _ in range(400):
            if done():
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"the runner never {what}; rounds: {rounds}, lag: {runner.lag()}")

    def applied() -> list[tuple[str, int]]:
        return [at for round_ in rounds for at in round_]

    for chat_id in ("said", "cut"):
        await store.append(stream(chat_id), [p(ChatCreated()), p(MessageUser(content="go"))], 0)
    await until("applied the chats' first records", lambda: len(applied()) == 4)
    for index in range(3):  # a model streaming: one append per flush window
        await store.append(stream("said"), [delta("m1", index)], None)
        await store.append(stream("cut"), [delta("m2", index)], None)
    await until("held the six deltas", lambda: runner.lag()["events_behind"] == 6)
    assert len(applied()) == 4, "a round wrote documents for streamed text alone"
    assert (await db.chat_sessions.find_one({"_id": "said"}) or {})["last_seq"] == 2

    # The message's end comes: its chat's deltas go in the same round, in order, before it.
    await store.append(
        stream("said"), [p(MessageAgent(content="part 0 part 1 part 2 "), "Writer", "r1")], None
    )
    await until("applied the message", lambda: ("said", 6) in applied())
    ended = next(round_ for round_ in rounds if ("said", 6) in round_)
    assert [at for at in ended if at[0] == "said"] == [("said", 3), ("said", 4), ("said", 5), ("said", 6)]
    assert runner.lag()["events_behind"] == 3  # the other chat's text still waits for its message

    # A chat still streaming is not left behind: the next checkpoint round writes what it holds.
    runner.checkpoint_every_s = 0.2
    await until("applied the held deltas", lambda: ("cut", 5) in applied())
    assert sorted(applied()) == sorted(set(applied())), "a record was applied twice"
    live = await snapshot(db)
    assert live["chat_sessions"]["cut"]["last_seq"] == 5
    await rebuild(db, store)
    assert_same(live, await snapshot(db))


async def test_cancel_between_view_update_and_checkpoint_does_not_double_count(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    runner, task = runners()
    await append_chats(store, 4, seed=7, prefix="before")
    await runner.wait_caught_up(30)
    checkpoint = await db[CHECKPOINTS].find_one({"_id": "projections"})
    assert checkpoint is not None
    killed = asyncio.Event()

    async def kill() -> None:
        # This batch's views are written, its checkpoint is not: the runner dies exactly here.
        killed.set()
        task.cancel()
        await asyncio.sleep(0)

    runner.before_checkpoint = kill
    await append_chats(store, 8, seed=7, prefix="after")
    await asyncio.wait_for(killed.wait(), 30)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await db[CHECKPOINTS].find_one({"_id": "projections"}) == checkpoint
    restarted, _ = runners()
    await restarted.wait_caught_up(60)
    # The resumed stream delivered the killed batch again; the last_seq guard ignored it.
    assert all(writer.duplicates > 0 for writer in restarted.writers)
    live = await snapshot(db)
    total_turns = await store.events.count_documents({"type": "message.agent"})
    assert sum(doc["turns"] for doc in live["chat_metrics"].values()) == total_turns
    total_messages = await store.events.count_documents({"type": {"$in": ["message.agent", "message.user"]}})
    assert sum(len(doc["messages"]) for doc in live["chat_sessions"].values()) == total_messages
    await rebuild(db, store)
    assert_same(live, await snapshot(db))


async def test_resume_token_that_expired_is_recovered_by_catching_up_from_the_log(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    await append_chats(store, 5, seed=8)
    await db[CHECKPOINTS].insert_one({"_id": "projections", "token": {"_data": "00" * 40}})
    runner, _ = runners()
    await runner.wait_caught_up(60)
    await append_chats(store, 2, seed=9, prefix="late")
    await runner.wait_caught_up(60)
    assert await db.chat_metrics.count_documents({}) == 7
    live = await snapshot(db)
    await rebuild(db, store)
    assert_same(live, await snapshot(db))


# ---- rebuild ----------------------------------------------------------------------------------


async def test_price_table_change_and_rebuild_changes_historical_cost_exactly(
    db: AsyncDatabase[Any], store: MongoEventStore, tmp_path: Path
) -> None:
    await append_chats(store, 12, seed=10)
    await rebuild(db, store)
    before = await snapshot(db)
    prices = {
        "models": {
            "gpt-4o-mini": [{"effective": "2020-01-01", "input": 1.5, "output": 2.25}],
            "gpt-4o": [{"effective": "2020-01-01", "input": 0.5, "output": 0.125}],
        }
    }
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(prices))
    progress: list[tuple[int, int]] = []
    summary = await rebuild(
        db, store, names=["metrics"], prices=path, progress=lambda d, t: progress.append((d, t))
    )
    assert summary.names == ["metrics"] and progress[-1][0] == progress[-1][1] == summary.events
    after = await snapshot(db)
    assert after["chat_sessions"] == before["chat_sessions"]
    expected: dict[str, int] = {}
    per_million = {
        "gpt-4o-mini": (Decimal("1.5"), Decimal("2.25")),
        "gpt-4o-2024-08-06": (Decimal("0.5"), Decimal("0.125")),
    }
    async for record in store.find(types=["llm.call"]):
        call = record.event
        assert isinstance(call, LlmCall)
        if call.offline or call.model not in per_million:
            continue
        price_in, price_out = per_million[call.model]
        expected[record.chat_id] = expected.get(record.chat_id, 0) + int(
            (call.prompt_tokens * price_in + call.completion_tokens * price_out) * 1000
        )
    for chat_id, doc in after["chat_metrics"].items():
        old = before["chat_metrics"][chat_id]
        assert doc["cost_nanousd"] == expected.get(chat_id, 0), chat_id
        for field in ("prompt_tokens", "completion_tokens", "total_tokens", "turns"):
            assert doc[field] == old[field], (chat_id, field)
        # The new table has no gpt-4.1: those calls become unpriced; nothing else about the calls changes.
        assert {**doc["llm"], "unpriced": 0} == {**old["llm"], "unpriced": 0}
    assert sum(expected.values()) > 0
    assert any(
        d["cost_nanousd"] != before["chat_metrics"][c]["cost_nanousd"]
        for c, d in after["chat_metrics"].items()
    )


async def test_percentiles_after_rebuild_equal_live_and_aggregate_p95_matches_raw_latencies(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    runner, _ = runners()
    await append_chats(store, 12, seed=11, app_ids=("app1", "app2"))  # 171 LLM calls
    await runner.wait_caught_up(60)
    live_aggregate = await queries.aggregate_metrics(db)
    live_pages = await queries.list_chat_metrics(db, sort="cost", limit=500)
    await rebuild(db, store)
    assert await queries.aggregate_metrics(db) == live_aggregate
    assert await queries.list_chat_metrics(db, sort="cost", limit=500) == live_pages
    latencies = sorted([r.event.latency_ms async for r in store.find(types=["llm.call"])])  # type: ignore[union-attr]
    assert live_aggregate["llm"]["count"] == len(latencies) > 100
    for q in (0.5, 0.95):
        exact = latencies[math.floor(q * (len(latencies) - 1))]
        estimate = live_aggregate["llm"]["latency_ms"][f"p{round(q * 100)}"]
        assert abs(estimate - exact) <= sketch.RELATIVE_ACCURACY * exact, (q, estimate, exact)
    assert live_aggregate["llm"]["latency_ms"]["max"] == pytest.approx(latencies[-1], abs=1e-3)
    # Per app and per agent, the merged histograms give the same guarantee.
    for app_id in ("app1", "app2"):
        part = await queries.aggregate_metrics(db, app_id=app_id)
        values = sorted(
            [r.event.latency_ms async for r in store.find(types=["llm.call"], app_id=app_id)]  # type: ignore[union-attr]
        )
        exact = values[math.floor(0.95 * (len(values) - 1))]
        assert abs(part["llm"]["latency_ms"]["p95"] - exact) <= sketch.RELATIVE_ACCURACY * exact
    writer = sorted([r.event.latency_ms async for r in store.find(types=["llm.call"], agent="Writer")])  # type: ignore[union-attr]
    exact = writer[math.floor(0.95 * (len(writer) - 1))]
    assert (
        abs(live_aggregate["agents"]["Writer"]["llm"]["latency_ms"]["p95"] - exact)
        <= sketch.RELATIVE_ACCURACY * exact
    )
    assert "_Hidden.Tool$er" in live_aggregate["agents"]


async def append_big_chat(store: MongoEventStore) -> None:
    """Chat "big", 1,200 events: past the 1,000 after which a rebuild first reports progress."""
    for start in range(0, 1200, 200):
        await store.append(
            stream("big"),
            [p(MessageAgent(content=f"m{i}"), "Writer") for i in range(start, start + 200)],
            None,
        )


async def test_a_record_appended_while_a_rebuild_scans_is_in_its_result_without_a_runner(
    db: AsyncDatabase[Any], store: MongoEventStore
) -> None:
    await append_big_chat(store)
    late: list[asyncio.Task[Any]] = []
    reported: list[tuple[int, int]] = []

    def on_progress(done: int, total: int) -> None:
        reported.append((done, total))
        if not late:  # mid-scan: a chat the scan has passed already gets its first record
            late.append(
                asyncio.create_task(store.append(stream("a-late"), [p(MessageUser(content="late"))], 0))
            )

    summary = await rebuild(db, store, progress=on_progress)
    assert late and late[0].done()
    assert reported == [(1000, 1200), (1200, 1200)]  # every 1,000 events, and at the end
    assert (summary.chats, summary.caught_up_after_swap) == (1, 1)
    assert set((await snapshot(db))["chat_sessions"]) == {"big", "a-late"}
    # Nothing appended meanwhile: nothing to catch up after the swap.
    assert (await rebuild(db, store)).caught_up_after_swap == 0
    # One chat's rebuild reports progress against that chat's events, not the whole log's.
    reported.clear()
    await rebuild(db, store, chat_id="big", progress=lambda done, total: reported.append((done, total)))
    assert reported == [(1000, 1200), (1200, 1200)]


async def test_a_rebuild_whose_change_stream_fails_checks_every_chat_against_the_log(
    fault_server: FaultServer, fault_db: AsyncDatabase[Any], caplog: pytest.LogCaptureFixture
) -> None:
    store = MongoEventStore(fault_db)
    await store.ensure_indexes()
    await append_big_chat(store)  # one scan batch: the scan reads no more once folding starts
    late: list[asyncio.Task[Any]] = []

    def on_progress(done: int, total: int) -> None:
        if not late:  # mid-fold: the change stream's next read fails, and a passed chat gets a record
            fault_server.arm({"failCommands": ["getMore"], "errorCode": 2}, "alwaysOn")
            late.append(
                asyncio.create_task(store.append(stream("a-late"), [p(MessageUser(content="late"))], 0))
            )

    try:
        summary = await rebuild(fault_db, store, progress=on_progress)
    finally:
        fault_server.off()
    assert late and late[0].done()
    lost = [r.getMessage() for r in caplog.records if r.name == "projections.rebuild"]
    assert len(lost) == 1 and lost[0].startswith("rebuild: change stream lost (Failing command"), lost
    assert lost[0].endswith("'code': 2, 'codeName': 'BadValue'}); checking every chat against the log"), lost
    # Not knowing which chats got records meanwhile, it caught every chat up from the log.
    assert summary.caught_up_after_swap == 1
    assert set((await snapshot(fault_db))["chat_sessions"]) == {"big", "a-late"}


async def test_a_rebuild_cancelled_mid_scan_ends_cancelled_and_writes_nothing(
    db: AsyncDatabase[Any], store: MongoEventStore
) -> None:
    await append_big_chat(store)
    await rebuild(db, store)
    await db.chat_sessions.update_one({"_id": "big"}, {"$set": {"messages": []}})
    before = await snapshot(db)

    def cancel_at_first_progress(done: int, total: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # within the scan, before the first batch of documents is written

    rebuilding = asyncio.create_task(rebuild(db, store, progress=cancel_at_first_progress))
    with pytest.raises(asyncio.CancelledError):
        await rebuilding
    assert rebuilding.cancelled()
    assert await snapshot(db) == before


async def test_rebuild_while_the_runner_is_live_converges_to_the_log(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    runner, _ = runners()
    await append_chats(store, 10, seed=12)
    await runner.wait_caught_up(60)
    rebuilt = asyncio.Event()

    async def keep_appending() -> None:
        # Appends before, during and after the swap; some chats get nothing after it.
        rng = random.Random(13)
        for i in range(60):
            chat_id = f"chat-{rng.randrange(10)}" if i % 3 else f"new-{i}"
            await store.append(stream(chat_id), [p(MessageAgent(content=f"late {i}"), "Writer", "x")], None)
            if i == 40:
                await rebuilt.wait()

    async def rebuild_midway() -> None:
        await rebuild(db, store)
        rebuilt.set()

    await asyncio.gather(keep_appending(), rebuild_midway())
    await runner.wait_caught_up(60)
    live = await snapshot(db)
    await rebuild(db, store)
    assert_same(live, await snapshot(db))


async def test_rebuild_of_one_chat_replaces_only_its_documents(
    db: AsyncDatabase[Any], store: MongoEventStore, runners: Callable[..., Any]
) -> None:
    runner, _ = runners()
    await append_chats(store, 4, seed=14)
    await runner.wait_caught_up(60)
    good = await snapshot(db)
    await db.chat_metrics.update_many({}, {"$inc": {"turns": 100}})
    await db.chat_sessions.update_one({"_id": "chat-1"}, {"$set": {"messages": []}})
    await db.chat_metrics.delete_one({"_id": "chat-3"})
    progress: list[tuple[int, int]] = []
    started = time.perf_counter()
    summary = await rebuild(db, store, chat_id="chat-1", progress=lambda d, t: progress.append((d, t)))
    took = time.perf_counter() - started
    events = await store.events.count_documents({"chat_id": "chat-1"})
    # Its own timing: within the call's, in milliseconds, and the rate is the events over it.
    assert summary.chat_id == "chat-1" and 0 < summary.seconds <= round(took, 3) + 0.001
    fastest, slowest = summary.seconds - 0.0005, summary.seconds + 0.0005  # `seconds` is rounded to 1 ms
    assert events / slowest - 0.05 <= summary.events_per_s <= events / max(fastest, 1e-9) + 0.05
    assert (summary.chats, summary.events, progress[-1]) == (1, events, (events, events))
    # The rebuild wrote the chat's documents itself: its catch-up after the swap found nothing to apply.
    assert summary.caught_up_after_swap == 0
    now = await snapshot(db)
    assert now["chat_sessions"] == good["chat_sessions"]
    assert now["chat_metrics"]["chat-1"] == good["chat_metrics"]["chat-1"]
    assert now["chat_metrics"]["chat-2"]["turns"] == good["chat_metrics"]["chat-2"]["turns"] + 100
    # One projection of one chat whose document is gone: written anew, and nothing else.
    summary = await rebuild(db, store, names=["metrics"], chat_id="chat-3")
    assert (summary.chats, summary.caught_up_after_swap) == (1, 0)
    assert (await snapshot(db))["chat_metrics"]["chat-3"] == good["chat_metrics"]["chat-3"]


async def test_rebuild_removes_documents_of_chats_the_log_does_not_have(
    db: AsyncDatabase[Any], store: MongoEventStore
) -> None:
    good = await rebuilt_chats(db, store, 3, seed=17)
    # Left behind by an older table, a restored backup or a test run: chats with no events at all.
    for ghost in ("ghost-1", "ghost-2"):
        for name in COLLECTIONS:
            await db[name].insert_one({"_id": ghost, "chat_id": ghost, "app_id": "app", "last_seq": 9})
    summary = await rebuild(db, store)
    assert summary.chats == 3
    assert await snapshot(db) == good
    # Rebuilding one such chat removes its documents too, and touches no other chat's.
    for name in COLLECTIONS:
        await db[name].insert_one({"_id": "ghost-3", "chat_id": "ghost-3", "app_id": "app", "last_seq": 9})
    summary = await rebuild(db, store, chat_id="ghost-3")
    assert summary.chats == 0 and summary.events == 0
    assert await snapshot(db) == good


async def test_catch_up_reads_only_what_each_chat_is_missing_and_a_writer_counts_what_it_had_applied(
    db: AsyncDatabase[Any], store: MongoEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await append_chats(store, 3, seed=20)
    await rebuild(db, store)
    await store.append(
        stream("chat-1"), [Pending(event=MessageUser(content=f"more {i}")) for i in range(2)], None
    )
    writers = [ProjectionWriter(db, store, projector) for projector in default_projectors()]
    # Rebuilding another chat leaves chat-1 as it is: its catch-up covers only the chat rebuilt.
    assert (await rebuild(db, store, chat_id="chat-0")).caught_up_after_swap == 0
    await store.append(stream("chat-2"), [Pending(event=MessageUser(content="one more"))], None)
    # One chat per round here: what each round reads adds up, and so does the progress it reports.
    monkeypatch.setattr(writer_module, "CATCH_UP_CHATS", 1)
    reported: list[tuple[int, int]] = []
    caught_up = await catch_up(store, writers, progress=lambda done, total: reported.append((done, total)))
    assert caught_up == 3  # chat-1's two new records and chat-2's one, nothing else
    assert reported == [(2, 3), (3, 3)]
    assert await catch_up(store, writers) == 0
    # And at most CATCH_UP_EVENTS lagging events a round (two here), over chats one record behind each.
    monkeypatch.setattr(writer_module, "CATCH_UP_CHATS", 500)
    monkeypatch.setattr(writer_module, "CATCH_UP_EVENTS", 2)
    for chat_id in ("chat-0", "chat-1", "chat-2", "chat-3"):  # chat-3 is new
        await store.append(stream(chat_id), [Pending(event=MessageUser(content="again"))], None)
    reported.clear()
    assert await catch_up(store, writers, progress=lambda done, total: reported.append((done, total))) == 4
    assert reported == [(2, 4), (4, 4)]
    # A writer handed records it has applied already applies none of them again, and counts them.
    records = [r async for r in store.read("chat-0")]
    writer = ProjectionWriter(db, store, ChatSessionsProjector(), collection="sessions_again")
    assert await writer.apply({"chat-0": records}) == len(records)
    assert (await writer.apply({"chat-0": records}), writer.duplicates) == (0, len(records))
    [new] = await store.append(stream("chat-0"), [Pending(event=MessageUser(content="new"))], None)
    assert (await writer.apply({"chat-0": [*records[-2:], new]}), writer.duplicates) == (1, len(records) + 2)
    await db.drop_collection("sessions_again")


async def test_a_chat_whose_first_record_is_unreadable_is_left_out_and_every_other_chat_rebuilt(
    db: AsyncDatabase[Any], store: MongoEventStore
) -> None:
    good = await rebuilt_chats(db, store, 4, seed=18)
    await store.events.update_one({"chat_id": "chat-1", "seq": 1}, {"$set": {"type": "no.such.type"}})
    summary = await rebuild(db, store)
    assert (summary.chats, summary.broken_chats) == (3, {"chat-1": 1})
    expected = {name: {c: doc for c, doc in docs.items() if c != "chat-1"} for name, docs in good.items()}
    assert await snapshot(db) == expected


async def test_a_rebuild_stops_each_chat_at_a_gap_or_an_unreadable_last_record_and_says_where(
    db: AsyncDatabase[Any], store: MongoEventStore, caplog: pytest.LogCaptureFixture
) -> None:
    good = await rebuilt_chats(db, store, 3, seed=21)
    await store.events.delete_one({"chat_id": "chat-0", "seq": 3})  # a record missing mid-chat
    last = await store.last_seq("chat-2")
    await store.events.update_one({"chat_id": "chat-2", "seq": last}, {"$set": {"type": "no.such.type"}})
    summary = await rebuild(db, store)
    assert summary.broken_chats == {"chat-0": 3, "chat-2": last}
    said = [r.getMessage() for r in caplog.records if r.name == "projections.rebuild"]
    assert said == [
        "rebuild stops at chat chat-0: seq 3 is missing from the log",
        f"rebuild stops at chat chat-2: chat chat-2, seq {last}: stored record is malformed: "
        "Invalid value 'no.such.type' - at `$.event.type`",
    ]
    now = await snapshot(db)
    assert now["chat_sessions"]["chat-0"]["last_seq"] == 2
    assert now["chat_sessions"]["chat-2"]["last_seq"] == last - 1
    assert now["chat_metrics"]["chat-1"] == good["chat_metrics"]["chat-1"]


async def test_a_rebuild_whose_writes_fail_raises_and_does_not_report_success(
    db: AsyncDatabase[Any], store: MongoEventStore
) -> None:
    await append_chats(store, 3, seed=19)  # one app: a unique app_id admits one chat's document
    await db.chat_metrics.create_index("app_id", unique=True, name="one_chat_per_app")
    try:
        with pytest.raises(BulkWriteError):
            await rebuild(db, store, names=["metrics"])
    finally:
        await db.chat_metrics.drop_index("one_chat_per_app")


async def test_corrupt_record_stops_only_its_chat(
    db: AsyncDatabase[Any],
    store: MongoEventStore,
    runners: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await append_chats(store, 3, seed=15)
    await store.events.update_one({"chat_id": "chat-0", "seq": 3}, {"$set": {"type": "no.such.type"}})
    runner, _ = runners()
    await runner.wait_caught_up(60)
    assert runner.lag()["stuck_chats"] == 1
    stops = [
        r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "stops at" in r.getMessage()
    ]
    assert stops and all(
        m.startswith("catch-up stops at chat chat-0: chat chat-0, seq 3: stored record is malformed")
        for m in stops
    ), stops
    sessions = await snapshot(db)
    assert sessions["chat_sessions"]["chat-0"]["last_seq"] == 2
    heads = {r.chat_id: r.seq async for r in store.find(chat_id="chat-1")} | {
        r.chat_id: r.seq async for r in store.find(chat_id="chat-2")
    }
    assert {c: sessions["chat_metrics"][c]["last_seq"] for c in heads} == heads
    summary = await rebuild(db, store)
    assert summary.broken_chats == {"chat-0": 3}
    assert_same(sessions, await snapshot(db))
    summary = await rebuild(db, store, chat_id="chat-0")
    assert summary.broken_chats == {"chat-0": 3}
    assert_same(sessions, await snapshot(db))


# ---- queries ----------------------------------------------------------------------------------


async def test_metrics_list_pages_sorts_and_filters(db: AsyncDatabase[Any], store: MongoEventStore) -> None:
    await append_chats(store, 9, seed=16, app_ids=("a", "b", "c"))
    await rebuild(db, store)
    everything = await queries.list_chat_metrics(db, sort="cost", limit=100)
    costs = [item["cost_nanousd"] for item in everything["items"]]
    assert everything["total"] == 9 and costs == sorted(costs, reverse=True)
    first = await queries.list_chat_metrics(db, sort="tokens", descending=False, offset=0, limit=4)
    second = await queries.list_chat_metrics(db, sort="tokens", descending=False, offset=4, limit=4)
    tokens = [item["total_tokens"] for item in first["items"] + second["items"]]
    assert tokens == sorted(tokens) and len(tokens) == 8
    only_a = await queries.list_chat_metrics(db, app_id="a", sort="time")
    assert only_a["total"] == 3 and {item["app_id"] for item in only_a["items"]} == {"a"}
    times = [item["updated_at"] for item in only_a["items"]]
    assert times == sorted(times, reverse=True)
    aggregate = await queries.aggregate_metrics(db, app_id="a")
    assert aggregate["chats"] == 3
    assert aggregate["total_tokens"] == sum(item["total_tokens"] for item in only_a["items"])
    assert aggregate["cost_nanousd"] == sum(item["cost_nanousd"] for item in only_a["items"])
    assert sum(agent["turns"] for agent in aggregate["agents"].values()) == aggregate["turns"]
    with pytest.raises(ValueError, match="sort"):
        await queries.list_chat_metrics(db, sort="$where")
    assert await queries.chat_metrics(db, "nope") is None
    sessions = await queries.list_sessions(db, app_id="a", messages=1)
    assert len(sessions) == 3 and all(len(s["messages"]) == 1 for s in sessions)
    empty = await queries.aggregate_metrics(db, app_id="nobody")
    assert empty["chats"] == 0 and empty["llm"]["latency_ms"]["p95"] is None


def test_projector_names_and_handled_types_are_the_contract() -> None:
    assert (ChatSessionsProjector.name, ChatSessionsProjector.collection) == (
        "chat_sessions",
        "chat_sessions",
    )
    assert (ChatMetricsProjector.name, ChatMetricsProjector.collection) == ("metrics", "chat_metrics")
    assert "llm.call" in ChatMetricsProjector.handles and "llm.call" not in ChatSessionsProjector.handles


# ---- command line -----------------------------------------------------------------------------


def test_rebuild_command_shows_progress_and_a_summary(mongo_uri: str, db_name: str) -> None:
    from click.testing import CliRunner
    from pymongo import MongoClient

    from app.cli.projections import projections_group
    from domain.events import now, seal

    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        database = client[db_name]
        for name in database.list_collection_names():
            database[name].delete_many({})
        docs, prev = [], "0" * 64
        for seq in range(1, 1201):
            event = MessageUser(content="q") if seq == 1 else MessageAgent(content=f"m{seq}")
            doc = seal(stream("cli"), p(event, None if seq == 1 else "Writer"), seq, prev, now())
            docs.append(doc)
            prev = doc["hash"]
        database.events.insert_many(docs)
        env = {"DATABASE_URI": mongo_uri, "MOZAIKS_DB": db_name}
        result = CliRunner().invoke(projections_group, ["rebuild", "--name", "metrics"], env=env)
        assert result.exit_code == 0, result.output
        assert "events/s" in result.output and "Rebuild finished" in result.output
        assert "1,200" in result.output and "metrics" in result.output
        assert database.chat_metrics.find_one({"_id": "cli"})["turns"] == 1199  # type: ignore[index]
        assert database.chat_sessions.count_documents({}) == 0
        result = CliRunner().invoke(projections_group, ["rebuild", "--chat", "cli"], env=env)
        assert result.exit_code == 0, result.output
        assert database.chat_sessions.find_one({"_id": "cli"})["message_count"] == 1200  # type: ignore[index]
        status = CliRunner().invoke(projections_group, ["status"], env=env)
        assert status.exit_code == 0 and "chat_metrics" in status.output, status.output
        wrong = CliRunner().invoke(projections_group, ["rebuild", "--name", "nope"], env=env)
        assert wrong.exit_code == 2 and "nope" in wrong.output
    finally:
        client.close()


def test_price_file_errors_name_the_file_and_an_edited_file_is_reloaded(tmp_path: Path) -> None:
    from projections.prices import PriceTableError, WatchedPrices

    path = tmp_path / "prices.json"
    path.write_text('{"models": {"m": [{"effective": "2025-01-01", "input": 1, "output": 2, "cached": 0}]}}')
    with pytest.raises(PriceTableError, match=r"prices\.json.*cached"):
        PriceTable.load(path)
    with pytest.raises(PriceTableError, match="cannot read"):
        PriceTable.load(tmp_path / "missing.json")
    path.write_text('{"models": {"m": [{"effective": "2025-01-01", "input": 1, "output": 2}]}}')
    watched = WatchedPrices(path)
    on = datetime(2025, 6, 1, tzinfo=UTC)
    assert watched.table.cost_nanousd("m-2025-05-01", 1_000_000, 1_000_000, on) == 3 * 10**9
    assert watched.table.cost_nanousd("other", 1, 1, on) is None
    path.write_text('{"models": {"m": [{"effective": "2025-01-01", "input": 10, "output": 20}]}}')
    assert watched.refresh()
    assert watched.table.cost_nanousd("m", 1_000_000, 0, on) == 10 * 10**9
    path.write_text("not json")
    assert not watched.refresh() and watched.table.cost_nanousd("m", 1_000_000, 0, on) == 10 * 10**9


async def test_a_huge_chat_keeps_its_session_document_bounded_and_the_runner_going(store, db) -> None:
    """A chat far over MongoDB's 16 MB document limit never wedges the runner or other chats."""
    from projections.runner import ProjectionRunner
    from projections.sessions import MAX_CONTENT, MAX_MESSAGES

    big = StreamRef(chat_id="huge", app_id="a", user_id="u", workflow="W")
    small = StreamRef(chat_id="small", app_id="a", user_id="u", workflow="W")
    text = "x" * 40_000
    for start in range(0, 800, 100):
        await store.append(
            big, [Pending(event=MessageAgent(content=text), agent="A") for _ in range(100)], start
        )
    await store.append(small, [Pending(event=MessageAgent(content="hi"), agent="A")], 0)
    runner = ProjectionRunner(db, store)
    task = asyncio.create_task(runner.run())
    try:
        await runner.wait_caught_up(timeout=120)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    huge = await db["chat_sessions"].find_one({"_id": "huge"})
    assert huge["message_count"] == 800 and huge["last_seq"] == 800
    assert len(huge["messages"]) == MAX_MESSAGES and huge["messages"][-1]["seq"] == 800
    assert all(m["truncated"] and len(m["content"]) == MAX_CONTENT for m in huge["messages"])
    assert (await db["chat_sessions"].find_one({"_id": "small"}))["messages"][0]["truncated"] is False
