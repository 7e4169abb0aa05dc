"""Read side for the REST layer: chat sessions, and metrics per chat, per agent and across chats.

Metrics come back as plain dicts of a stable shape (the Structs below document it); latencies are in
milliseconds, percentiles are read from the summed log-bucket histograms (within
`sketch.RELATIVE_ACCURACY` of the exact value), cost is in `currency` (USD) and also exact in
`cost_nanousd`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import msgspec
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from projections import sketch
from projections.metrics import ChatMetricsProjector
from projections.sessions import ChatSessionsProjector
from projections.update import name_of_key

CURRENCY: Final = "USD"
SORT_FIELDS: Final[Mapping[str, str]] = {
    "time": "updated_at",
    "cost": "cost_nanousd",
    "tokens": "total_tokens",
    "duration": "run_duration_ms",
    "created": "created_at",
    "turns": "turns",
}
_COUNTERS: Final = (
    "turns",
    "tool_calls",
    "tool_failures",
    "invalid_outputs",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)
_LLM_COUNTERS: Final = ("count", "failures", "offline", "unpriced")
# Summed as they are; `streamed`, `stream_us_sum` and `stream_tokens` give output tokens/s.
_LLM_SUMS: Final = ("latency_us_sum", "streamed", "stream_us_sum", "stream_tokens")
# The histograms of an `llm` block (merged across chats by adding bucket counts).
_HISTOGRAMS: Final = ("buckets", "ttft_buckets")


class Latency(msgspec.Struct, kw_only=True):
    """LLM call latency in ms; p50/p95 are null when there were no calls."""

    p50: float | None
    p95: float | None
    max: float
    sum: float


class Ttft(msgspec.Struct, kw_only=True):
    """Time to first streamed token in ms; null when no call streamed."""

    p50: float | None = None
    p95: float | None = None


class LlmStats(msgspec.Struct, kw_only=True):
    """LLM calls: how many, how many failed, ran offline, had no price; their latency; streaming speed."""

    count: int
    failures: int
    offline: int
    unpriced: int
    latency_ms: Latency
    ttft_ms: Ttft = msgspec.field(default_factory=Ttft)
    # Completion tokens per second of streaming (first → last token) over the calls that streamed.
    output_tokens_per_s: float | None = None


class AgentMetrics(msgspec.Struct, kw_only=True):
    """One agent's share of a chat (or of all chats)."""

    turns: int
    tool_calls: int
    tool_failures: int
    # Structured-output replies that did not match their schema (`output.invalid`).
    invalid_outputs: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float
    cost_nanousd: int
    llm: LlmStats


class ChatMetrics(AgentMetrics, kw_only=True):
    """One chat's metrics (`GET /metrics/perf/chat/{id}` and the items of the paged list)."""

    chat_id: str
    app_id: str
    user_id: str
    workflow: str
    created_at: datetime | None
    updated_at: datetime | None
    last_seq: int
    currency: str
    runs: int
    running: bool
    duration_s: float
    run_failures: int
    errors: int
    agents: dict[str, AgentMetrics]


class AggregateMetrics(AgentMetrics, kw_only=True):
    """Totals across chats, with percentiles merged from every chat's histogram."""

    chats: int
    currency: str
    runs: int
    duration_s: float
    run_failures: int
    errors: int
    relative_accuracy: float
    agents: dict[str, AgentMetrics]


class ChatMetricsPage(msgspec.Struct, kw_only=True):
    """One page of per-chat metrics."""

    items: list[ChatMetrics]
    total: int
    offset: int
    limit: int
    sort: str
    order: str


# ---- metrics ----------------------------------------------------------------------------------


def _latency(llm: Mapping[str, Any]) -> Latency:
    histogram = llm.get("buckets") or {}
    return Latency(
        p50=sketch.quantile(histogram, 0.50),
        p95=sketch.quantile(histogram, 0.95),
        max=int(llm.get("latency_us_max") or 0) / 1000,
        sum=int(llm.get("latency_us_sum") or 0) / 1000,
    )


def _llm(llm: Mapping[str, Any] | None) -> LlmStats:
    llm = llm or {}
    counts = {key: int(llm.get(key) or 0) for key in _LLM_COUNTERS}
    ttft = llm.get("ttft_buckets") or {}
    stream_us = int(llm.get("stream_us_sum") or 0)
    return LlmStats(
        **counts,
        latency_ms=_latency(llm),
        ttft_ms=Ttft(p50=sketch.quantile(ttft, 0.50), p95=sketch.quantile(ttft, 0.95)),
        output_tokens_per_s=round(int(llm.get("stream_tokens") or 0) * 1e6 / stream_us, 3)
        if stream_us > 0
        else None,
    )


def _agent(doc: Mapping[str, Any]) -> AgentMetrics:
    cost = int(doc.get("cost_nanousd") or 0)
    return AgentMetrics(
        **{key: int(doc.get(key) or 0) for key in _COUNTERS},
        cost=cost / 1e9,
        cost_nanousd=cost,
        llm=_llm(doc.get("llm")),
    )


def _chat(doc: Mapping[str, Any]) -> ChatMetrics:
    agents = {name_of_key(key): _agent(value) for key, value in (doc.get("agents") or {}).items()}
    totals = _agent(doc)
    return ChatMetrics(
        **{field: getattr(totals, field) for field in AgentMetrics.__struct_fields__},
        chat_id=doc["chat_id"],
        app_id=doc.get("app_id", ""),
        user_id=doc.get("user_id", ""),
        workflow=doc.get("workflow", ""),
        created_at=doc.get("created_at"),
        updated_at=doc.get("updated_at"),
        last_seq=int(doc.get("last_seq") or 0),
        currency=CURRENCY,
        runs=int(doc.get("runs") or 0),
        running=doc.get("run") is not None,
        duration_s=int(doc.get("run_duration_ms") or 0) / 1000,
        run_failures=int(doc.get("run_failures") or 0),
        errors=int(doc.get("errors") or 0),
        agents=agents,
    )


def _owner_filter(app_id: str | None, user_id: str | None) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if app_id is not None:
        query["app_id"] = str(app_id)
    if user_id is not None:
        query["user_id"] = str(user_id)
    return query


async def chat_metrics(db: AsyncDatabase[Any], chat_id: str) -> dict[str, Any] | None:
    """One chat's metrics (shape: `ChatMetrics`), or None when the chat is not projected (yet)."""
    doc = await db[ChatMetricsProjector.collection].find_one({"_id": str(chat_id)})
    if doc is None:
        return None
    view: dict[str, Any] = msgspec.to_builtins(_chat(doc), builtin_types=(datetime,))
    return view


async def list_chat_metrics(
    db: AsyncDatabase[Any],
    *,
    app_id: str | None = None,
    user_id: str | None = None,
    sort: str = "time",
    descending: bool = True,
    offset: int = 0,
    limit: int = 50,
) -> dict[str, Any]:
    """A page of per-chat metrics (shape: `ChatMetricsPage`) sorted by time, cost, tokens, duration…"""
    if sort not in SORT_FIELDS:
        raise ValueError(f"cannot sort chat metrics by {sort!r}; use one of {sorted(SORT_FIELDS)}")
    collection = db[ChatMetricsProjector.collection]
    query = _owner_filter(app_id, user_id)
    direction = DESCENDING if descending else ASCENDING
    cursor = collection.find(
        query,
        sort=[(SORT_FIELDS[sort], direction), ("_id", direction)],
        skip=max(offset, 0),
        limit=max(limit, 1),
    )
    items = [_chat(doc) async for doc in cursor]
    total = await collection.count_documents(query)
    page = ChatMetricsPage(
        items=items, total=total, offset=offset, limit=limit, sort=sort, order="desc" if descending else "asc"
    )
    view: dict[str, Any] = msgspec.to_builtins(page, builtin_types=(datetime,))
    return view


async def aggregate_metrics(
    db: AsyncDatabase[Any], *, app_id: str | None = None, user_id: str | None = None
) -> dict[str, Any]:
    """Totals across the matching chats (shape: `AggregateMetrics`), per agent name too.

    Sums and histograms are merged by the server; p50/p95 come from the merged histogram.
    """
    collection = db[ChatMetricsProjector.collection]
    match = {"$match": _owner_filter(app_id, user_id)}
    sums = {
        key: {"$sum": f"${key}"}
        for key in (*_COUNTERS, "cost_nanousd", "runs", "run_duration_ms", "run_failures", "errors")
    }
    llm_sums = {f"llm_{key}": {"$sum": f"$llm.{key}"} for key in (*_LLM_COUNTERS, *_LLM_SUMS)}
    totals_pipeline: list[dict[str, Any]] = [
        match,
        {
            "$group": {
                "_id": None,
                "chats": {"$sum": 1},
                **sums,
                **llm_sums,
                "llm_latency_us_max": {"$max": "$llm.latency_us_max"},
            }
        },
    ]

    def histogram_pipeline(name: str) -> list[dict[str, Any]]:
        return [
            match,
            {"$project": {"b": {"$objectToArray": f"$llm.{name}"}}},
            {"$unwind": "$b"},
            {"$group": {"_id": "$b.k", "n": {"$sum": "$b.v"}}},
        ]

    agent_sums = {key: {"$sum": f"$a.v.{key}"} for key in (*_COUNTERS, "cost_nanousd")}
    agent_llm = {f"llm_{key}": {"$sum": f"$a.v.llm.{key}"} for key in (*_LLM_COUNTERS, *_LLM_SUMS)}
    agents_pipeline: list[dict[str, Any]] = [
        match,
        {"$project": {"a": {"$objectToArray": "$agents"}}},
        {"$unwind": "$a"},
        {
            "$group": {
                "_id": "$a.k",
                **agent_sums,
                **agent_llm,
                "llm_latency_us_max": {"$max": "$a.v.llm.latency_us_max"},
            }
        },
    ]

    def agent_histogram_pipeline(name: str) -> list[dict[str, Any]]:
        return [
            match,
            {"$project": {"a": {"$objectToArray": "$agents"}}},
            {"$unwind": "$a"},
            {"$project": {"agent": "$a.k", "b": {"$objectToArray": f"$a.v.llm.{name}"}}},
            {"$unwind": "$b"},
            {"$group": {"_id": {"agent": "$agent", "k": "$b.k"}, "n": {"$sum": "$b.v"}}},
        ]

    async def rows(pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [row async for row in await collection.aggregate(pipeline)]

    totals_rows, agent_rows, *histogram_rows = await asyncio.gather(
        rows(totals_pipeline),
        rows(agents_pipeline),
        *(rows(histogram_pipeline(name)) for name in _HISTOGRAMS),
        *(rows(agent_histogram_pipeline(name)) for name in _HISTOGRAMS),
    )
    totals = _unflatten(totals_rows[0] if totals_rows else {})
    per_agent = {row["_id"]: _unflatten(row) for row in agent_rows}
    for name, overall_rows, agent_bucket_rows in zip(
        _HISTOGRAMS, histogram_rows[: len(_HISTOGRAMS)], histogram_rows[len(_HISTOGRAMS) :], strict=True
    ):
        totals["llm"][name] = {str(row["_id"]): int(row["n"]) for row in overall_rows}
        for row in agent_bucket_rows:
            agent_llm_doc = per_agent.get(row["_id"]["agent"], {}).get("llm")
            if agent_llm_doc is not None:
                agent_llm_doc.setdefault(name, {})[str(row["_id"]["k"])] = int(row["n"])
    agents = {name_of_key(key): _agent(doc) for key, doc in per_agent.items()}
    overall = _agent(totals)
    view = AggregateMetrics(
        **{field: getattr(overall, field) for field in AgentMetrics.__struct_fields__},
        chats=int(totals.get("chats") or 0),
        currency=CURRENCY,
        runs=int(totals.get("runs") or 0),
        duration_s=int(totals.get("run_duration_ms") or 0) / 1000,
        run_failures=int(totals.get("run_failures") or 0),
        errors=int(totals.get("errors") or 0),
        relative_accuracy=sketch.RELATIVE_ACCURACY,
        agents=agents,
    )
    result: dict[str, Any] = msgspec.to_builtins(view)
    return result


def _unflatten(row: Mapping[str, Any]) -> dict[str, Any]:
    """`llm_x` group outputs back under `llm`, as in a stored document."""
    doc = {key: value for key, value in row.items() if not key.startswith("llm_")}
    doc["llm"] = {key[4:]: value for key, value in row.items() if key.startswith("llm_")}
    return doc


# ---- sessions ---------------------------------------------------------------------------------


def _session(doc: dict[str, Any], visible_only: bool) -> dict[str, Any]:
    doc.pop("_id", None)
    if visible_only and "messages" in doc:
        doc["messages"] = [m for m in doc["messages"] if m.get("visible", True)]
    return doc


async def get_session(
    db: AsyncDatabase[Any], chat_id: str, *, visible_only: bool = False
) -> dict[str, Any] | None:
    """The chat's `chat_sessions` document (without `_id`), or None when it is not projected (yet)."""
    doc = await db[ChatSessionsProjector.collection].find_one({"_id": str(chat_id)})
    return _session(doc, visible_only) if doc is not None else None


async def list_sessions(
    db: AsyncDatabase[Any],
    *,
    app_id: str | None = None,
    user_id: str | None = None,
    offset: int = 0,
    limit: int = 50,
    messages: int = 3,
) -> list[dict[str, Any]]:
    """Session documents, most recently updated first, each with only its first `messages` messages."""
    cursor = db[ChatSessionsProjector.collection].find(
        _owner_filter(app_id, user_id),
        {"messages": {"$slice": max(messages, 0)}},
        sort=[("updated_at", DESCENDING), ("_id", DESCENDING)],
        skip=max(offset, 0),
        limit=max(limit, 1),
    )
    return [_session(doc, False) async for doc in cursor]
