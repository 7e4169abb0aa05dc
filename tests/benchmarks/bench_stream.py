"""Benchmark: WebSocket streaming latency and reconnect replay, measured in one run.

    .venv/bin/python tests/benchmarks/bench_stream.py [--events 200] [--replay 10000]

One runtime node (uvicorn, in this process) on the embedded server (or MOZAIKS_TEST_MONGO_URI).
The clients and the appender run in a second process, so server and clients have a core each.
Prints append -> client-receive latency p50/p99 with 1, 100 and 500 clients on one chat, and the
time a reconnecting client takes to reach `replay.done` over 10,000 missed events vs a raw `find`
of the same events (ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pymongo import AsyncMongoClient

from app.settings import Settings
from domain.events import MessageAgent, Pending, StreamRef
from domain.store import MongoEventStore
from tests.nodes import Node, benchmark_mongo_uri

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def stream(chat_id: str) -> StreamRef:
    return StreamRef(chat_id=chat_id, app_id="local", user_id="local", workflow="Analyzer")


async def clients_measure(uri: str, db_name: str, ws_url: str, clients: int, events: int) -> list[float]:
    """Connect `clients` sockets to a fresh chat, append `events` one by one, return latencies (ms)."""
    from websockets.asyncio.client import connect

    mongo: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
    store = MongoEventStore(mongo[db_name])
    chat_id = uuid.uuid4().hex
    await store.append(stream(chat_id), [Pending(event=MessageAgent(content="0"), agent="Analyst")], 0)
    sockets = []
    for _ in range(clients):
        ws = await connect(f"{ws_url}/ws/chats/{chat_id}?after=1", max_size=None)
        sockets.append(ws)
    for ws in sockets:  # wait for each client's replay.done: everything after is live
        while json.loads(await ws.recv())["type"] != "replay.done":
            pass
    latencies: list[float] = []
    last = 1 + events

    async def consume(ws: Any) -> None:
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "heartbeat":
                await ws.send('{"type":"pong"}')
                continue
            if frame["type"] == "event":
                latencies.append((time.time() - float(frame["event"]["data"]["content"])) * 1000)
                if frame["seq"] == last:
                    return

    consumers = [asyncio.create_task(consume(ws)) for ws in sockets]
    for _ in range(events):
        await store.append(stream(chat_id), [Pending(event=MessageAgent(content=repr(time.time())), agent="Analyst")], None)
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*consumers), 300)
    for ws in sockets:
        await ws.close()
    await mongo.close()
    return latencies


def client_process(uri: str, db_name: str, ws_url: str, clients: int, events: int, out: Any) -> None:
    out.put(asyncio.run(clients_measure(uri, db_name, ws_url, clients, events)))


async def replay_measure(node: Node, store: MongoEventStore, count: int) -> tuple[float, float]:
    from websockets.asyncio.client import connect

    chat_id = uuid.uuid4().hex
    items = [Pending(event=MessageAgent(content=f"m{i} " + "lorem ipsum " * 8), agent="Analyst") for i in range(count)]
    for i in range(0, count, 500):
        await store.append(stream(chat_id), items[i : i + 500], i)
    await node.runtime.projections.wait_caught_up(600)  # measure the replay, not the node digesting the appends
    start = time.perf_counter()
    docs = [doc async for doc in store.events.find({"chat_id": chat_id}, sort=[("seq", 1)])]
    raw = time.perf_counter() - start
    assert len(docs) == count
    start = time.perf_counter()
    async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0", max_size=None) as ws:
        received = 0
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "event":
                received += 1
            elif frame["type"] == "replay.done":
                break
    replay = time.perf_counter() - start
    assert received == count
    return raw, replay


async def bench(uri: str, events: int, replay_count: int) -> None:
    db_name = f"bench_stream_{os.getpid()}"
    settings = Settings(database_uri=uri, db_name=db_name, workflows_path=WORKFLOWS, ws_queue_max=10_000)
    node = await Node(settings).start()
    try:
        print(f"append -> receive latency, {events} events appended 10 ms apart, clients in another process")
        context = multiprocessing.get_context("spawn")
        for clients in (1, 100, 500):
            out = context.Queue()
            process = context.Process(target=client_process, args=(uri, db_name, node.ws_url, clients, events, out))
            process.start()
            while process.is_alive() and out.empty():
                await asyncio.sleep(0.1)
            latencies = sorted(out.get())
            process.join()
            p50 = statistics.median(latencies)
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            print(f"  {clients:>4} clients: p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   ({len(latencies)} deliveries)")
        print(f"reconnect replay of {replay_count} missed events")
        raw, replay = await replay_measure(node, node.runtime.store, replay_count)
        print(f"  raw find of the same events      {raw * 1000:8.1f} ms")
        print(f"  WebSocket replay to replay.done  {replay * 1000:8.1f} ms")
        print(f"  ratio replay/raw: {replay / raw:.2f}x")
    finally:
        await node.stop()
        client: AsyncMongoClient[Any] = AsyncMongoClient(uri)
        await client.drop_database(db_name)
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--replay", type=int, default=10_000)
    args = parser.parse_args()
    from app.logging import configure_logging

    configure_logging("WARNING")
    with benchmark_mongo_uri() as uri:
        asyncio.run(bench(uri, args.events, args.replay))


if __name__ == "__main__":
    main()
