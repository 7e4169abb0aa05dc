"""Benchmark: many chats each waiting on a form, then answered.

    nice .venv/bin/python tests/benchmarks/bench_ui_wait.py [--chats 1000] [--answers 100] [--idle-s 10]

One runtime node (uvicorn, in this process, offline fixtures) runs a one-agent workflow whose agent
calls a form UI tool first. `--chats` chats are started (50 at a time) and each waits on its form:
its run ends `run.suspended` (no task, lease or AG2 object left), so waiting is a state in the log.
Printed, each against a baseline of the same run:
- RSS of the node with every chat waiting ÷ before (and the growth in MB; goal ≤ 50 MB);
- the node's CPU over `--idle-s` seconds while they all wait, as a share of one core, beside the
  same measure with no chat waiting (goal: idle);
- answer latency: `ui.responded` → the agent's next record (the continuing run's first record of the
  agent, past its `tool.result` and `run.started`: AG2 rebuilt and the agent on its way), from the
  records' own server timestamps, p50 / p99 over `--answers` answers sent one by one (goal p50 ≤
  200 ms, p99 ≤ 1 s), and the same with a single waiting chat as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
from pymongo import AsyncMongoClient

from app.settings import Settings
from tests.nodes import Node, NodeStuck, benchmark_mongo_uri

FORM = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "team_size": {"type": "integer", "minimum": 1}},
    "required": ["name", "team_size"],
}


def form_workflow(root: Path) -> Path:
    folder = root / "workflows" / "Waiter"
    (folder / "fixtures").mkdir(parents=True)
    (folder / "workflow.json").write_text(
        json.dumps({"name": "Waiter", "visual_agents": ["Waiter"], "entry_agent": "Waiter", "max_turns": 6})
    )
    agent = {"name": "Waiter", "tools": ["ask"], "handoffs": {"after_work": "terminate"}}
    (folder / "agents.json").write_text(json.dumps({"agents": [agent]}))
    (folder / "tools.json").write_text(json.dumps({"tools": [{"name": "ask", "ui": {"component": "form"}}]}))
    script = [
        {"tool_calls": [{"name": "ask", "arguments": {"title": "Team", "schema": FORM}}]},
        {"content": "Thanks."},
    ]
    (folder / "fixtures" / "Waiter.json").write_text(json.dumps(script))
    return folder.parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(max(int(len(ordered) * q + 0.5) - 1, 0), len(ordered) - 1)]


async def idle_cpu(seconds: float) -> float:
    """The node's CPU over `seconds` of waiting, as a share of one core."""
    before, begin = cpu_s(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (cpu_s() - before) / (time.perf_counter() - begin)


async def start_waiting(node: Node, http: httpx.AsyncClient, count: int) -> list[str]:
    """Start `count` chats (50 at a time) and return their ids once each waits on its form (suspended)."""
    chats: list[str] = []
    for first in range(0, count, 50):
        started = await asyncio.gather(
            *(
                http.post("/api/chats", json={"workflow": "Waiter", "message": f"hello {i}"})
                for i in range(first, min(first + 50, count))
            )
        )
        assert all(r.status_code == 201 for r in started), [r.text for r in started if r.status_code != 201][
            :1
        ]
        chats += [r.json()["chat_id"] for r in started]
    events = node.runtime.store.events
    for _ in range(6000):
        waiting = await events.count_documents({"type": "run.suspended", "chat_id": {"$in": chats}})
        if waiting == len(chats):
            return chats
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {waiting} of {len(chats)} chats reached their form")


async def answer_latencies(node: Node, http: httpx.AsyncClient, chats: list[str]) -> list[float]:
    """Answer each chat's form in turn; ms from `ui.responded` to the agent's next record (server ts):
    the first record of the agent after the answer that is not the answer's `tool.result`."""
    events = node.runtime.store.events
    latencies: list[float] = []
    for chat_id in chats:
        asked = await events.find_one({"chat_id": chat_id, "type": "ui.requested"})
        assert asked is not None
        sent = await http.post(
            f"/api/chats/{chat_id}/ui/{asked['data']['request_id']}",
            json={"answer": {"name": "Ada", "team_size": 3}},
        )
        assert sent.status_code == 202, sent.text
        responded_seq = sent.json()["seq"]
        agent_next = {
            "chat_id": chat_id,
            "seq": {"$gt": responded_seq},
            "agent": "Waiter",
            "type": {"$ne": "tool.result"},
        }
        for _ in range(2000):
            nxt = await events.find_one(agent_next, sort=[("seq", 1)])
            if nxt is not None:
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError(f"chat {chat_id}: nothing after ui.responded")
        responded = await events.find_one({"chat_id": chat_id, "seq": responded_seq})
        assert responded is not None
        latencies.append((nxt["ts"] - responded["ts"]).total_seconds() * 1000)
    return latencies


def report(
    chats: int,
    started_s: float,
    rss_before: float,
    rss_waiting: float,
    cpu_before: float,
    cpu_waiting: float,
    latencies: list[float],
    base_latency: list[float],
) -> None:
    print(f"{chats} chats waiting on a form (started in {started_s:.1f} s)")
    print(
        f"RSS: {rss_before:.0f} MB before, {rss_waiting:.0f} MB waiting: +{rss_waiting - rss_before:.0f} MB "
        f"({(rss_waiting - rss_before) * 1024 / chats:.0f} KB per waiting chat; ÷ before {rss_waiting / rss_before:.2f}×)"
    )
    print(
        f"CPU while waiting: {cpu_waiting * 100:.1f} % of a core (nothing waiting: {cpu_before * 100:.1f} %)"
    )
    print(
        f"answer → next record: p50 {statistics.median(latencies):.0f} ms, p99 {pct(latencies, 0.99):.0f} ms "
        f"over {len(latencies)} answers (one waiting chat: {statistics.median(base_latency):.0f} ms)"
    )


async def bench(uri: str, chats: int, answers: int, idle_s: float) -> None:
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            database_uri=uri,
            db_name=f"bench_ui_wait_{os.getpid()}",
            workflows_path=form_workflow(Path(folder)),
            node_id="bench-ui",
            max_active_runs=chats + 100,
            chat_starts_per_minute=1_000_000,
        )
        node = await Node(settings).start()
        try:
            # No kept-alive connections: uvicorn closing an idle one as a request goes out fails it.
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=node.url, timeout=120, limits=limits) as http:
                # Warm up (imports, first runs), then the baselines with nothing waiting.
                one = await start_waiting(node, http, 1)
                base_latency = await answer_latencies(node, http, one)
                await asyncio.sleep(1)
                rss_before = rss_mb()
                cpu_before = await idle_cpu(idle_s)
                begin = time.perf_counter()
                waiting = await start_waiting(node, http, chats)
                started_s = time.perf_counter() - begin
                await asyncio.sleep(2)
                rss_waiting = rss_mb()
                cpu_waiting = await idle_cpu(idle_s)
                latencies = await answer_latencies(node, http, waiting[:answers])
            report(
                chats, started_s, rss_before, rss_waiting, cpu_before, cpu_waiting, latencies, base_latency
            )
        finally:
            with contextlib.suppress(NodeStuck):  # shutting hundreds of runs down can take a while
                await node.stop()
            client: AsyncMongoClient[Any] = AsyncMongoClient(uri)
            await client.drop_database(settings.db_name)
            await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, default=1000)
    parser.add_argument("--answers", type=int, default=100)
    parser.add_argument("--idle-s", type=float, default=10.0)
    args = parser.parse_args()
    with benchmark_mongo_uri() as uri:
        asyncio.run(bench(uri, args.chats, args.answers, args.idle_s))


if __name__ == "__main__":
    main()
