"""Metrics over time for analysts: `GET /metrics/perf/series` (JSON or CSV), merged from `metrics_buckets`."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

from litestar import Controller, MediaType, Request, Response, get
from litestar.exceptions import ValidationException
from litestar.params import Parameter
from pymongo.asynchronous.database import AsyncDatabase

from app.http.auth import Principal, require_role
from app.http.errors import error_responses
from projections.buckets import GROUPS, MetricsSeries, SeriesPoint, series

DEFAULT_DAYS: Final = 30
CSV_COLUMNS: Final = (
    "start",
    *GROUPS,
    "calls",
    "failures",
    "offline",
    "unpriced",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "cost_nanousd",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_max_ms",
    "latency_sum_ms",
)


def csv_row(point: SeriesPoint) -> list[Any]:
    """One point as a CSV row in CSV_COLUMNS order (empty cells for absent groups and percentiles)."""
    latency = point.latency_ms
    return [
        point.start.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        *(getattr(point, group) or "" for group in GROUPS),
        point.calls,
        point.failures,
        point.offline,
        point.unpriced,
        point.prompt_tokens,
        point.completion_tokens,
        point.total_tokens,
        f"{point.cost_nanousd / 1e9:.9f}",
        point.cost_nanousd,
        "" if latency.p50 is None else latency.p50,
        "" if latency.p95 is None else latency.p95,
        latency.max,
        latency.sum,
    ]


def to_csv(points: Iterable[SeriesPoint]) -> str:
    """The points as CSV text with a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_row(point) for point in points)
    return out.getvalue()


def parse_group_by(text: str | None) -> tuple[str, ...]:
    """`workflow,model` → ("workflow", "model"); raises ValidationException naming an unknown group."""
    groups = tuple(part.strip() for part in (text or "").split(",") if part.strip())
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValidationException(f"group_by: unknown {unknown}; use any of {list(GROUPS)}, comma-separated")
    return groups


def time_range(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """[start, end): by default the last 30 days up to now; naive times are UTC."""
    end = end or datetime.now(UTC)
    try:
        start = start or end - timedelta(days=DEFAULT_DAYS)
    except OverflowError:
        raise ValidationException(
            f"to ({end.isoformat()}) leaves no room for a default from; give from"
        ) from None
    end, start = (t if t.tzinfo is not None else t.replace(tzinfo=UTC) for t in (end, start))
    if start >= end:
        raise ValidationException(f"from ({start.isoformat()}) must be before to ({end.isoformat()})")
    return start, end


class SeriesController(Controller):
    """Cost, tokens and latency per hour or day (analysts, their app)."""

    path = "/metrics/perf"

    @get("/series", responses=error_responses(401, 403))
    async def series(
        self,
        request: Request[Principal, Any, Any],
        db: AsyncDatabase[Any],
        start: Annotated[datetime | None, Parameter(query="from")] = None,
        end: Annotated[datetime | None, Parameter(query="to")] = None,
        bucket: Annotated[str, Parameter(pattern="^(hour|day)$")] = "day",
        group_by: str | None = None,
        fmt: Annotated[str | None, Parameter(query="format", pattern="^(json|csv)$")] = None,
    ) -> Response[MetricsSeries]:
        """LLM calls, tokens, cost and latency percentiles per period, grouped by workflow, model, agent.

        CSV with `Accept: text/csv` or `?format=csv`.
        """
        principal = require_role(request, "analyst")
        first, last = time_range(start, end)
        result = await series(
            db,
            app_id=principal.app_id,
            start=first,
            end=last,
            bucket="hour" if bucket == "hour" else "day",
            group_by=parse_group_by(group_by),
        )
        if fmt == "csv" or (fmt is None and "text/csv" in request.headers.get("accept", "")):
            # Documented by the JSON shape: the CSV has one row per point, columns CSV_COLUMNS.
            return Response(to_csv(result.points), media_type="text/csv; charset=utf-8")  # type: ignore[arg-type]
        return Response(result, media_type=MediaType.JSON)
