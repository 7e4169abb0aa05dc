"""Benchmark: what handing a task to a child workflow costs, against running that workflow's chat directly.

    .venv/bin/python tests/benchmarks/bench_children.py [--chats 20] [--rounds 3]

One node (offline fixtures, the test workflows of tests/child_workflows) on a durable embedded
server. Per round: `--chats` Helper chats started at once (the baseline: one agent, one model
call), then as many Delegator chats (a Lead whose tool runs a Helper child: two chats, three
model calls), each measured from `POST /api/chats` until its run's terminal record is in the
log. Prints the median per-chat latency and the whole batch's wall time of each, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx

from app.settings import Settings
from domain.events import TERMINAL_TYPES
from tests.nodes import Node, benchmark_mongo_uri

WORKFLOWS = Path(__file__).resolve().parents[1] / "child_workflows"


async def one_chat(http: httpx.AsyncClient, node: Node, workflow: str) -> float:
    start = time.perf_counter()
    created = await http.post("/api/chats", json={"workflow": workflow, "message": "2+2?"})
    chat_id = created.json()["chat_id"]
    store = node.runtime.store
    async with asyncio.timeout(120):
        while True:
            async for _ in store.find(chat_id, types=sorted(TERMINAL_TYPES)):
                return time.perf_counter() - start
            await asyncio.sleep(0.005)


async def batch(http: httpx.AsyncClient, node: Node, workflow: str, chats: int) -> tuple[float, float]:
    start = time.perf_counter()
    latencies = await asyncio.gather(*(one_chat(http, node, workflow) for _ in range(chats)))
    return statistics.median(latencies), time.perf_counter() - start


async def main(chats: int, rounds: int) -> None:
    with benchmark_mongo_uri() as uri:
        settings: Any = Settings(
            database_uri=uri,
            db_name="bench_children",
            workflows_path=WORKFLOWS,
            offline_chunk_ms=0.0,
            max_active_runs=4 * chats,
            chat_starts_per_minute=100_000,
        )
        node = await Node(settings).start()
        try:
            async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
                await batch(http, node, "Delegator", 2)  # warm up: imports, first AG2 build
                figures: dict[str, list[tuple[float, float]]] = {"Helper": [], "Delegator": []}
                for _ in range(rounds):
                    for workflow in figures:
                        figures[workflow].append(await batch(http, node, workflow, chats))
        finally:
            await node.stop()
    median = {w: statistics.median(f[0] for f in fs) for w, fs in figures.items()}
    wall = {w: statistics.median(f[1] for f in fs) for w, fs in figures.items()}
    for workflow in figures:
        print(
            f"{workflow:10s} {chats} chats at once: median latency {median[workflow] * 1000:7.1f} ms, "
            f"batch {wall[workflow] * 1000:7.1f} ms"
        )
    print(
        f"Delegator/Helper: latency {median['Delegator'] / median['Helper']:.2f}x, "
        f"batch {wall['Delegator'] / wall['Helper']:.2f}x (a Delegator chat is 2 chats and 3 model calls)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.chats, args.rounds))
