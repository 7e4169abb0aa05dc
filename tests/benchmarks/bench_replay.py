"""Benchmark: model I/O storage per call, recorded replay time, and the cost of recording model I/O.

    nice .venv/bin/python tests/benchmarks/bench_replay.py [--calls 100] [--per-run 20] [--latency 1.0] [--rounds 2]

An OpenAI-compatible server in ANOTHER process answers every call after `--latency` seconds (a
second one answers at once); the runtime (this process) calls it through the real `openai` SDK.
The chat is `--calls` model calls: four agents taking turns (RoundRobin), `--per-run` calls a run,
one user message before each run; call k sends everything said before it again. Printed:
- bytes stored per call: content-addressed parts vs a naive copy of every request and response;
- the recorded replay's wall time vs the original's (goal: under 5 % at 100 calls and 1 s latency);
- node CPU per call with MOZAIKS_RECORD_MODEL_IO=full vs off (zero latency, rounds interleaved;
  goal: at most 5 % more), and database operations for the parts (inserts per call).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pymongo import AsyncMongoClient

from app.embedded import free_port
from app.runs.orchestrator import Orchestrator
from app.runs.replay import replay
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.events import MessageUser, Pending, StreamRef
from domain.model_io import PARTS_COLLECTION, canonical
from domain.store import MongoEventStore
from tests.nodes import benchmark_mongo_uri


def model_server(port: int, latency: float, ready: Any) -> None:
    """Another process: an OpenAI-compatible server answering every call after `latency` seconds."""
    from tests.llm_server import StreamingModel, text_reply

    def slow(_reply: int, index: int) -> None:
        if index == 0 and latency:
            time.sleep(latency)

    StreamingModel(
        [text_reply("Noted: that is one more point for the summary.", 3)], before_chunk=slow, port=port
    )
    ready.set()
    while True:
        time.sleep(3600)


def start_server(latency: float) -> tuple[Any, str]:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    port = free_port()
    process = context.Process(target=model_server, args=(port, latency, ready), daemon=True)
    process.start()
    if not ready.wait(60):
        raise RuntimeError("the model server did not start")
    return process, f"http://127.0.0.1:{port}/v1"


AGENTS = ("Planner", "Writer", "Editor", "Critic")


def relay_workflow(root: Path, per_run: int) -> Path:
    """Four agents taking turns, `per_run` model calls a run."""
    folder = root / "workflows" / "Relay"
    folder.mkdir(parents=True)
    manifest = {
        "name": "Relay",
        "orchestration_pattern": "RoundRobin",
        "max_turns": per_run + 1,  # the user message is the first round
        "visual_agents": list(AGENTS),
        "entry_agent": AGENTS[0],
    }
    (folder / "workflow.json").write_text(json.dumps(manifest))
    (folder / "agents.json").write_text(json.dumps({"agents": [{"name": name} for name in AGENTS]}))
    return folder.parent


async def chat(
    store: MongoEventStore, settings: Settings, calls: int, per_run: int
) -> tuple[StreamRef, float, float, Orchestrator]:
    """A chat of `calls` model calls; returns it, its wall time, this process's CPU seconds and its orchestrator."""
    orchestrator = Orchestrator(store, WorkflowManager(settings.workflows_path), settings)
    started, cpu = time.perf_counter(), time.process_time()
    stream = await orchestrator.create_chat(workflow="Relay", user_id="u", app_id="bench", message="point 0")
    await orchestrator.run(stream)
    for n in range(1, max(1, calls // per_run)):
        await store.append(
            stream, [Pending(event=MessageUser(content=f"point {n}: {'x' * (n % 7)}"))], expected_seq=None
        )
        await orchestrator.run(stream)
    return stream, time.perf_counter() - started, time.process_time() - cpu, orchestrator


async def bench(uri: str, calls: int, per_run: int, latency: float, rounds: int) -> None:
    db_name = f"bench_replay_{int(time.time())}"
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
    slow, slow_url = start_server(latency)
    fast, fast_url = start_server(0.0)
    try:
        with tempfile.TemporaryDirectory() as folder:
            workflows = relay_workflow(Path(folder), per_run)
            store = MongoEventStore(client[db_name])
            await store.ensure_indexes()
            base = Settings(
                openai_api_key="sk-bench",
                openai_model="bench-model",
                workflows_path=workflows,
                llm_attempts=1,
            )
            online = Settings(**{**_fields(base), "openai_base_url": slow_url})
            stream, wall, _, first = await chat(store, online, calls, per_run)
            records = [r async for r in store.find(stream.chat_id, types=["llm.call"])]
            parts = [doc async for doc in client[db_name][PARTS_COLLECTION].find()]
            stored = sum(len(doc["body"].encode()) for doc in parts)
            orchestrator = Orchestrator(store, WorkflowManager(workflows), online)
            values = await orchestrator.parts.values(
                h for r in records for h in (*r.data["request"], r.data["response"])
            )
            naive = 0
            for record in records:
                request = [values[h] for h in record.data["request"]]
                naive += len(canonical(request)) + len(canonical(values[record.data["response"]]))
            print(f"{len(records)} model calls ({per_run} a run), model latency {latency:g} s")
            print(
                f"bytes per call: content-addressed {stored / len(records):,.0f} B, naive copy "
                f"{naive / len(records):,.0f} B: ratio {stored / naive:.3f} ({len(parts)} parts, "
                f"{first.parts.inserts / len(records):.2f} part inserts per call)"
            )
            began = time.perf_counter()
            report = await replay(store, base, WorkflowManager(workflows), stream.chat_id)
            replayed = time.perf_counter() - began
            assert report.divergence is None and report.recorded == len(records), report
            print(
                f"original {wall:.1f} s, recorded replay {replayed:.1f} s: {replayed / wall * 100:.1f} % "
                f"of the original's wall time (goal < 5 %)"
            )

            cpu: dict[str, list[float]] = {"off": [], "full": []}
            for _ in range(rounds):
                for mode in ("off", "full"):
                    settings = Settings(
                        **{**_fields(base), "openai_base_url": fast_url, "record_model_io": mode}
                    )
                    _, _, spent, _ = await chat(store, settings, calls, per_run)
                    cpu[mode].append(spent * 1000 / calls)
            off, full = statistics.median(cpu["off"]), statistics.median(cpu["full"])
            print(
                f"node CPU per call (zero latency, median of {rounds}): off {off:.1f} ms, full {full:.1f} ms: "
                f"{(full / off - 1) * 100:+.1f} % (goal <= 5 %)"
            )
    finally:
        slow.kill()
        fast.kill()
        await client.drop_database(db_name)
        await client.close()


def _fields(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__struct_fields__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="model calls in the chat")
    parser.add_argument("--per-run", type=int, default=20, help="model calls per run (4 agents taking turns)")
    parser.add_argument("--latency", type=float, default=1.0, help="model latency in seconds")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the CPU comparison")
    args = parser.parse_args()
    from app.logging import configure_logging

    configure_logging("WARNING")
    with benchmark_mongo_uri() as uri:
        asyncio.run(bench(uri, args.calls, args.per_run, args.latency, args.rounds))


if __name__ == "__main__":
    main()
