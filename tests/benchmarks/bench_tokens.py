"""Benchmark: streamed tokens, from the model server to the log and on to the WebSocket clients.

    .venv/bin/python tests/benchmarks/bench_tokens.py [--tokens 400] [--chats 20] [--streams 1,50]

A zero-latency OpenAI-compatible server (tests/llm_server.py) streams each answer as `--tokens`
chunks of one token each, through the real `openai` SDK, on the embedded server (or
MOZAIKS_TEST_MONGO_URI) with the default 50 ms flush window. Prints:
1. recorded tokens/s of `--chats` concurrent one-agent runs with streaming on vs off (the same
   backend asking for one non-streamed completion): ratio, and `message.delta` records per 1,000 tokens;
2. chunk emitted (written by the model server) → client received (the delta frame holding it)
   latency p50/p99 with 1 and 50 concurrent streams, each watched by its own WebSocket client. The
   node runs in this process, the model server and the clients in another, a core each; every
   stream starts once every client has its `replay.done`, so all of it is live.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from openai.types.chat import ChatCompletion
from pymongo import AsyncMongoClient

from app.runs.clients import OpenAIBackend, TextStream
from app.runs.orchestrator import Orchestrator
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.store import MongoEventStore
from tests.llm_server import Reply, StreamingModel, solo_workflow
from tests.nodes import Node, benchmark_mongo_uri

FLUSH_MS = 50.0  # the default window; `--flush-ms` sets another
# Per delta frame: the record's `ts` (append time) -> received, in ms (clients' process only).
SPLIT: list[float] = []


def answer(tokens: int) -> Reply:
    return Reply(chunks=[f"tok{i} " for i in range(tokens)], completion_tokens=tokens)


class NonStreamingBackend(OpenAIBackend):
    """The baseline: the same SDK client asking for one whole completion (no stream)."""

    def complete(
        self, agent: str, params: dict[str, Any], stream: TextStream | None = None
    ) -> ChatCompletion:
        kwargs = {
            k: v for k, v in params.items() if k in {"model", "messages", "temperature"} and v is not None
        }
        return self.client.chat.completions.create(**kwargs)


async def throughput(
    uri: str, db_name: str, workflows: Path, chats: int, tokens: int, streaming: bool
) -> tuple[float, int, int]:
    """Run `chats` chats at once; returns (recorded completion tokens/s, tokens, delta records)."""
    model = StreamingModel([answer(tokens)])
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
    try:
        store = MongoEventStore(mongo[db_name])
        await store.ensure_indexes()
        settings = Settings(
            openai_api_key="sk-bench",
            openai_base_url=model.base_url,
            workflows_path=workflows,
            stream_flush_ms=FLUSH_MS,
        )
        orchestrator = Orchestrator(store, WorkflowManager(workflows), settings)
        if not streaming:
            orchestrator._openai = NonStreamingBackend(api_key="sk-bench", base_url=model.base_url)
        streams = [
            await orchestrator.create_chat(workflow="Solo", user_id="u", app_id="a", message=f"go {k}")
            for k in range(chats)
        ]
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(orchestrator.run(stream) for stream in streams))
        elapsed = time.perf_counter() - start
        assert set(outcomes) == {"run.completed"}, outcomes
        reports = [orchestrator.reports[r] for r in list(orchestrator.reports)[-chats:]]
        total = sum(r.completion_tokens for r in reports)
        return total / elapsed, total, sum(r.deltas for r in reports)
    finally:
        await mongo.close()
        model.close()


# ---- latency: model server and clients in a second process ---------------------------------------


async def watch(url: str, chat_id: str, ready: asyncio.Event, got: list[tuple[float, int]]) -> None:
    """One client: (receive time, text length so far) for every delta frame, until the run ends."""
    from websockets.asyncio.client import connect

    length = 0
    async with connect(f"{url}/ws/chats/{chat_id}?after=0", max_size=None) as ws:
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "replay.done":
                ready.set()
            elif frame["type"] == "event":
                event = frame["event"]
                if event["type"] == "message.delta":
                    length += len(event["data"]["text"])
                    got.append((time.monotonic(), length))
                    recorded = datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()
                    SPLIT.append((time.time() - recorded) * 1000)
                elif event["type"] in ("run.completed", "run.failed"):
                    return


async def stream_latencies(
    http_url: str, ws_url: str, model: StreamingModel, go: threading.Event, streams: int, reply: Reply
) -> list[float]:
    import httpx

    go.clear()
    first = len(model.requests)
    async with httpx.AsyncClient(base_url=http_url, timeout=60) as http:
        chat_ids = []
        for k in range(streams):
            response = await http.post("/api/chats", json={"workflow": "Solo", "message": f"stream {k}"})
            chat_ids.append(str(response.json()["chat_id"]))
    readies = [asyncio.Event() for _ in chat_ids]
    received: list[list[tuple[float, int]]] = [[] for _ in chat_ids]
    watchers = [
        asyncio.create_task(watch(ws_url, c, r, g))
        for c, r, g in zip(chat_ids, readies, received, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
    go.set()  # every stream starts now, with every client live
    await asyncio.wait_for(asyncio.gather(*watchers), 600)
    # Where the time goes: the node reading the stream (its llm.call's stream_ms) vs the server writing it.
    async with httpx.AsyncClient(base_url=http_url, timeout=60) as http:
        calls = [
            (await http.get(f"/api/chats/{c}/events", params={"type": "llm.call"})).json()["events"][0][
                "data"
            ]
            for c in chat_ids
        ]
    sent = sorted(t for (n, _), t in model.sent_at.items() if n >= first)
    print(
        f"    server wrote all chunks in {(sent[-1] - sent[0]) * 1000:.1f} ms; the node read each stream in "
        f"{statistics.median(c['stream_ms'] for c in calls):.1f} ms (median)",
        flush=True,
    )
    ends = list(itertools.accumulate(len(c) for c in reply.chunks))
    latencies: list[float] = []
    for number in range(first, len(model.requests)):
        text = model.requests[number]["messages"][-1]["content"]
        k = int(str(text).rsplit(" ", 1)[1])
        frames = iter(received[k])
        at, length = next(frames)
        for index, end in enumerate(ends):
            while length < end:
                at, length = next(frames)
            latencies.append((at - model.sent_at[(number, index)]) * 1000)
    return latencies


def latency_process(tokens: int, counts: list[int], pace_ms: float, pipe: Any) -> None:
    go = threading.Event()
    reply = answer(tokens)

    def before_chunk(_number: int, index: int) -> None:
        if index == 0:
            go.wait()
        elif pace_ms > 0:
            time.sleep(pace_ms / 1000)  # a model writing at a pace (the benchmark's option, not a test)

    model = StreamingModel([reply], before_chunk=before_chunk)
    pipe.send(model.base_url)
    http_url, ws_url = pipe.recv()
    for streams in counts:
        SPLIT.clear()
        result = asyncio.run(stream_latencies(http_url, ws_url, model, go, streams, reply))
        if SPLIT:
            print(
                f"    delta recorded -> received: p50 {statistics.median(SPLIT):.1f} ms, max {max(SPLIT):.1f} ms",
                flush=True,
            )
        pipe.send((streams, result))
    model.close()


async def bench(
    uri: str, tokens: int, chats: int, counts: list[int], pace_ms: float, throughput_too: bool = True
) -> None:
    # Wide enough for 50 model calls in flight (AG2 runs each in the loop's default executor).
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=max(counts) + 16))
    db_name = f"bench_tokens_{os.getpid()}"
    with tempfile.TemporaryDirectory() as folder:
        workflows = solo_workflow(Path(folder))
        if throughput_too:
            print(
                f"recorded tokens/s, {chats} concurrent chats, one {tokens}-token answer each, "
                f"flush window {FLUSH_MS:g} ms"
            )
            off, total_off, _ = await throughput(uri, db_name, workflows, chats, tokens, streaming=False)
            on, total_on, deltas = await throughput(uri, db_name, workflows, chats, tokens, streaming=True)
            print(f"  streaming off {off:9.0f} tokens/s  ({total_off} tokens)")
            print(f"  streaming on  {on:9.0f} tokens/s  ({total_on} tokens, {deltas} message.delta records)")
            print(
                f"  ratio on/off: {on / off:.2f}x   records per 1,000 tokens: {deltas * 1000 / total_on:.1f}"
            )

        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=latency_process, args=(tokens, counts, pace_ms, child))
        process.start()
        base_url = await asyncio.to_thread(parent.recv)
        settings = Settings(
            database_uri=uri,
            db_name=db_name,
            workflows_path=workflows,
            openai_api_key="sk-bench",
            openai_base_url=base_url,
            stream_flush_ms=FLUSH_MS,
            ws_queue_max=100_000,
            chat_starts_per_minute=10_000,
        )
        node = await Node(settings).start()
        try:
            parent.send((node.url, node.ws_url))
            print(
                f"chunk emitted -> client received, {tokens} chunks per stream, {pace_ms:g} ms apart "
                f"(goal p99 <= {FLUSH_MS + 30:g} ms at 50)"
            )
            for _ in counts:
                streams, latencies = await asyncio.to_thread(parent.recv)
                latencies.sort()
                p50 = statistics.median(latencies)
                p99 = latencies[max(int(len(latencies) * 0.99) - 1, 0)]
                print(
                    f"  {streams:>3} streams: p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   ({len(latencies)} chunks)"
                )
        finally:
            process.join(timeout=60)
            await node.stop()
            client: AsyncMongoClient[Any] = AsyncMongoClient(uri)
            await client.drop_database(db_name)
            await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--chats", type=int, default=20)
    parser.add_argument("--streams", default="1,50")
    parser.add_argument(
        "--pace-ms", type=float, default=0.0, help="server pause between chunks (0: zero latency)"
    )
    parser.add_argument(
        "--latency-only", action="store_true", help="skip the tokens/s comparison (delta latency only)"
    )
    parser.add_argument("--flush-ms", type=float, default=FLUSH_MS, help="MOZAIKS_STREAM_FLUSH_MS")
    args = parser.parse_args()
    globals()["FLUSH_MS"] = args.flush_ms
    from app.logging import configure_logging

    configure_logging("WARNING")
    with benchmark_mongo_uri() as uri:
        asyncio.run(
            bench(
                uri,
                args.tokens,
                args.chats,
                [int(n) for n in args.streams.split(",")],
                args.pace_ms,
                throughput_too=not args.latency_only,
            )
        )


if __name__ == "__main__":
    main()
