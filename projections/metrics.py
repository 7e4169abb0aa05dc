"""The `chat_metrics` projection: per chat and per agent counters, tokens, cost and LLM latency.

Stored document (integers only, so `$inc` sums are exact and batch-independent):

    {"_id": chat_id, "chat_id", "app_id", "user_id", "workflow", "created_at", "updated_at", "last_seq",
     "turns", "tool_calls", "tool_failures", "invalid_outputs", "run_failures", "errors",
     "prompt_tokens", "completion_tokens", "total_tokens", "cost_nanousd",
     "runs", "run_duration_ms", "run": null | {"id", "started_ms"},
     "llm": {"count", "failures", "offline", "unpriced", "latency_us_sum", "latency_us_max",
             "buckets": {bucket key: count}, "ttft_buckets": {bucket key: count},
             "streamed", "stream_us_sum", "stream_tokens"},
     "agents": {field_key(agent): {"turns", "tool_calls", "tool_failures", "invalid_outputs", "prompt_tokens",
                "completion_tokens", "total_tokens", "cost_nanousd", "llm": {... as above}}}}

Tokens, cost and latency come from `llm.call` records only (AG2's own summaries under-count).
`turns` counts `message.agent` (not a fork's copies, `data.origin: "fork"`); `errors` = failed runs + failed tool calls. `run_duration_ms` sums
run.started → terminal event of each finished run. `invalid_outputs` counts `output.invalid` records
(structured-output replies that did not match their schema). Offline (scripted) calls cost 0; their tokens
count. A call whose model has no price is counted in `llm.unpriced` and costs 0.
Streaming: `ttft_buckets` is the histogram of time to first token; `streamed`, `stream_us_sum` and
`stream_tokens` count the calls whose tokens streamed over a measurable time (first → last token),
that time and their completion tokens, so output tokens/s = stream_tokens / stream time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from pymongo import ASCENDING, DESCENDING, IndexModel

from domain.events import (
    AnyEvent,
    LlmCall,
    MessageAgent,
    OutputInvalid,
    Record,
    RunCompleted,
    RunFailed,
    RunStarted,
    RunStopped,
    RunSuspended,
    ToolCalled,
    ToolResult,
)
from projections.prices import PriceTable, WatchedPrices
from projections.projector import Projector, epoch_ms
from projections.sketch import bucket_key
from projections.update import Update, field_key


def empty_llm() -> dict[str, Any]:
    """LLM counters before any call."""
    return {
        "count": 0,
        "failures": 0,
        "offline": 0,
        "unpriced": 0,
        "latency_us_sum": 0,
        "latency_us_max": 0,
        "buckets": {},
        "ttft_buckets": {},
        "streamed": 0,
        "stream_us_sum": 0,
        "stream_tokens": 0,
    }


class PricedProjector(Projector):
    """A projector that costs `llm.call` records with a price table (re-read when its file changes)."""

    def __init__(self, prices: PriceTable | WatchedPrices | None = None) -> None:
        self._watched = prices if isinstance(prices, WatchedPrices) else None
        self._table = prices if isinstance(prices, PriceTable) else None
        if prices is None:
            self._table = PriceTable.load()

    @property
    def prices(self) -> PriceTable:
        """The price table in use now."""
        if self._watched is not None:
            return self._watched.table
        assert self._table is not None
        return self._table

    def refresh(self) -> None:
        """Re-read a watched price file that changed."""
        if self._watched is not None:
            self._watched.refresh()

    def call_cost(self, record: Record, call: LlmCall) -> int | None:
        """The call's cost in nano-USD (0 offline) by the prices in force on its date; None if unpriced."""
        if call.offline:
            return 0
        return self.prices.cost_nanousd(call.model, call.prompt_tokens, call.completion_tokens, record.ts)


def latency_us(call: LlmCall) -> int:
    """The call's latency in whole microseconds (0 when not a finite, positive number)."""
    return max(round(call.latency_ms * 1000), 0) if math.isfinite(call.latency_ms) else 0


class ChatMetricsProjector(PricedProjector):
    """Projects per-chat and per-agent performance metrics into `chat_metrics`."""

    name: ClassVar[str] = "metrics"
    collection: ClassVar[str] = "chat_metrics"
    handles: ClassVar[frozenset[str]] = frozenset(
        {
            "message.agent",
            "tool.called",
            "tool.result",
            "llm.call",
            "output.invalid",
            "run.started",
            "run.completed",
            "run.failed",
            "run.stopped",
            "run.suspended",
        }
    )
    state_fields: ClassVar[tuple[str, ...]] = ("run",)
    state_types: ClassVar[frozenset[str]] = frozenset(
        {"run.completed", "run.failed", "run.stopped", "run.suspended"}
    )
    indexes: ClassVar[tuple[IndexModel, ...]] = (
        IndexModel([("app_id", ASCENDING), ("updated_at", DESCENDING)], name="app_updated"),
        IndexModel([("app_id", ASCENDING), ("cost_nanousd", DESCENDING)], name="app_cost"),
        IndexModel([("app_id", ASCENDING), ("total_tokens", DESCENDING)], name="app_tokens"),
        IndexModel([("user_id", ASCENDING), ("updated_at", DESCENDING)], name="user_updated"),
    )

    def empty(self) -> dict[str, Any]:
        """All counters zero."""
        return {
            "turns": 0,
            "tool_calls": 0,
            "tool_failures": 0,
            "invalid_outputs": 0,
            "run_failures": 0,
            "errors": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "cost_nanousd": 0,
            "runs": 0,
            "run_duration_ms": 0,
            "run": None,
            "llm": empty_llm(),
            "agents": {},
        }

    def update(self, state: Mapping[str, Any], record: Record, event: AnyEvent) -> Update:
        """Counters of one event, for the chat and for the event's agent."""
        change = Update()
        change.set["updated_at"] = record.ts
        agent = f"agents.{field_key(record.agent)}." if record.agent is not None else None

        def count(field: str, by: int = 1) -> None:
            change.inc[field] = change.inc.get(field, 0) + by
            if agent is not None:
                change.inc[agent + field] = change.inc.get(agent + field, 0) + by

        match event:
            case MessageAgent(origin=None):  # a fork's copies of its parent's messages are not its turns
                count("turns")
            case ToolCalled():
                count("tool_calls")
            case ToolResult(is_error=True):
                count("tool_failures")
                change.inc["errors"] = 1
            case LlmCall():
                self._llm_call(change, record, event, count)
            case OutputInvalid():
                count("invalid_outputs")
            case RunStarted():
                change.inc["runs"] = 1
                change.set["run"] = {"id": record.run_id, "started_ms": epoch_ms(record.ts)}
            case RunCompleted() | RunFailed() | RunStopped() | RunSuspended():
                run = state.get("run")
                if run is not None and (record.run_id is None or record.run_id == run["id"]):
                    change.inc["run_duration_ms"] = max(epoch_ms(record.ts) - int(run["started_ms"]), 0)
                    change.set["run"] = None
                if isinstance(event, RunFailed):
                    change.inc["run_failures"] = 1
                    change.inc["errors"] = 1
            case _:
                pass
        return change

    def _llm_call(self, change: Update, record: Record, call: LlmCall, count: Any) -> None:
        count("prompt_tokens", call.prompt_tokens)
        count("completion_tokens", call.completion_tokens)
        count("total_tokens", call.prompt_tokens + call.completion_tokens)
        cost = self.call_cost(record, call)
        if call.offline:
            count("llm.offline")
        elif cost is None:
            count("llm.unpriced")
        count("cost_nanousd", cost or 0)
        count("llm.count")
        if call.error is not None:
            count("llm.failures")
        latency = latency_us(call)
        count("llm.latency_us_sum", latency)
        count(f"llm.buckets.{bucket_key(call.latency_ms)}")
        change.max["llm.latency_us_max"] = latency
        if record.agent is not None:
            change.max[f"agents.{field_key(record.agent)}.llm.latency_us_max"] = latency
        if call.ttft_ms is not None and math.isfinite(call.ttft_ms):
            count(f"llm.ttft_buckets.{bucket_key(call.ttft_ms)}")
        stream_us = (
            round(call.stream_ms * 1000)
            if call.stream_ms is not None and math.isfinite(call.stream_ms)
            else 0
        )
        if stream_us > 0 and call.error is None:
            count("llm.streamed")
            count("llm.stream_us_sum", stream_us)
            count("llm.stream_tokens", call.completion_tokens)
