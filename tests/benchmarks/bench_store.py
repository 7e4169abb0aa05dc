"""Benchmark: the event store against raw PyMongo on the same server, in the same run (ratios).

    .venv/bin/python tests/benchmarks/bench_store.py [--events 2000] [--read 10000]

Uses MOZAIKS_TEST_MONGO_URI if set, else starts the embedded server (the log journaled per write: `j: true`).
Prints: append one-by-one (store.append vs insert_one), append in batches of 20 (store.append vs
insert_many), and reading 10,000 events (store.read vs a raw find), each as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pymongo import AsyncMongoClient, WriteConcern

from domain.events import GENESIS_HASH, MessageAgent, Pending, StreamRef, now, seal
from domain.store import MongoEventStore
from tests.nodes import benchmark_mongo_uri


def pendings(n: int) -> list[Pending]:
    return [
        Pending(event=MessageAgent(content=f"message {i} " + "lorem ipsum " * 8), agent="Writer")
        for i in range(n)
    ]


def raw_docs(chat_id: str, items: list[Pending]) -> list[dict[str, Any]]:
    stream = StreamRef(chat_id=chat_id, app_id="bench", user_id="u", workflow="W")
    return [seal(stream, p, i + 1, GENESIS_HASH, now()) for i, p in enumerate(items)]


async def timed(label: str, fn: Any) -> float:
    start = time.perf_counter()
    await fn()
    elapsed = time.perf_counter() - start
    print(f"  {label:<44} {elapsed * 1000:9.1f} ms")
    return elapsed


async def bench(uri: str, events: int, read_count: int) -> None:
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
    db = client[f"bench_store_{os.getpid()}"]
    store = MongoEventStore(db)
    await store.ensure_indexes()
    raw = db.get_collection("raw", write_concern=WriteConcern(w="majority", j=True))
    await raw.create_index([("chat_id", 1), ("seq", 1)], unique=True)
    ref = StreamRef(chat_id="one", app_id="bench", user_id="u", workflow="W")

    print(f"append {events} events one by one (durable: w=majority, j=true)")

    async def store_one() -> None:
        for seq, p in enumerate(pendings(events)):
            await store.append(ref, [p], seq)

    async def raw_one() -> None:
        for doc in raw_docs("one", pendings(events)):
            await raw.insert_one(doc)

    raw_t = await timed("raw insert_one", raw_one)
    store_t = await timed("store.append (1 per call)", store_one)
    print(f"  ratio store/raw: {store_t / raw_t:.2f}x  ({events / store_t:,.0f} events/s)")

    print(f"append {events} events in batches of 20")
    batch_ref = StreamRef(chat_id="batch", app_id="bench", user_id="u", workflow="W")

    async def store_batches() -> None:
        seq = 0
        items = pendings(events)
        for i in range(0, events, 20):
            chunk = items[i : i + 20]
            await store.append(batch_ref, chunk, seq)
            seq += len(chunk)

    async def raw_batches() -> None:
        docs = raw_docs("batch", pendings(events))
        for i in range(0, events, 20):
            await raw.insert_many(docs[i : i + 20])

    raw_t = await timed("raw insert_many(20)", raw_batches)
    store_t = await timed("store.append (20 per call)", store_batches)
    print(f"  ratio store/raw: {store_t / raw_t:.2f}x  ({events / store_t:,.0f} events/s)")

    chats = 50
    print(
        f"append {events} events from {chats} chats at once, one per call (each chat's appender waits for its last)"
    )

    async def store_concurrent() -> None:
        async def chat(k: int) -> None:
            stream = StreamRef(chat_id=f"many-{k}", app_id="bench", user_id="u", workflow="W")
            for seq, p in enumerate(pendings(events // chats)):
                await store.append(stream, [p], seq)

        await asyncio.gather(*map(chat, range(chats)))

    async def raw_concurrent() -> None:
        async def chat(k: int) -> None:
            for doc in raw_docs(f"many-{k}", pendings(events // chats)):
                await raw.insert_one(doc)

        await asyncio.gather(*map(chat, range(chats)))

    inserts = store.commit.inserts
    raw_t = await timed(f"raw insert_one, {chats} at once", raw_concurrent)
    store_t = await timed(f"store.append, {chats} at once (group commit)", store_concurrent)
    print(
        f"  ratio store/raw: {store_t / raw_t:.2f}x  ({events / store_t:,.0f} events/s,"
        f" {events / (store.commit.inserts - inserts):.1f} records per insert)"
    )

    print(f"read {read_count} events of one chat")
    read_ref = StreamRef(chat_id="read", app_id="bench", user_id="u", workflow="W")
    items = pendings(read_count)
    for i in range(0, read_count, 500):
        await store.append(read_ref, items[i : i + 500], i)

    async def raw_find() -> None:
        got = [doc async for doc in store.events.find({"chat_id": "read"}, sort=[("seq", 1)])]
        assert len(got) == read_count

    async def store_read() -> None:
        got = [record async for record in store.read("read")]
        assert len(got) == read_count

    raw_t = await timed("raw find (dicts)", raw_find)
    store_t = await timed("store.read (decoded, validated records)", store_read)
    print(f"  ratio store/raw: {store_t / raw_t:.2f}x")
    await client.drop_database(db.name)
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--read", type=int, default=10_000)
    args = parser.parse_args()
    with benchmark_mongo_uri() as uri:
        asyncio.run(bench(uri, args.events, args.read))


if __name__ == "__main__":
    main()
