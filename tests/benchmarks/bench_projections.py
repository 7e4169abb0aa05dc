"""Benchmark: projection rebuild rate vs a raw cursor scan, and live projection lag under load.

    .venv/bin/python tests/benchmarks/bench_projections.py [--events 100000] [--chats 1000]
        [--rate 150] [--seconds 20]

Uses MOZAIKS_TEST_MONGO_URI if set, else starts the embedded server. Inserts `--events` synthetic
records (hash-chained, like recorded chats) across `--chats` chats with insert_many, then measures in
the same run:
  1. a raw cursor scan of the events collection (natural order, and in (chat_id, seq) order);
  2. `rebuild()` of every projection (fold in memory, insert into new collections, swap, catch-up);
  3. live lag (applied time − record time) of the projection runner while appenders write bursts at
     `--rate` events/s, next to the delivery lag of a bare change-stream consumer on the same load.
Prints rates and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pymongo import AsyncMongoClient

from domain.events import (
    GENESIS_HASH,
    AnyEvent,
    ChatCreated,
    LlmCall,
    MessageAgent,
    MessageUser,
    Pending,
    RunCompleted,
    RunStarted,
    SpeakerSelected,
    StreamRef,
    ToolCalled,
    ToolResult,
    now,
    seal,
)
from domain.store import MongoEventStore
from projections.rebuild import rebuild
from projections.runner import ProjectionRunner
from tests.nodes import benchmark_mongo_uri

AGENTS = ("Planner", "Writer", "Critic", "Reviewer")


def turn(rng: random.Random, run_id: str) -> list[Pending]:
    """One agent turn as the recorder writes it: speaker, LLM call, maybe a tool, the message."""
    agent = rng.choice(AGENTS)
    events: list[tuple[AnyEvent, bool]] = [
        (SpeakerSelected(speaker=agent), True),
        (
            LlmCall(
                model="gpt-4o-mini",
                prompt_tokens=rng.randrange(200, 4000),
                completion_tokens=rng.randrange(20, 600),
                latency_ms=math.exp(rng.gauss(6.3, 0.7)),
            ),
            False,
        ),
    ]
    if rng.random() < 0.3:
        call_id = f"call{rng.randrange(10**9)}"
        events.append((ToolCalled(tool="search", call_id=call_id, arguments='{"query": "solar"}'), True))
        events.append((ToolResult(tool="search", call_id=call_id, content="results " * 20), True))
    events.append((MessageAgent(content="A paragraph of agent output. " * 12), True))
    return [Pending(event=e, agent=agent, run_id=run_id, visible=v) for e, v in events]


def chat_log(rng: random.Random, size: int) -> list[Pending]:
    """About `size` events of one chat: created, user message, runs of turns, terminal events."""
    items = [Pending(event=ChatCreated()), Pending(event=MessageUser(content="Write about solar energy"))]
    while len(items) < size:
        run_id = f"run{rng.randrange(10**9)}"
        items.append(Pending(event=RunStarted(pattern="RoundRobin", max_turns=20), run_id=run_id))
        for _ in range(rng.randrange(3, 10)):
            items.extend(turn(rng, run_id))
        items.append(Pending(event=RunCompleted(), run_id=run_id))
    return items[:size]


async def insert_log(store: MongoEventStore, events: int, chats: int) -> None:
    rng = random.Random(1)
    per_chat = events // chats
    batch: list[dict[str, Any]] = []
    for index in range(chats):
        size = per_chat + (1 if index < events - per_chat * chats else 0)
        ref = StreamRef(
            chat_id=f"chat-{index:05d}", app_id=f"app{index % 3}", user_id=f"u{index % 50}", workflow="W"
        )
        prev = GENESIS_HASH
        for seq, pending in enumerate(chat_log(rng, size), start=1):
            doc = seal(ref, pending, seq, prev, now())
            prev = doc["hash"]
            batch.append(doc)
        if len(batch) >= 5000:
            await store.events.insert_many(batch, ordered=False)
            batch = []
    if batch:
        await store.events.insert_many(batch, ordered=False)


async def raw_scan(store: MongoEventStore, ordered: bool) -> tuple[int, float]:
    sort = [("chat_id", 1), ("seq", 1)] if ordered else None
    start = time.perf_counter()
    count = 0
    async for _ in store.events.find({}, sort=sort, batch_size=2000):
        count += 1
    return count, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * (len(ordered) - 1)), len(ordered) - 1)] if ordered else float("nan")


async def live_lag(db: Any, store: MongoEventStore, chats: int, rate: float, seconds: float) -> None:
    runner = ProjectionRunner(db, store)
    lags: list[float] = []
    behind: list[int] = []

    def applied(records: Any, at: datetime) -> None:
        lags.extend((at - r.ts).total_seconds() * 1000 for r in records)

    runner.on_applied = applied
    task = asyncio.create_task(runner.run())
    await runner.wait_caught_up(600)
    bare: list[float] = []
    async with await store.events.watch([{"$match": {"operationType": "insert"}}]) as opened:
        token = opened.resume_token

    async def bare_consumer() -> None:
        async for change in store.tail(resume_after=token):
            bare.append((datetime.now(UTC) - change.record.ts).total_seconds() * 1000)

    consumer = asyncio.create_task(bare_consumer())
    rng = random.Random(2)
    writer = MongoEventStore(db)
    appended = 0
    start = time.perf_counter()
    deadline = start + seconds
    pending: set[asyncio.Task[Any]] = set()

    async def append_burst(ref: StreamRef, burst: list[Pending]) -> None:
        nonlocal appended
        await writer.append(ref, burst, None)
        appended += len(burst)

    # Open loop: a burst (one agent turn, 3-5 records) at fixed intervals, whatever the latency.
    tick = start
    while tick < deadline:
        index = rng.randrange(chats)
        ref = StreamRef(chat_id=f"chat-{index:05d}", app_id=f"app{index % 3}", user_id="u", workflow="W")
        burst = turn(rng, "live")
        appending = asyncio.create_task(append_burst(ref, burst))
        pending.add(appending)
        appending.add_done_callback(pending.discard)
        behind.append(int(runner.lag()["events_behind"]))
        tick += len(burst) / rate
        await asyncio.sleep(max(tick - time.perf_counter(), 0))
    await asyncio.gather(*pending)
    elapsed = time.perf_counter() - start
    await runner.wait_caught_up(600)
    consumer.cancel()
    task.cancel()
    await asyncio.gather(consumer, task, return_exceptions=True)
    print(
        f"live lag under {appended / elapsed:,.0f} events/s of appends for {elapsed:.1f} s ({appended:,} events)"
    )
    print(f"  projection runner  p50 {percentile(lags, 0.5):7.1f} ms   p95 {percentile(lags, 0.95):7.1f} ms"
          f"   max {max(lags):7.1f} ms   ({len(lags):,} events)")  # fmt: skip
    print(f"  bare change stream p50 {percentile(bare, 0.5):7.1f} ms   p95 {percentile(bare, 0.95):7.1f} ms"
          f"   max {max(bare):7.1f} ms")  # fmt: skip
    print(f"  ratio projection/bare: p50 {percentile(lags, 0.5) / percentile(bare, 0.5):.2f}x, "
          f"p95 {percentile(lags, 0.95) / percentile(bare, 0.95):.2f}x; "
          f"events behind while appending: mean {statistics.mean(behind):.1f}, max {max(behind)}")  # fmt: skip


async def bench(uri: str, events: int, chats: int, rate: float, seconds: float) -> None:
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
    db = client[f"bench_projections_{os.getpid()}"]
    try:
        store = MongoEventStore(db)
        await store.ensure_indexes()
        start = time.perf_counter()
        await insert_log(store, events, chats)
        print(f"inserted {events:,} events across {chats:,} chats in {time.perf_counter() - start:.1f} s")

        count, natural = await raw_scan(store, ordered=False)
        _, ordered = await raw_scan(store, ordered=True)
        print(f"raw cursor scan, natural order     {count / natural:10,.0f} events/s  ({natural:.2f} s)")
        print(f"raw cursor scan, (chat_id, seq)    {count / ordered:10,.0f} events/s  ({ordered:.2f} s)")
        summary = await rebuild(db, store)
        rate_rebuild = summary.events / summary.seconds
        print(f"rebuild of every projection        {rate_rebuild:10,.0f} events/s  ({summary.seconds:.2f} s, "
              f"{summary.chats:,} chats)")  # fmt: skip
        print(f"  ratio rebuild / raw scan: {rate_rebuild / (count / natural):.2f} (natural order), "
              f"{rate_rebuild / (count / ordered):.2f} ((chat_id, seq) order)")  # fmt: skip
        await live_lag(db, store, chats, rate, seconds)
    finally:
        await client.drop_database(db.name)
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--chats", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=150.0, help="live append load, events/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="live load duration")
    args = parser.parse_args()
    with benchmark_mongo_uri() as uri:
        asyncio.run(bench(uri, args.events, args.chats, args.rate, args.seconds))


if __name__ == "__main__":
    main()
