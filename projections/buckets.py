"""The `metrics_buckets` projection: LLM calls per hour × app × workflow × model × agent, and its series.

One document per chat (so the `last_seq` guard keeps every call counted exactly once, like
`chat_metrics`), holding that chat's hourly buckets; app and workflow are the chat's own:

    {"_id": chat_id, "chat_id", "app_id", "user_id", "workflow", "created_at", "updated_at", "last_seq",
     "first_hour", "last_hour": hours since the epoch (UTC) of the chat's first record and last call,
     "hours": {"h<hour>": {field_key(model): {field_key(agent or ""): {
         "calls", "failures", "offline", "unpriced", "prompt_tokens", "completion_tokens",
         "cost_nanousd", "latency_us_sum", "latency_us_max", "buckets": {sketch key: count}}}}}}

`series()` merges the buckets of every chat overlapping a time range into hour or day points,
grouped by any of workflow, model and agent; percentiles come from the merged sketches. Cost is
computed when an event is projected, so a changed price table reaches history by a rebuild.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final, Literal

import msgspec
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

from domain.events import AnyEvent, LlmCall, Record
from projections import sketch
from projections.metrics import PricedProjector, latency_us
from projections.projector import epoch_ms
from projections.queries import CURRENCY, Latency
from projections.update import Update, field_key, name_of_key

HOUR_MS: Final = 3_600_000
GROUPS: Final = ("workflow", "model", "agent")
_COUNTERS: Final = (
    "calls",
    "failures",
    "offline",
    "unpriced",
    "prompt_tokens",
    "completion_tokens",
    "cost_nanousd",
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

Bucket = Literal["hour", "day"]


def hour_of(ts: datetime) -> int:
    """Whole hours since the epoch (UTC) of a timestamp."""
    return epoch_ms(ts) // HOUR_MS


class MetricsBucketsProjector(PricedProjector):
    """Projects `llm.call` records into hourly buckets per model and agent, one document per chat."""

    name: ClassVar[str] = "metrics_buckets"
    collection: ClassVar[str] = "metrics_buckets"
    handles: ClassVar[frozenset[str]] = frozenset({"llm.call"})
    indexes: ClassVar[tuple[IndexModel, ...]] = (
        IndexModel(
            [("app_id", ASCENDING), ("last_hour", ASCENDING), ("first_hour", ASCENDING)], name="app_hours"
        ),
    )

    def initial(self, first: Record) -> dict[str, Any]:
        """The chat's document; its hours start at its first record's."""
        doc = super().initial(first)
        doc["first_hour"] = doc["last_hour"] = hour_of(first.ts)
        return doc

    def empty(self) -> dict[str, Any]:
        """No calls yet."""
        return {"hours": {}}

    def update(self, state: Mapping[str, Any], record: Record, event: AnyEvent) -> Update:
        """Count one call in its hour's bucket for its model and agent."""
        change = Update()
        if not isinstance(event, LlmCall):
            return change
        hour = hour_of(record.ts)
        base = f"hours.h{hour}.{field_key(event.model)}.{field_key(record.agent or '')}."
        cost = self.call_cost(record, event)
        latency = latency_us(event)
        for field, value in (
            ("calls", 1),
            ("failures", int(event.error is not None)),
            ("offline", int(event.offline)),
            ("unpriced", int(cost is None)),
            ("prompt_tokens", event.prompt_tokens),
            ("completion_tokens", event.completion_tokens),
            ("cost_nanousd", cost or 0),
            ("latency_us_sum", latency),
            (f"buckets.{sketch.bucket_key(event.latency_ms)}", 1),
        ):
            change.inc[base + field] = value
        change.max[base + "latency_us_max"] = latency
        change.max["last_hour"] = hour
        change.set["updated_at"] = record.ts
        return change


# ---- the series ---------------------------------------------------------------------------------


class SeriesPoint(msgspec.Struct, kw_only=True):
    """One period (and group): LLM calls, tokens, cost and latency; group fields absent are null."""

    start: datetime
    workflow: str | None = None
    model: str | None = None
    agent: str | None = None
    calls: int
    failures: int
    offline: int
    unpriced: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float
    cost_nanousd: int
    latency_ms: Latency


class MetricsSeries(msgspec.Struct, kw_only=True):
    """`GET /metrics/perf/series`: points in time order, then by group."""

    start: datetime
    end: datetime
    bucket: str
    group_by: list[str]
    currency: str
    relative_accuracy: float
    points: list[SeriesPoint]


class _Sum:
    __slots__ = ("buckets", "counters", "latency_max", "latency_sum")

    def __init__(self) -> None:
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.latency_sum = 0
        self.latency_max = 0
        self.buckets: dict[str, int] = {}

    def add(self, stats: Mapping[str, Any]) -> None:
        for field in _COUNTERS:
            self.counters[field] += int(stats.get(field) or 0)
        self.latency_sum += int(stats.get("latency_us_sum") or 0)
        self.latency_max = max(self.latency_max, int(stats.get("latency_us_max") or 0))
        for key, count in (stats.get("buckets") or {}).items():
            self.buckets[key] = self.buckets.get(key, 0) + int(count)

    def point(self, start: datetime, group: Mapping[str, str | None]) -> SeriesPoint:
        c = self.counters
        return SeriesPoint(
            start=start,
            workflow=group.get("workflow"),
            model=group.get("model"),
            agent=group.get("agent"),
            calls=c["calls"],
            failures=c["failures"],
            offline=c["offline"],
            unpriced=c["unpriced"],
            prompt_tokens=c["prompt_tokens"],
            completion_tokens=c["completion_tokens"],
            cost_nanousd=c["cost_nanousd"],
            total_tokens=c["prompt_tokens"] + c["completion_tokens"],
            cost=c["cost_nanousd"] / 1e9,
            latency_ms=Latency(
                p50=sketch.quantile(self.buckets, 0.50),
                p95=sketch.quantile(self.buckets, 0.95),
                max=self.latency_max / 1000,
                sum=self.latency_sum / 1000,
            ),
        )


async def series(
    db: AsyncDatabase[Any],
    *,
    app_id: str,
    start: datetime,
    end: datetime,
    bucket: Bucket = "day",
    group_by: Sequence[str] = (),
) -> MetricsSeries:
    """Calls of `app_id` in [start, end) per hour or UTC day, grouped by `group_by` (of GROUPS)."""
    unknown = [g for g in group_by if g not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {unknown}; use any of {list(GROUPS)}")
    first, last = hour_of(start), hour_of(end - timedelta(milliseconds=1))
    span = 24 if bucket == "day" else 1
    pipeline: list[dict[str, Any]] = [
        {"$match": {"app_id": str(app_id), "last_hour": {"$gte": first}, "first_hour": {"$lte": last}}},
        {"$project": {"_id": 0, "workflow": 1, "h": {"$objectToArray": "$hours"}}},
        {"$unwind": "$h"},
        {"$project": {"workflow": 1, "hour": "$h.k", "m": {"$objectToArray": "$h.v"}}},
        {"$unwind": "$m"},
        {"$project": {"workflow": 1, "hour": 1, "model": "$m.k", "a": {"$objectToArray": "$m.v"}}},
        {"$unwind": "$a"},
        {"$project": {"workflow": 1, "hour": 1, "model": 1, "agent": "$a.k", "stats": "$a.v"}},
    ]
    sums: dict[tuple[int, tuple[str | None, ...]], _Sum] = {}
    collection = db[MetricsBucketsProjector.collection]
    async for row in await collection.aggregate(pipeline):
        hour = int(str(row["hour"])[1:])
        if not first <= hour <= last:
            continue
        names = {
            "workflow": str(row.get("workflow") or ""),
            "model": name_of_key(str(row["model"])),
            "agent": name_of_key(str(row["agent"])) or None,
        }
        key = (hour - hour % span, tuple(names[g] if g in group_by else None for g in GROUPS))
        sums.setdefault(key, _Sum()).add(row["stats"])
    points = [
        total.point(_EPOCH + timedelta(hours=period), dict(zip(GROUPS, group, strict=True)))
        for (period, group), total in sorted(
            sums.items(), key=lambda item: (item[0][0], [g or "" for g in item[0][1]])
        )
    ]
    return MetricsSeries(
        start=start,
        end=end,
        bucket=bucket,
        group_by=[g for g in GROUPS if g in group_by],
        currency=CURRENCY,
        relative_accuracy=sketch.RELATIVE_ACCURACY,
        points=points,
    )
