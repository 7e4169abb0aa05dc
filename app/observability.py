"""Prometheus metrics of the process (served at `/metrics` by Litestar's Prometheus controller)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from projections.runner import ProjectionRunner

EVENTS_SEEN = Counter(
    "mozaiks_events_appended_total", "Events appended to the log (seen on the change stream)", ["type"]
)
WS_CLIENTS = Gauge("mozaiks_ws_clients", "WebSocket clients connected to this process")
REPLAY_SIZE = Histogram(
    "mozaiks_ws_replay_events",
    "Events replayed to a (re)connecting client",
    buckets=(0, 1, 10, 100, 1000, 10_000, 100_000),
)
WS_CLOSED = Counter("mozaiks_ws_closed_total", "WebSocket closes by the server, by reason", ["reason"])
RUN_OUTCOMES = Counter(
    "mozaiks_run_outcomes_total", "Runs finished on this process, by terminal event", ["outcome"]
)
_PROJECTION_LAG_EVENTS = Gauge("mozaiks_projection_lag_events", "Events the projections are behind the log")
_PROJECTION_LAG_SECONDS = Gauge(
    "mozaiks_projection_lag_seconds", "Seconds the projections are behind the log"
)
_LLM_IN_FLIGHT = Gauge("mozaiks_llm_calls_in_flight", "Model calls running on this process")
_LLM_QUEUED = Gauge(
    "mozaiks_llm_calls_queued", "Model calls waiting for a slot (MOZAIKS_MAX_CONCURRENT_LLM_CALLS)"
)
_ACTIVE_RUNS = Gauge("mozaiks_active_runs", "Runs going on this process (bounded by MOZAIKS_MAX_ACTIVE_RUNS)")


def watch_projection_lag(projections: Callable[[], ProjectionRunner | None]) -> None:
    """Read projection lag from the process's projection runner (once it runs) at every scrape."""

    def lag(key: str) -> float:
        runner = projections()
        return float(runner.lag().get(key, 0) or 0) if runner is not None else 0.0

    _PROJECTION_LAG_EVENTS.set_function(lambda: lag("events_behind"))
    _PROJECTION_LAG_SECONDS.set_function(lambda: lag("seconds_behind"))


def watch_runs(in_flight: Callable[[], int], queued: Callable[[], int], active: Callable[[], int]) -> None:
    """Read model calls in flight and queued, and active runs, from the process at every scrape."""
    _LLM_IN_FLIGHT.set_function(lambda: float(in_flight()))
    _LLM_QUEUED.set_function(lambda: float(queued()))
    _ACTIVE_RUNS.set_function(lambda: float(active()))
