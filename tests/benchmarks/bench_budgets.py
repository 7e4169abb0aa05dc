"""Benchmark: database operations per model call with budgets off and on (chat + app + user limits).

    nice .venv/bin/python tests/benchmarks/bench_budgets.py [--chats 40] [--rounds 3]

Runs `--chats` offline chats of the Guarded example (hooks removed, 4 model calls each) at once on
one orchestrator against the embedded server, `--rounds` times per mode, and counts the server's
operations (`serverStatus.opcounters`: inserts, queries, updates, getMores, commands) per recorded
model call. Budgets on: a chat budget and daily app and user limits no run reaches, so every call is
checked. Printed: operations per call in each mode and the ratio on ÷ off (the goal: 1.0 — the
check reads nothing per call; the daily sums are read when a run starts, at most once a second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import msgspec
from pymongo import AsyncMongoClient

from app.runs.orchestrator import Orchestrator
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.budgets import BudgetsFile
from domain.store import MongoEventStore
from tests.nodes import benchmark_mongo_uri

EXAMPLE = Path(__file__).resolve().parents[2] / "workflows" / "Guarded"
OPS = ("insert", "query", "update", "delete", "getmore", "command")


def workflow(root: Path, budget: bool) -> Path:
    folder = root / ("on" if budget else "off") / "Guarded"
    shutil.copytree(EXAMPLE, folder)
    (folder / "hooks.json").unlink()
    if budget:
        manifest = json.loads((folder / "workflow.json").read_text())
        manifest["budget"] = {"max_tokens": 10**12, "max_cost_usd": 10**6}
        (folder / "workflow.json").write_text(json.dumps(manifest))
    return folder.parent


async def ops(client: AsyncMongoClient[Any]) -> int:
    counters = (await client.admin.command("serverStatus"))["opcounters"]
    return sum(int(counters.get(name, 0)) for name in OPS)


async def measure(client: AsyncMongoClient[Any], folder: Path, budget: bool, chats: int) -> tuple[int, int]:
    db = client[f"bench_budgets_{'on' if budget else 'off'}_{os.getpid()}"]
    store = MongoEventStore(db)
    await store.ensure_indexes()
    orchestrator = Orchestrator(store, WorkflowManager(folder), Settings(workflows_path=folder))
    if budget:
        limits = {"daily": {"max_tokens": 10**12}, "user_daily": {"max_cost_usd": 10**6}}
        orchestrator.budgets.file = msgspec.convert({"default": limits}, BudgetsFile)
    streams = [
        await orchestrator.create_chat(
            workflow="Guarded", user_id=f"u{i % 5}", app_id="bench", message="notes"
        )
        for i in range(chats)
    ]
    before = await ops(client)
    await asyncio.gather(*(orchestrator.run(stream) for stream in streams))
    spent = await ops(client) - before
    calls = sum(report.llm_calls for report in orchestrator.reports.values())
    await client.drop_database(db.name)
    return spent, calls


async def bench(uri: str, chats: int, rounds: int) -> None:
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
    os.environ.setdefault("MOZAIKS_WORKSPACE", tempfile.mkdtemp())
    with tempfile.TemporaryDirectory() as folder:
        folders = {budget: workflow(Path(folder), budget) for budget in (False, True)}
        totals = {False: [0, 0], True: [0, 0]}
        for _ in range(rounds):
            for budget in (False, True):
                spent, calls = await measure(client, folders[budget], budget, chats)
                totals[budget][0] += spent
                totals[budget][1] += calls
    await client.close()
    per = {mode: spent / calls for mode, (spent, calls) in totals.items()}
    print(f"{chats} chats x {rounds} rounds, {totals[False][1] // rounds} model calls a round")
    print(f"database operations per model call: budgets off {per[False]:.2f}, on {per[True]:.2f}")
    print(f"ratio on / off: {per[True] / per[False]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from app.logging import configure_logging

    configure_logging("WARNING")
    with benchmark_mongo_uri() as uri:
        asyncio.run(bench(uri, args.chats, args.rounds))


if __name__ == "__main__":
    main()
