"""Benchmark: uploads and forks against their raw baselines on the same server, in the same run (ratios).

    .venv/bin/python tests/benchmarks/bench_lineage.py [--mb 8] [--rounds 3] [--messages 200]

Uses MOZAIKS_TEST_MONGO_URI if set, else starts the embedded server (the log journaled per write: `j: true`).
Prints, each as a ratio to its baseline (medians of `rounds`):
- `FileStore.put` of an `mb` MB file (temporary name, sha256 while writing, rename, dedup check) vs
  a raw `AsyncGridFSBucket.upload_from_stream` of the same bytes;
- reading it back (`FileStore.chunks_of`) vs a raw `open_download_stream(...).read()`;
- `fork_chat` of a chat of `messages` messages at its last one vs `store.read` of the parent plus
  `store.append` of as many records into a new chat (the same work, done by hand);
- `verify` of the fork (its chain plus the parent's up to the anchor) vs the parent's own verify.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gridfs import AsyncGridFSBucket
from pymongo import AsyncMongoClient

from app.runs.lineage import fork_chat
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.chain import ChainCheck
from domain.events import ChatCreated, MessageAgent, MessageUser, Pending, StreamRef, new_id
from domain.files import FileStore
from domain.lineage import with_anchor
from domain.store import MongoEventStore
from tests.nodes import benchmark_mongo_uri

ROOT = Path(__file__).resolve().parents[2]


async def median_s(rounds: int, fn: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def line(label: str, ours: float, base: float) -> None:
    print(f"  {label:<58} {ours * 1000:9.1f} ms vs {base * 1000:9.1f} ms  = {ours / base:5.2f}x")


async def bench(uri: str, mb: float, rounds: int, messages: int) -> None:
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
    db = client[f"bench_lineage_{os.getpid()}"]
    try:
        files = FileStore(db)
        raw = AsyncGridFSBucket(db, bucket_name="raw")
        payload = os.urandom(int(mb * 1024 * 1024))
        print(f"uploads of {mb} MB, medians of {rounds}")

        async def ours_put() -> None:
            data = bytearray(payload)
            data[:8] = os.urandom(8)  # a new file each time: no dedup shortcut
            view = memoryview(bytes(data))
            offset = 0

            async def read(n: int) -> bytes:
                nonlocal offset
                chunk = bytes(view[offset : offset + n])
                offset += len(chunk)
                return chunk

            await files.put(read, max_bytes=len(payload) + 1)

        async def raw_put() -> None:
            await raw.upload_from_stream(new_id(), payload)

        line(
            "FileStore.put vs upload_from_stream",
            await median_s(rounds, ours_put),
            await median_s(rounds, raw_put),
        )
        first = await files.files.find_one({})
        assert first is not None
        sha = str(first["filename"])
        raw_id = (await db["raw.files"].find_one({}) or {})["_id"]

        async def ours_get() -> None:
            async for _ in files.chunks_of(sha):
                pass

        async def raw_get() -> None:
            stream = await raw.open_download_stream(raw_id)
            await stream.read()

        line(
            "FileStore.chunks_of vs open_download_stream().read()",
            await median_s(rounds, ours_get),
            await median_s(rounds, raw_get),
        )

        store = MongoEventStore(db)
        await store.ensure_indexes()
        parent = StreamRef(chat_id="parent", app_id="b", user_id="u", workflow="Assistant")
        await store.append(parent, [Pending(event=ChatCreated())], 0)
        burst = []
        for i in range(messages // 2):
            burst.append(Pending(event=MessageUser(content=f"question {i} " + "lorem " * 20)))
            burst.append(
                Pending(event=MessageAgent(content=f"answer {i} " + "ipsum " * 60), agent="Concierge")
            )
        await store.append(parent, burst, None)
        last = await store.last_seq("parent")
        workflows = WorkflowManager(ROOT / "workflows")
        settings = Settings()
        print(f"a fork of a chat of {messages} messages, at its last one, medians of {rounds}")
        forks: list[str] = []

        async def ours_fork() -> None:
            stream, _ = await fork_chat(store, workflows, settings, parent, last)
            forks.append(stream.chat_id)

        async def by_hand() -> None:
            records = [r async for r in store.read("parent")]
            copy = StreamRef(chat_id=new_id(), app_id="b", user_id="u", workflow="Assistant")
            pendings = [Pending(event=r.event, agent=r.agent) for r in records]
            await store.append(copy, pendings, 0)

        line(
            "fork_chat vs read + append by hand",
            await median_s(rounds, ours_fork),
            await median_s(rounds, by_hand),
        )

        async def verify_fork() -> None:
            await with_anchor(store.events, await store.verify(forks[0], ChainCheck(forks[0])))

        async def verify_parent() -> None:
            await store.verify("parent", ChainCheck("parent"))

        line(
            "verify of the fork (with its anchor) vs of the parent",
            await median_s(rounds, verify_fork),
            await median_s(rounds, verify_parent),
        )
    finally:
        await client.drop_database(db.name)
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    with benchmark_mongo_uri() as uri:
        asyncio.run(bench(uri, args.mb, args.rounds, args.messages))


if __name__ == "__main__":
    main()
