"""Benchmark: the app-wide audit query, the audit export and `audit verify`, against raw `find` (ratios).

    .venv/bin/python tests/benchmarks/bench_audit.py [--chats 400] [--per-chat 50]

Uses MOZAIKS_TEST_MONGO_URI if set, else starts the embedded server (the log journaled per write: `j: true`).
Writes chats of two apps (sealed, chained records, as the store writes them), then, for app P:
- query: every record, through `find_records` and encoded as the NDJSON lines `GET /api/events` sends,
  vs a raw `find({"app_id": "P"})` that only iterates the documents (goal: ratio ≤ 1.5);
- filtered query: `type=llm.call` the same way;
- export: `mozaiks audit export --app P` (NDJSON to a sink, every chain checked as it streams past)
  vs the same raw find; the verification alone in records/s (`mozaiks audit verify --app P`).
The raw baseline is also run with the audit query's sort, which separates what the server's sorted
index scan costs from what the runtime adds. Each figure is the median of 5 rounds, the runs of a
comparison interleaved in every round.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import msgspec
from pymongo import AsyncMongoClient
from rich.console import Console

from app.cli.audit import _export
from app.settings import Settings
from domain.anchors import AnchorBook
from domain.audit import AuditFilter, Plan, find_records, plans, verify_log
from domain.events import GENESIS_HASH, LlmCall, MessageAgent, Pending, StreamRef, ToolCalled, now, seal
from domain.store import MongoEventStore
from tests.nodes import benchmark_mongo_uri

_ndjson = msgspec.json.Encoder(enc_hook=str)


def chat_docs(k: int, per_chat: int) -> list[dict[str, Any]]:
    stream = StreamRef(chat_id=f"chat-{k:05d}", app_id="PQ"[k % 2], user_id=f"u{k % 7}", workflow="W")
    prev, docs = GENESIS_HASH, []
    for seq in range(1, per_chat + 1):
        match seq % 3:
            case 0:
                event: Any = LlmCall(
                    model="gpt-4o-mini", prompt_tokens=120, completion_tokens=40, latency_ms=300.0
                )
            case 1:
                event = MessageAgent(content="lorem ipsum dolor sit amet " * 6)
            case _:
                event = ToolCalled(tool="search", call_id=f"c{seq}", arguments='{"q": "bees"}')
        doc = seal(stream, Pending(event=event, agent="Writer", run_id="r"), seq, prev, now())
        prev = doc["hash"]
        docs.append(doc)
    return docs


ROUNDS = 5


async def timed(runs: dict[str, Callable[[], Awaitable[int]]]) -> list[tuple[float, int]]:
    """Each run's median time over ROUNDS rounds, the runs interleaved in every round (noise hits all)."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    counts: dict[str, int] = {}
    for _ in range(ROUNDS):
        for label, fn in runs.items():
            start = time.perf_counter()
            counts[label] = await fn()
            times[label].append(time.perf_counter() - start)
    out = []
    for label in runs:
        elapsed = statistics.median(times[label])
        print(f"  {label:<52} {elapsed * 1000:9.1f} ms  {counts[label] / elapsed:10,.0f} records/s (median)")
        out.append((elapsed, counts[label]))
    return out


async def bench(uri: str, chats: int, per_chat: int) -> None:
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
    name = f"bench_audit_{os.getpid()}"
    db = client[name]
    store = MongoEventStore(db)
    await store.ensure_indexes()
    print(f"writing {chats} chats x {per_chat} records (two apps)")
    for start in range(0, chats, 20):
        await store.events.insert_many(
            [d for k in range(start, min(start + 20, chats)) for d in chat_docs(k, per_chat)]
        )
    book = AnchorBook(db, b"bench-key")
    await book.ensure_indexes()

    async def raw(query: dict[str, Any], plan: Plan | None = None) -> int:
        count = 0
        extra: dict[str, Any] = {"sort": plan.sort, "hint": plan.hint} if plan is not None else {}
        async for _ in store.events.find(query, batch_size=1000, **extra):
            count += 1
        return count

    async def audited(f: AuditFilter) -> int:
        count = 0
        async for doc in find_records(store.events, f):
            doc["id"] = doc.pop("_id")
            _ndjson.encode(doc)
            count += 1
        return count

    for label, query, f in (
        ("every record of app P", {"app_id": "P"}, AuditFilter(app_id="P")),
        (
            "type=llm.call of app P",
            {"app_id": "P", "type": "llm.call"},
            AuditFilter(app_id="P", types=("llm.call",)),
        ),
    ):
        print(f"query: {label}")
        plan = plans(f)[0]
        (raw_t, raw_n), (same_t, _), (audit_t, audit_n) = await timed(
            {
                "raw find (documents only)": lambda q=query: raw(q),  # type: ignore[misc]
                "raw find, same sort": lambda q=query, p=plan: raw(q, p),  # type: ignore[misc]
                "find_records + NDJSON encoding": lambda f=f: audited(f),  # type: ignore[misc]
            }
        )
        assert raw_n == audit_n, (raw_n, audit_n)
        print(
            f"  ratio audit/raw: {audit_t / raw_t:.2f}x (vs the same sorted index scan: {audit_t / same_t:.2f}x)"
        )

    print("export: mozaiks audit export --app P (NDJSON, chains checked as the records stream past)")
    settings = Settings(database_uri=uri, db_name=name, anchor_key="bench-key")
    quiet = Console(file=io.StringIO())

    async def export() -> int:
        sink = io.BytesIO()
        code = await _export(settings, AuditFilter(app_id="P"), sink, quiet)
        assert code == 0, quiet.file.getvalue()  # type: ignore[attr-defined]
        return sink.getvalue().count(b"\n")

    every = plans(AuditFilter(app_id="P"))[0]
    (raw_t, _), (same_t, _), (export_t, _) = await timed(
        {
            "raw find (documents only)": lambda: raw({"app_id": "P"}),
            "raw find, same sort": lambda: raw({"app_id": "P"}, every),
            "audit export (with verification)": export,
        }
    )
    print(f"  ratio export/raw: {export_t / raw_t:.2f}x (vs the same sorted read: {export_t / same_t:.2f}x)")

    print("verify: mozaiks audit verify --app P")

    async def verify() -> int:
        result = await verify_log(store.events, book, app_id="P")
        assert result.ok
        return result.records

    await timed({"verify_log (hash chains + anchors)": verify})
    await client.drop_database(name)
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=400)
    parser.add_argument("--per-chat", type=int, default=50)
    args = parser.parse_args()
    with benchmark_mongo_uri() as uri:
        asyncio.run(bench(uri, args.chats, args.per_chat))


if __name__ == "__main__":
    main()
