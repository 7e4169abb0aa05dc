"""Benchmark: many concurrent chats on one node against a model with a fixed latency.

    nice .venv/bin/python tests/benchmarks/bench_scale.py [--sizes 1,50,200,500] [--latency 1.0]

An OpenAI-compatible server answering every call after `--latency` seconds runs in ANOTHER process
and counts the calls it holds at once; the runtime node (uvicorn, in this process) calls it over
real HTTP through the real `openai` SDK. Each chat runs a three-agent RoundRobin workflow
(`--turns`, default 8: seven model calls in a row). For each size N, N chats are started together through `POST /api/chats`
and the benchmark waits for every run to end. Printed per N: wall time ÷ one chat's wall time,
peak model calls in flight (at the model server), API p99 during the load ÷ idle (`GET
/health/ready` and `GET /api/chats/{id}` probed every 50 ms), RSS per active run, CPU ms of this
process per recorded event; then per model call: the node's CPU, the database server's CPU (the
embedded server's process; not measured on MOZAIKS_TEST_MONGO_URI), the database operations by kind
(`serverStatus` opcounters, the benchmark's own probes included) and, in the same run, bare AG2's
CPU on the same chats (plain AG2 agents and its own OpenAI client, nothing recorded) against the
same model server. The machine may be shared: CPU figures are noisy, operation counts are not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from collections import Counter

import httpx
from pymongo import AsyncMongoClient, monitoring

from app.embedded import EmbeddedMongo
from app.settings import Settings
from tests.nodes import Node

AGENTS = ("Planner", "Writer", "Editor")


def model_server(port: int, latency: float, in_flight: Any, peak: Any, calls: Any, ready: Any) -> None:
    """Another process: an OpenAI-compatible server that answers every call after `latency` seconds."""
    from tests.llm_server import StreamingModel, text_reply

    def slow(_reply: int, index: int) -> None:
        if index != 0:
            return
        with in_flight.get_lock():
            in_flight.value += 1
            calls.value += 1
            peak.value = max(peak.value, in_flight.value)
        time.sleep(latency)
        with in_flight.get_lock():
            in_flight.value -= 1

    StreamingModel([text_reply("Noted; over to the next one.", 1)], before_chunk=slow, port=port)
    ready.set()
    while True:
        time.sleep(3600)


TURNS = 8  # the user's message, then 7 model calls (`--turns`)


def trio_workflow(root: Path) -> Path:
    folder = root / "workflows" / "Trio"
    folder.mkdir(parents=True)
    (folder / "workflow.json").write_text(
        json.dumps(
            {
                "name": "Trio",
                "orchestration_pattern": "RoundRobin",
                "max_turns": TURNS,
                "visual_agents": list(AGENTS),
                "entry_agent": AGENTS[0],
            }
        )
    )
    (folder / "agents.json").write_text(json.dumps({"agents": [{"name": name} for name in AGENTS]}))
    return folder.parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of another process (0 when there is none to read)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


OPS = ("insert", "query", "update", "delete", "getmore", "command")
STATEMENTS = {"insert": "documents", "update": "updates", "delete": "deletes"}


class CommandCounter(monitoring.CommandListener):
    """`--attribute`: the node's commands by (name, collection), counted by a PyMongo listener."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        # Write statements (documents inserted, updates, deletes) by the same key: one command of a
        # bulk write carries many, and the server does the work of each.
        self.statements: Counter[tuple[str, str]] = Counter()

    def started(self, event: Any) -> None:
        name = event.command_name
        target = event.command.get(name)
        if name == "getMore":
            target = event.command.get("collection")
        where = str(target) if isinstance(target, str) else "-"
        if name == "find":  # which query: the filter's fields (and a limit)
            shape = ",".join(sorted(event.command.get("filter", {})))
            where += f" {{{shape}}}" + (" limit" if event.command.get("limit") else "")
        self.counts[(name, where)] += 1
        batch = event.command.get(STATEMENTS.get(name, ""))
        self.statements[(name, where)] += len(batch) if isinstance(batch, list) else 1

    def succeeded(self, event: Any) -> None:
        pass

    def failed(self, event: Any) -> None:
        pass


async def record_types(node: Node) -> Counter[str]:
    """`--attribute`: how many records of each type the log holds (read after the load's count)."""
    events = node.runtime.store.events
    return Counter(
        {
            row["_id"]: row["n"]
            async for row in await events.aggregate([{"$group": {"_id": "$type", "n": {"$sum": 1}}}])
        }
    )


async def opcounters(client: AsyncMongoClient[Any]) -> dict[str, int]:
    status = await client.admin.command("serverStatus")
    counters = status.get("opcounters", {})
    return {kind: int(counters.get(kind, 0)) for kind in OPS}


async def bare_ag2(base_url: str, size: int) -> None:
    """`size` chats of the same RoundRobin trio on plain AG2 with its own OpenAI client, all at once."""
    from autogen import ConversableAgent, LLMConfig
    from autogen.agentchat import a_run_group_chat
    from autogen.agentchat.group.patterns import RoundRobinPattern

    # Streamed, as the node asks (the model server's latency and call count ride on the chunks).
    config = LLMConfig({"model": "gpt-4o-mini", "api_key": "sk-bench", "base_url": base_url, "stream": True})

    async def one(i: int) -> None:
        agents = [ConversableAgent(name, llm_config=config, human_input_mode="NEVER") for name in AGENTS]
        pattern = RoundRobinPattern(initial_agent=agents[0], agents=agents)
        response = await a_run_group_chat(pattern, f"topic {i}", max_rounds=TURNS)
        async for _ in response.events:
            pass

    with contextlib.redirect_stdout(io.StringIO()):  # AG2 prints every streamed chunk
        await asyncio.gather(*(one(i) for i in range(size)))


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(int(len(ordered) * 0.99) - 1, 0)]


async def probe(
    http: httpx.AsyncClient, chat_id: str, until: asyncio.Event, samples: list[float], rss: list[float]
) -> None:
    """Time `GET /health/ready` and `GET /api/chats/{id}` every 50 ms until `until` is set."""
    while not until.is_set():
        for path in ("/health/ready", f"/api/chats/{chat_id}"):
            begin = time.perf_counter()
            await http.get(path)
            samples.append((time.perf_counter() - begin) * 1000)
        rss.append(rss_mb())
        try:
            await asyncio.wait_for(until.wait(), 0.05)
        except TimeoutError:
            pass


async def load(node: Node, http: httpx.AsyncClient, size: int) -> tuple[float, int]:
    """Start `size` chats together; return the wall time until every run ended, and the records recorded."""
    begin = time.perf_counter()
    started = await asyncio.gather(
        *(http.post("/api/chats", json={"workflow": "Trio", "message": f"topic {i}"}) for i in range(size))
    )
    assert all(r.status_code == 201 for r in started), [r.text for r in started if r.status_code != 201][:1]
    runs = list(node.runtime.supervisor.tasks.values())
    outcomes = await asyncio.gather(*runs)
    wall = time.perf_counter() - begin
    assert set(outcomes) == {"run.completed"}, outcomes
    chats = [r.json()["chat_id"] for r in started]
    events = await node.runtime.store.events.count_documents({"chat_id": {"$in": chats}})
    return wall, events


COUNTER: CommandCounter | None = None


async def bench(uri: str, server_pid: int | None, sizes: list[int], latency: float) -> None:
    from app.embedded import free_port

    context = multiprocessing.get_context("spawn")
    in_flight, peak, calls = context.Value("i", 0), context.Value("i", 0), context.Value("i", 0)
    ready = context.Event()
    port = free_port()
    server = context.Process(
        target=model_server, args=(port, latency, in_flight, peak, calls, ready), daemon=True
    )
    admin: AsyncMongoClient[Any] = AsyncMongoClient(uri)
    server.start()
    db_name = f"bench_scale_{os.getpid()}"
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            database_uri=uri,
            db_name=db_name,
            workflows_path=trio_workflow(Path(folder)),
            openai_api_key="sk-bench",
            openai_base_url=f"http://127.0.0.1:{port}/v1",
            chat_starts_per_minute=1_000_000,
            max_active_runs=max(sizes) + 1,
        )
        assert await asyncio.to_thread(ready.wait, 60)
        node = await Node(settings).start()
        try:
            limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
            async with httpx.AsyncClient(base_url=node.url, timeout=600, limits=limits) as http:
                await node.runtime.projections.wait_caught_up(60)
                await load(node, http, 1)  # warm-up: imports, first connections
                await bare_ag2(f"http://127.0.0.1:{port}/v1", 1)
                probe_chat = (
                    await http.post("/api/chats", json={"workflow": "Trio", "message": "probe"})
                ).json()["chat_id"]
                await asyncio.gather(*node.runtime.supervisor.tasks.values())
                idle: list[float] = []
                stop = asyncio.Event()
                prober = asyncio.create_task(probe(http, probe_chat, stop, idle, []))
                await asyncio.sleep(3)
                stop.set()
                await prober
                print(
                    f"model latency {latency:g} s, {TURNS} turns per chat (RoundRobin of 3 agents), "
                    f"MOZAIKS_MAX_CONCURRENT_LLM_CALLS={settings.max_concurrent_llm_calls}"
                )
                print(
                    f"idle API: p50 {statistics.median(idle):.1f} ms, p99 {p99(idle):.1f} ms ({len(idle)} probes)"
                )
                print(
                    f"{'chats':>6} {'wall s':>8} {'÷ one':>6} {'peak in flight':>15} {'API p99 ms':>11} "
                    f"{'÷ idle':>7} {'RSS MB/run':>11} {'CPU ms/event':>13}"
                )
                one: float | None = None
                per_call: list[str] = []
                for size in sizes:
                    peak.value = 0
                    samples: list[float] = []
                    rss: list[float] = []
                    rss_before, cpu_before = rss_mb(), cpu_s()
                    db_before, ops_before, calls_before = (
                        process_cpu_s(server_pid),
                        await opcounters(admin),
                        calls.value,
                    )
                    applied_before = node.runtime.projections.applied
                    if COUNTER is not None:
                        COUNTER.counts.clear()
                        COUNTER.statements.clear()
                        types_before = await record_types(node)
                    stop = asyncio.Event()
                    prober = asyncio.create_task(probe(http, probe_chat, stop, samples, rss))
                    wall, events = await load(node, http, size)
                    stop.set()
                    await prober
                    # The projections' work for these chats counts too: wait until they applied every
                    # record (read off the runner, not asked of the database: no operations of its own).
                    runner = node.runtime.projections
                    async with asyncio.timeout(120):
                        while runner.applied < applied_before + events:
                            await asyncio.sleep(0.05)
                    cpu = cpu_s() - cpu_before
                    db_cpu = process_cpu_s(server_pid) - db_before
                    ops_after = await opcounters(admin)
                    n_calls = max(calls.value - calls_before, 1)
                    ops = {k: (ops_after[k] - ops_before[k]) / n_calls for k in OPS}
                    if COUNTER is not None:
                        print(f"  {size} chats, the node's commands (and their statements) per model call:")
                        for (name, target), count in COUNTER.counts.most_common(20):
                            statements = COUNTER.statements[(name, target)] / n_calls
                            print(f"    {name:>16} {target:<44} {count / n_calls:7.2f} {statements:7.2f}")
                        print(f"  {size} chats, records per model call by type:")
                        types = await record_types(node) - types_before
                        for kind, count in types.most_common():
                            print(f"    {kind:<61} {count / n_calls:7.2f}")
                    # Bare AG2, the same chats against the same model server, right after.
                    bare_before, bare_calls = cpu_s(), calls.value
                    await bare_ag2(f"http://127.0.0.1:{port}/v1", size)
                    bare_cpu = (cpu_s() - bare_before) / max(calls.value - bare_calls, 1)
                    per_call.append(
                        f"{size:>6} {n_calls:>6} {cpu * 1000 / n_calls:>9.1f} {db_cpu * 1000 / n_calls:>9.1f} "
                        f"{bare_cpu * 1000:>9.1f} {cpu / n_calls / bare_cpu:>7.2f} "
                        f"{sum(ops[k] for k in OPS if k != 'command'):>7.2f} "
                        + " ".join(f"{ops[k]:>7.2f}" for k in OPS)
                    )
                    one = one or wall
                    per_run = (max(rss, default=rss_before) - rss_before) / size
                    print(
                        f"{size:>6} {wall:>8.2f} {wall / one:>6.2f} {peak.value:>15} {p99(samples):>11.1f} "
                        f"{p99(samples) / p99(idle):>7.2f} {per_run:>11.2f} {cpu * 1000 / events:>13.2f}",
                        flush=True,
                    )
                print("per model call (CPU ms; database operations; ops = all kinds but command):")
                print(
                    f"{'chats':>6} {'calls':>6} {'node ms':>9} {'db ms':>9} {'bare ms':>9} {'÷ bare':>7} "
                    f"{'ops':>7} " + " ".join(f"{k:>7}" for k in OPS)
                )
                print("\n".join(per_call))
        finally:
            await node.stop()
            server.kill()
            await admin.drop_database(db_name)
            await admin.close()


def main() -> None:
    global TURNS, COUNTER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,50,200,500", help="comma-separated numbers of concurrent chats")
    parser.add_argument("--latency", type=float, default=1.0, help="model latency in seconds")
    parser.add_argument("--turns", type=int, default=TURNS, help="turns per chat (the first is the user's)")
    parser.add_argument("--attribute", action="store_true", help="count the node's commands by collection")
    args = parser.parse_args()
    TURNS = args.turns
    if args.attribute:
        COUNTER = CommandCounter()
        monitoring.register(COUNTER)
    from app.logging import configure_logging

    configure_logging("WARNING")
    import logging

    logging.getLogger("autogen.oai.client").setLevel(logging.ERROR)  # "model not found, cost 0" per call
    sizes = [int(n) for n in args.sizes.split(",")]
    given = os.environ.get("MOZAIKS_TEST_MONGO_URI")
    if given:
        asyncio.run(bench(given, None, sizes, args.latency))
        return
    with tempfile.TemporaryDirectory() as folder, EmbeddedMongo(Path(folder) / "data") as server:
        assert server.process is not None
        asyncio.run(bench(server.uri, server.process.pid, sizes, args.latency))


if __name__ == "__main__":
    main()
