"""Benchmark: WebSocket streaming latency and reconnect replay, measured in one run.

    nice .venv/bin/python tests/benchmarks/bench_stream.py [--events 200] [--replay 10000]

One runtime node (uvicorn, in this process) on the embedded server (or MOZAIKS_TEST_MONGO_URI).
The clients and the appender run in a second process, so server and clients have a core each.
Prints append -> client-receive latency p50/p99 with 1, 100 and 500 clients on one chat and with
500 chats x 2 clients, each beside the same clients fed by a bare broadcast endpoint (a minimal
ASGI WebSocket app on the same uvicorn settings that tails the same change stream and sends each
insert as one pre-encoded frame to every socket of its chat): ours ÷ bare. Then the time a
reconnecting client takes to reach `replay.done` over 10,000 missed events vs a raw `find` of the
same events (ratio).
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

import msgspec
from pymongo import AsyncMongoClient

from app.settings import Settings
from domain.events import MessageAgent, Pending, StreamRef
from domain.store import MongoEventStore
from tests.nodes import Node, benchmark_mongo_uri

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def stream(chat_id: str) -> StreamRef:
    return StreamRef(chat_id=chat_id, app_id="local", user_id="local", workflow="Analyzer")


async def clients_measure(
    uri: str, db_name: str, ws_url: str, chats: int, per_chat: int, events: int
) -> list[float]:
    """Connect `per_chat` sockets to each of `chats` fresh chats, append at least `events` events
    (round-robin over the chats, one at a time), return every delivery's latency (ms)."""
    from websockets.asyncio.client import connect

    mongo: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
    store = MongoEventStore(mongo[db_name])
    chat_ids = [uuid.uuid4().hex for _ in range(chats)]
    for chat_id in chat_ids:
        await store.append(stream(chat_id), [Pending(event=MessageAgent(content="0"), agent="Analyst")], 0)
    rounds = max(1, -(-events // chats))
    sockets = []
    for chat_id in chat_ids:
        for _ in range(per_chat):
            ws = await connect(f"{ws_url}/ws/chats/{chat_id}?after=1", max_size=None)
            sockets.append(ws)
    for ws in sockets:  # wait for each client's replay.done: everything after is live
        while json.loads(await ws.recv())["type"] != "replay.done":
            pass
    latencies: list[float] = []
    last = 1 + rounds

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
    for _ in range(rounds):
        for chat_id in chat_ids:
            event = MessageAgent(content=repr(time.time()))
            await store.append(stream(chat_id), [Pending(event=event, agent="Analyst")], None)
            await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*consumers), 600)
    for ws in sockets:
        await ws.close()
    await mongo.close()
    return latencies


class BareBroadcast:
    """The baseline: a minimal ASGI WebSocket app. One change stream; each insert encoded once and
    sent as it is to every socket of its chat; no replay, no queues, no auth."""

    def __init__(self, uri: str, db_name: str) -> None:
        self.uri = uri
        self.db_name = db_name
        self.sockets: dict[str, set[Any]] = {}
        self.listening = asyncio.Event()

    async def tail(self) -> None:
        mongo: AsyncMongoClient[Any] = AsyncMongoClient(self.uri, tz_aware=True)
        encode = msgspec.json.Encoder().encode
        try:
            async with await mongo[self.db_name]["events"].watch(
                [{"$match": {"operationType": "insert"}}]
            ) as changes:
                self.listening.set()
                async for change in changes:
                    doc = change["fullDocument"]
                    targets = self.sockets.get(doc["chat_id"])
                    if targets:
                        frame = encode(
                            {
                                "type": "event",
                                "seq": doc["seq"],
                                "event": {"type": doc["type"], "data": doc["data"]},
                            }
                        )
                        message = {"type": "websocket.send", "bytes": None, "text": frame.decode()}
                        for send in list(targets):
                            await send(message)
        finally:
            await mongo.close()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            tailing = asyncio.create_task(self.tail())
            await self.listening.wait()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            tailing.cancel()
            await asyncio.gather(tailing, return_exceptions=True)
            await send({"type": "lifespan.shutdown.complete"})
            return
        chat_id = scope["path"].rstrip("/").split("/")[-1]
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": '{"type":"replay.done","last_seq":1}'})
        self.sockets.setdefault(chat_id, set()).add(send)
        try:
            while (await receive())["type"] != "websocket.disconnect":
                pass
        finally:
            self.sockets[chat_id].discard(send)


class BareNode(Node):
    """The bare broadcast app served exactly as a runtime node is (same uvicorn settings)."""

    def __init__(self, settings: Settings, app: BareBroadcast) -> None:
        super().__init__(settings)
        self.server.config.app = app
        self.server.config.loaded = False


def client_process(
    uri: str, db_name: str, ws_url: str, chats: int, per_chat: int, events: int, out: Any
) -> None:
    out.put(asyncio.run(clients_measure(uri, db_name, ws_url, chats, per_chat, events)))


async def latencies_of(
    uri: str, db_name: str, ws_url: str, chats: int, per_chat: int, events: int
) -> list[float]:
    """Run the clients in another process against `ws_url`; their latencies, sorted."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(
        target=client_process, args=(uri, db_name, ws_url, chats, per_chat, events, out)
    )
    process.start()
    while process.is_alive() and out.empty():
        await asyncio.sleep(0.1)
    latencies = sorted(out.get())
    process.join()
    return latencies


def percentiles(latencies: list[float]) -> tuple[float, float]:
    return statistics.median(latencies), latencies[max(int(len(latencies) * 0.99) - 1, 0)]


SCENARIOS = ((1, 1), (1, 100), (1, 500), (500, 2))  # (chats, clients per chat)


async def replay_measure(node: Node, store: MongoEventStore, count: int) -> tuple[float, float]:
    from websockets.asyncio.client import connect

    chat_id = uuid.uuid4().hex
    items = [
        Pending(event=MessageAgent(content=f"m{i} " + "lorem ipsum " * 8), agent="Analyst")
        for i in range(count)
    ]
    for i in range(0, count, 500):
        await store.append(stream(chat_id), items[i : i + 500], i)
    await node.runtime.projections.wait_caught_up(
        600
    )  # measure the replay, not the node digesting the appends
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
    print(
        f"append -> receive latency, events appended 10 ms apart (at least {events}, and one per chat), clients in another process"
    )
    bare_node = await BareNode(settings, BareBroadcast(uri, db_name)).start()
    bare: dict[tuple[int, int], tuple[float, float]] = {}
    try:
        for chats, per_chat in SCENARIOS:
            bare[chats, per_chat] = percentiles(
                await latencies_of(uri, db_name, bare_node.ws_url, chats, per_chat, events)
            )
    finally:
        await bare_node.stop()
    node = await Node(settings).start()
    try:
        for chats, per_chat in SCENARIOS:
            latencies = await latencies_of(uri, db_name, node.ws_url, chats, per_chat, events)
            (p50, p99), (bare50, bare99) = percentiles(latencies), bare[chats, per_chat]
            print(
                f"  {chats:>3} chat(s) x {per_chat:>3} clients: p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"
                f"   bare p50 {bare50:7.1f} ms  p99 {bare99:7.1f} ms   ours/bare p50 {p50 / bare50:5.2f}x  p99 {p99 / bare99:5.2f}x"
                f"   ({len(latencies)} deliveries)",
                flush=True,
            )
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
