"""Benchmark: a 20-turn offline RoundRobin chat on bare AG2 vs the runtime recording every event durably.

Run: `python tests/benchmarks/bench_run.py [--repeat N]`. Both sides use the same workflow (the
Analyzer example with max_turns=20) and the same scripted client; the runtime side appends every
record to an embedded MongoDB-wire server, w=majority, j=true (journaled per write).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import msgspec
from pymongo import AsyncMongoClient

from app.embedded import EmbeddedMongo
from app.logging import configure_logging
from app.runs.orchestrator import Orchestrator
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.store import MongoEventStore
from tests.bare import run_bare

TURNS = 20
MESSAGE = "Analyse: The quick brown fox jumps over the lazy dog. It was not amused."


async def main(repeat: int) -> None:
    configure_logging("WARNING")  # per-run INFO lines would dominate the output
    manager = WorkflowManager(ROOT / "workflows")
    base = manager.get("Analyzer")
    workflow = msgspec.structs.replace(base, manifest=msgspec.structs.replace(base.manifest, max_turns=TURNS))
    manager.workflows["Analyzer"] = workflow
    assert workflow.pattern == "RoundRobin"

    with tempfile.TemporaryDirectory() as data, EmbeddedMongo(Path(data) / "db") as server:
        os.environ["MOZAIKS_WORKSPACE"] = str(Path(data) / "workspace")
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(server.uri, tz_aware=True)
        store = MongoEventStore(client["bench"])
        await store.ensure_indexes()
        orchestrator = Orchestrator(store, manager, Settings(workflows_path=ROOT / "workflows"))

        async def bare() -> tuple[float, int]:
            started = time.perf_counter()
            events, _ = await run_bare(workflow, MESSAGE)
            return time.perf_counter() - started, len(events)

        async def recorded() -> tuple[float, int]:
            started = time.perf_counter()
            stream = await orchestrator.create_chat(
                workflow="Analyzer", user_id="bench", app_id="bench", message=MESSAGE
            )
            outcome = await orchestrator.run(stream)
            elapsed = time.perf_counter() - started
            assert outcome == "run.completed", outcome
            return elapsed, await store.last_seq(stream.chat_id)

        await bare(), await recorded()  # warm-up: imports, first connections, JIT-free but cache-warm
        bare_runs = [await bare() for _ in range(repeat)]
        runtime_runs = [await recorded() for _ in range(repeat)]
        await client.close()

    bare_s = statistics.median(t for t, _ in bare_runs)
    runtime_s = statistics.median(t for t, _ in runtime_runs)
    ag2_events = bare_runs[0][1]
    records = runtime_runs[0][1]
    print(
        f"workflow: Analyzer, RoundRobin, max_turns={TURNS}, offline scripted client, {repeat} runs each (median)"
    )
    print(f"bare AG2 : {bare_s * 1000:8.1f} ms  ({ag2_events} AG2 events, nothing recorded)")
    print(f"runtime  : {runtime_s * 1000:8.1f} ms  ({records} records appended durably, hash-chained)")
    print(f"ratio    : {runtime_s / bare_s:8.2f}x wall time")
    print(f"overhead : {(runtime_s - bare_s) * 1000 / records:8.3f} ms per recorded event")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    asyncio.run(main(parser.parse_args().repeat))
