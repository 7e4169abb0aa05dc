"""Metrics over time on the real wire server: series equal the raw `llm.call` records, survive a rebuild,
follow a price change; CSV and Parquet exports."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from app.http.auth import issue_token
from domain.events import (
    GENESIS_HASH,
    ChatCreated,
    LlmCall,
    Pending,
    RunCompleted,
    RunStarted,
    StreamRef,
    seal,
)
from domain.store import MongoEventStore
from projections import sketch
from projections.buckets import series
from projections.prices import PriceTable
from projections.rebuild import rebuild
from tests.cli import invoke

SECRET = "series-test-secret-of-at-least-thirty-two-bytes"
ROOT = Path(__file__).resolve().parents[1]
DAY0 = datetime(2026, 11, 20, tzinfo=UTC)
MODELS = ("gpt-4o-mini", "gpt-4o", "no-such-model")
AGENTS = ("Planner", "Writer", None)


def analyst(app: str = "P") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, 'ana', app, ['analyst'])}"}


async def write_dated_chats(db: AsyncDatabase[Any], chats: int = 12) -> None:
    """Chats of two apps and two workflows whose LLM calls spread over three days and many hours."""
    docs: list[dict[str, Any]] = []
    for k in range(chats):
        stream = StreamRef(
            chat_id=f"chat-{k}", app_id="PQ"[k % 2], user_id="u", workflow=("Alpha", "Beta")[k // 2 % 2]
        )
        start = DAY0 + timedelta(hours=7 * k, minutes=k)
        events: list[tuple[Pending, datetime]] = [
            (Pending(event=ChatCreated()), start),
            (Pending(event=RunStarted(pattern="RoundRobin", max_turns=9), run_id="r"), start),
        ]
        for j in range(6):
            call = LlmCall(
                model=MODELS[(k + j) % 3],
                prompt_tokens=100 * (k + 1) + j,
                completion_tokens=10 * j + k,
                latency_ms=50.0 * (j + 1) + k,
                offline=(k + j) % 7 == 0,
                error="timeout" if (k + j) % 5 == 0 else None,
            )
            # Calls spread over about 30 hours: the chat's buckets cross a day boundary.
            events.append(
                (
                    Pending(event=call, agent=AGENTS[j % 3], run_id="r", visible=False),
                    start + timedelta(hours=5 * j),
                )
            )
        events.append((Pending(event=RunCompleted(), run_id="r"), start + timedelta(hours=31)))
        prev = GENESIS_HASH
        for seq, (pending, ts) in enumerate(events, start=1):
            doc = seal(stream, pending, seq, prev, ts)
            prev = doc["hash"]
            docs.append(doc)
    await db["events"].insert_many(docs)


def expected_series(
    raw: list[Mapping[str, Any]],
    prices: PriceTable,
    *,
    app: str,
    start: datetime,
    end: datetime,
    hours: int,
    groups: tuple[str, ...],
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The series computed straight from the raw `llm.call` records."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for doc in raw:
        ts = doc["ts"]
        if doc["app_id"] != app or doc["type"] != "llm.call" or not start <= ts < end:
            continue
        data = doc["data"]
        period = datetime(ts.year, ts.month, ts.day, ts.hour if hours == 1 else 0, tzinfo=UTC)
        names = {"workflow": doc["workflow"], "model": data["model"], "agent": doc["agent"]}
        key = (period, *(names[g] if g in groups else None for g in ("workflow", "model", "agent")))
        point = out.setdefault(
            key,
            {
                "calls": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cost_nanousd": 0,
                "unpriced": 0,
                "failures": 0,
                "buckets": {},
                "max": 0,
            },
        )
        cost = (
            0
            if data["offline"]
            else prices.cost_nanousd(data["model"], data["prompt_tokens"], data["completion_tokens"], ts)
        )
        point["calls"] += 1
        point["prompt_tokens"] += data["prompt_tokens"]
        point["completion_tokens"] += data["completion_tokens"]
        point["cost_nanousd"] += cost or 0
        point["unpriced"] += cost is None
        point["failures"] += data["error"] is not None
        point["max"] = max(point["max"], round(data["latency_ms"] * 1000))
        bucket = sketch.bucket_key(data["latency_ms"])
        point["buckets"][bucket] = point["buckets"].get(bucket, 0) + 1
    for point in out.values():
        point["p95"] = sketch.quantile(point.pop("buckets"), 0.95)
        point["max"] = point["max"] / 1000
    return out


def as_expected(points: list[Mapping[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    got: dict[tuple[Any, ...], dict[str, Any]] = {}
    for p in points:
        start = (
            p["start"]
            if isinstance(p["start"], datetime)
            else datetime.fromisoformat(p["start"].replace("Z", "+00:00"))
        )
        key = (start, p.get("workflow"), p.get("model"), p.get("agent"))
        latency = p["latency_ms"]
        got[key] = {
            "calls": p["calls"], "prompt_tokens": p["prompt_tokens"], "completion_tokens": p["completion_tokens"],
            "cost_nanousd": p["cost_nanousd"], "unpriced": p["unpriced"], "failures": p["failures"],
            "p95": latency["p95"], "max": latency["max"],
        }  # fmt: skip
    return got


def builtins(result: Any) -> list[dict[str, Any]]:
    import msgspec

    points: list[dict[str, Any]] = msgspec.to_builtins(result.points, builtin_types=(datetime,))
    return points


async def test_series_equal_the_raw_calls_survive_a_rebuild_and_follow_a_price_change(
    start_node: Any, db: AsyncDatabase[Any], store: MongoEventStore, tmp_path: Path
) -> None:
    node = await start_node(auth_secret=SECRET)
    await write_dated_chats(db)
    await node.runtime.projections.wait_caught_up(120)
    raw = [doc async for doc in db["events"].find({"type": "llm.call"})]
    shipped = PriceTable.load()
    start, end = DAY0 - timedelta(days=1), DAY0 + timedelta(days=6)
    async with httpx.AsyncClient(base_url=node.url) as http:
        params = {"from": start.isoformat(), "to": end.isoformat(), "bucket": "day", "group_by": "workflow"}
        response = await http.get("/metrics/perf/series", params=params, headers=analyst())
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["bucket"] == "day" and body["group_by"] == ["workflow"]
        expected = expected_series(
            raw, shipped, app="P", start=start, end=end, hours=24, groups=("workflow",)
        )
        assert len(expected) >= 4 and any(p["unpriced"] for p in expected.values())
        assert as_expected(body["points"]) == expected
        # Hours, a range that starts and ends mid-day, every grouping.
        mid_start, mid_end = DAY0 + timedelta(hours=13), DAY0 + timedelta(days=2, hours=5)
        fine = await http.get(
            "/metrics/perf/series",
            params={
                "from": mid_start.isoformat(),
                "to": mid_end.isoformat(),
                "bucket": "hour",
                "group_by": "workflow,model,agent",
            },
            headers=analyst(),
        )
        assert as_expected(fine.json()["points"]) == expected_series(
            raw,
            shipped,
            app="P",
            start=mid_start,
            end=mid_end,
            hours=1,
            groups=("workflow", "model", "agent"),
        )
        # CSV carries the same numbers.
        as_csv = await http.get(
            "/metrics/perf/series", params=params, headers={**analyst(), "Accept": "text/csv"}
        )
        assert as_csv.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [int(r["cost_nanousd"]) for r in rows] == [p["cost_nanousd"] for p in body["points"]]
        assert [r["workflow"] for r in rows] == [p["workflow"] for p in body["points"]]
        # App Q's analyst sees Q's numbers only; a user without the role sees nothing.
        other = (await http.get("/metrics/perf/series", params=params, headers=analyst("Q"))).json()
        assert as_expected(other["points"]) == expected_series(
            raw, shipped, app="Q", start=start, end=end, hours=24, groups=("workflow",)
        )
        user = {"Authorization": f"Bearer {issue_token(SECRET, 'u', 'P', ['user'])}"}
        assert (await http.get("/metrics/perf/series", headers=user)).status_code == 403
        bad = await http.get("/metrics/perf/series", params={"group_by": "colour"}, headers=analyst())
        assert bad.status_code == 400 and "colour" in bad.text

    live = builtins(
        await series(db, app_id="P", start=start, end=end, bucket="hour", group_by=("model", "agent"))
    )
    await rebuild(db, store, names=["metrics_buckets"])
    assert (
        builtins(
            await series(db, app_id="P", start=start, end=end, bucket="hour", group_by=("model", "agent"))
        )
        == live
    )

    table = json.loads((ROOT / "projections" / "prices.json").read_text())
    for versions in table["models"].values():
        for version in versions:
            version["input"], version["output"] = version["input"] * 3, version["output"] * 2
    dearer_file = tmp_path / "prices.json"
    dearer_file.write_text(json.dumps(table))
    dearer = PriceTable.load(dearer_file)
    await rebuild(db, store, names=["metrics_buckets"], prices=dearer)
    recosted = await series(db, app_id="P", start=start, end=end, bucket="day", group_by=("workflow",))
    assert as_expected(builtins(recosted)) == expected_series(
        raw, dearer, app="P", start=start, end=end, hours=24, groups=("workflow",)
    )
    assert sum(p.cost_nanousd for p in recosted.points) > sum(p["cost_nanousd"] for p in body["points"])


def export(
    *args: str, env: Mapping[str, str], without_pyarrow: bool = False
) -> subprocess.CompletedProcess[str]:
    # sys.modules[name] = None makes `import name` fail, as on a machine without the extra.
    block = "import sys; sys.modules['pyarrow'] = None; " if without_pyarrow else ""
    return subprocess.run(
        [sys.executable, "-c", f"{block}from app.cli import main; main()", "metrics", "export", *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


async def test_metrics_export_writes_csv_and_parquet_or_says_what_is_missing(
    db: AsyncDatabase[Any], store: MongoEventStore, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    from app.cli.audit import metrics_group

    await write_dated_chats(db, 4)
    await rebuild(db, store, names=["metrics_buckets"])
    env = {"DATABASE_URI": mongo_uri, "MOZAIKS_DB": db_name}
    window = ("--app", "P", "--from", "2026-11-19", "--to", "2026-11-26")
    # As a user runs them, but in this process (see tests.cli.invoke); only the run without the
    # extra is a process of its own, an interpreter that cannot import pyarrow.
    as_csv = invoke(metrics_group, "export", *window, "--bucket", "day", env=env)
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    expected = await series(db, app_id="P", start=datetime(2026, 11, 19, tzinfo=UTC), end=datetime(2026, 11, 26, tzinfo=UTC),
                            bucket="day", group_by=("workflow", "model", "agent"))  # fmt: skip
    assert len(rows) == len(expected.points) > 0
    assert sum(int(r["calls"]) for r in rows) == sum(p.calls for p in expected.points)
    target = tmp_path / "series.parquet"
    missing = export(*window, "--format", "parquet", "-o", str(target), env=env, without_pyarrow=True)
    assert missing.returncode == 2 and "pip install 'mozaiks-runtime[parquet]'" in missing.stderr
    assert not target.exists()
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra (pyarrow) is not installed")
    parquet = invoke(metrics_group, "export", *window, "--format", "parquet", "-o", str(target), env=env)
    assert parquet.returncode == 0, parquet.stderr
    table = pq.read_table(target).to_pylist()
    assert [row["cost_nanousd"] for row in table] == [int(r["cost_nanousd"]) for r in rows]
    assert [row["latency_p95_ms"] for row in table] == [
        float(r["latency_p95_ms"]) if r["latency_p95_ms"] else None for r in rows
    ]
