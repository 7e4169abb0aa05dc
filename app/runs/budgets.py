"""Budgets at run time: the spend a node knows, checked before each model call.

Spend per chat comes from the chat's own log (read at run start anyway) plus this run's calls; the
spend of an app or a user on a UTC day comes from the `chat_spend` projection, read when a run
starts (never per model call), corrected by what this node itself knows better:

    spend(app, day) = projected total + sum over chats this node ran of (known spend - projected spend)

A chat's known spend is exact (its log up to the run's start, then every call the run made, counted
when the call returns), so a projection that lags behind is never counted twice nor missed. A
model call is made only while every limit is under its maximum: calls already in flight when
the limit is crossed still finish, so concurrent runs overshoot a limit by at most the calls in
flight (on one node: one per running agent; across nodes, plus what the projection has not seen).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from prometheus_client import Counter
from pymongo.asynchronous.database import AsyncDatabase

from app.runs.clients import LlmCallNote
from app.settings import Settings
from domain.budgets import (
    APP_DAY,
    CHAT,
    USER_DAY,
    BudgetsFile,
    Exceeded,
    Spend,
    day_end,
    decode_budgets,
    reached,
    utc_day,
)
from domain.errors import MozaiksError
from domain.events import LlmCall, Record, StreamRef, now
from domain.manifest import Budget
from projections.budgets import ChatSpendProjector, call_spend, chat_docs, day_spend, spend_of
from projections.prices import PriceTable

# Runs starting within this many seconds of a read share it (their chats have spent nothing today):
# the daily sums cost no database operation per model call, however many chats start.
REFRESH_S = 1.0
BUDGET_STOPS = Counter("mozaiks_budget_stops_total", "Runs stopped by a budget, by limit kind", ["kind"])

# (kind, app_id, user_id or "", day)
Key = tuple[str, str, str, str]


class BudgetReached(MozaiksError):
    """A limit was reached before a model call: the call is not made, the run stops (reason budget)."""

    def __init__(self, exceeded: Exceeded) -> None:
        self.exceeded = exceeded
        super().__init__(exceeded.describe())


class _Daily(msgspec.Struct, kw_only=True):
    """One app's or user's spend on one day, as this node knows it."""

    projected_total: Spend = Spend()
    # time.monotonic() of the last read of the projection
    refreshed: float = 0.0
    # chat -> (projected spend that day, the spend this node knows of it that day)
    chats: dict[str, tuple[Spend, Spend]] = {}

    def spend(self) -> Spend:
        total = self.projected_total
        for projected, known in self.chats.values():
            total = total + known - projected
        return total


class BudgetBook:
    """A node's budget state: the budgets file, the price table, and the daily spend it tracks."""

    def __init__(self, db: AsyncDatabase[Any], settings: Settings, file: BudgetsFile | None = None) -> None:
        self.db = db
        self.file = file
        if file is None and settings.budgets_path is not None:
            self.file = decode_budgets(settings.budgets_path.read_bytes(), str(settings.budgets_path))
        self.pricing = ChatSpendProjector(PriceTable.load(settings.prices_path))
        self.lock = threading.Lock()
        self.daily: dict[Key, _Daily] = {}
        # Reads of the projection in flight, by key (one at a time is enough for chats new today).
        self.reading: dict[Key, asyncio.Future[None]] = {}

    def limits(self, stream: StreamRef) -> tuple[Budget | None, Budget | None]:
        """(app daily, user daily) limits of this chat's app and user."""
        return self.file.daily(stream.app_id, stream.user_id) if self.file is not None else (None, None)

    def keys(self, stream: StreamRef, day: str) -> list[tuple[Key, Budget]]:
        app, user = self.limits(stream)
        keys: list[tuple[Key, Budget]] = []
        if app is not None:
            keys.append(((APP_DAY, stream.app_id, "", day), app))
        if user is not None:
            keys.append(((USER_DAY, stream.app_id, stream.user_id, day), user))
        return keys

    async def refresh(self, key: Key, chat_id: str | None, known: Spend | None) -> None:
        """Read the projected spend of `key` (and of the chats tracked under it); `chat_id` spent `known` that day.

        A chat with no spend today has none projected either: it shares a read made less than
        REFRESH_S ago, or one in flight, instead of reading again (many chats starting at once).
        """
        if chat_id is not None and known == Spend():
            with self.lock:
                entry = self.daily.get(key)
                if entry is not None and time.monotonic() - entry.refreshed < REFRESH_S:
                    entry.chats.setdefault(chat_id, (Spend(), Spend()))
                    return
            reading = self.reading.get(key)
            if reading is not None:
                await asyncio.shield(reading)
                with self.lock:
                    self.daily.setdefault(key, _Daily()).chats.setdefault(chat_id, (Spend(), Spend()))
                return
        task = asyncio.ensure_future(self.read(key, chat_id, known))
        self.reading[key] = task
        try:
            await asyncio.shield(task)
        finally:
            if self.reading.get(key) is task:
                del self.reading[key]

    async def read(self, key: Key, chat_id: str | None, known: Spend | None) -> None:
        """The read of `refresh`."""
        _, app, user, day = key
        with self.lock:
            entry = self.daily.get(key)
            tracked = set(entry.chats) if entry is not None else set()
        if chat_id is not None:
            tracked.add(chat_id)
        total, shares = await day_spend(self.db, app, user or None, day, tracked)
        with self.lock:
            entry = self.daily.setdefault(key, _Daily())
            entry.projected_total = total
            entry.refreshed = time.monotonic()
            # Chats other runs added while this read was going keep their entries as they are.
            for chat in tracked:
                projected = shares.get(chat, Spend())
                if chat == chat_id and known is not None:
                    entry.chats[chat] = (projected, known)
                else:
                    entry.chats[chat] = (projected, entry.chats.get(chat, (projected, projected))[1])

    def add(self, key: Key, chat_id: str, spend: Spend) -> None:
        """A call of `chat_id` under `key` spent `spend` (from the call's own report, any thread)."""
        with self.lock:
            entry = self.daily.setdefault(key, _Daily())
            projected, known = entry.chats.get(chat_id, (Spend(), Spend()))
            entry.chats[chat_id] = (projected, known + spend)

    def spend(self, key: Key) -> Spend:
        with self.lock:
            entry = self.daily.get(key)
            return entry.spend() if entry is not None else Spend()

    def history_spend(self, history: list[Record], day: str | None = None) -> Spend:
        """What a chat's recorded calls spent (on `day`, or in all)."""
        total = Spend()
        for record in history:
            if record.type == "llm.call" and (day is None or utc_day(record.ts) == day):
                call = record.event
                assert isinstance(call, LlmCall)
                total = total + call_spend(self.pricing, record, call)
        return total

    async def open(self, stream: StreamRef, budget: Budget | None, history: list[Record]) -> RunBudget | None:
        """The budget of a run starting now (None when no limit applies): one read per daily limit."""
        day = utc_day(datetime.now(UTC))
        keys = self.keys(stream, day)
        if budget is None and not keys:
            return None
        today = self.history_spend(history, day)
        for key, _ in keys:
            await self.refresh(key, stream.chat_id, today)
        return RunBudget(self, stream, budget, self.history_spend(history), asyncio.get_running_loop())

    async def over(self, stream: StreamRef, budget: Budget | None) -> Exceeded | None:
        """Whether a new message to this chat would be refused (a limit is reached), read fresh."""
        day = utc_day(datetime.now(UTC))
        for key, limit in self.keys(stream, day):
            await self.refresh(key, None, None)
            found = reached(key[0], limit, self.spend(key), day_end(day).isoformat())
            if found is not None:
                return found
        if budget is not None:
            docs = await chat_docs(self.db, [stream.chat_id])
            projected = spend_of(docs.get(stream.chat_id))
            with self.lock:
                known = max(
                    (
                        entry.chats[stream.chat_id][1]
                        for entry in self.daily.values()
                        if stream.chat_id in entry.chats
                    ),
                    key=lambda s: s.tokens,
                    default=Spend(),
                )
            chat = projected if projected.tokens >= known.tokens else known
            return reached(CHAT, budget, chat)
        return None


class RunBudget:
    """One run's limits and the spend they are checked against, before each of its model calls."""

    def __init__(
        self,
        book: BudgetBook,
        stream: StreamRef,
        budget: Budget | None,
        chat_spend: Spend,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.book = book
        self.stream = stream
        self.budget = budget
        self.chat_spend = chat_spend
        self.loop = loop
        self.lock = threading.Lock()
        self.on_reached: Callable[[Exceeded], None] | None = None

    def check(self, agent: str) -> None:
        """Before a model call (AG2's worker thread): raise BudgetReached when a limit is reached."""
        with self.lock:
            found = reached(CHAT, self.budget, self.chat_spend)
        if found is None:
            day = utc_day(datetime.now(UTC))
            for key, limit in self.book.keys(self.stream, day):
                if key not in self.book.daily:  # a new UTC day: read its spend once
                    asyncio.run_coroutine_threadsafe(
                        self.book.refresh(key, self.stream.chat_id, Spend()), self.loop
                    ).result()
                found = reached(key[0], limit, self.book.spend(key), day_end(day).isoformat())
                if found is not None:
                    break
        if found is not None:
            if self.on_reached is not None:
                self.loop.call_soon_threadsafe(self.on_reached, found)
            raise BudgetReached(found)

    def spent(self, note: LlmCallNote) -> None:
        """A call returned (any thread): count what it spent at once, before the next check."""
        call = note.call
        cost = (
            0
            if call.offline
            else self.book.pricing.prices.cost_nanousd(
                call.model, call.prompt_tokens, call.completion_tokens, now()
            )
        )
        spend = Spend(tokens=call.prompt_tokens + call.completion_tokens, cost_nanousd=cost or 0)
        with self.lock:
            self.chat_spend = self.chat_spend + spend
        for key, _ in self.book.keys(self.stream, utc_day(datetime.now(UTC))):
            self.book.add(key, self.stream.chat_id, spend)


def count_stop(exceeded: Exceeded) -> None:
    """The Prometheus counter of budget stops, by limit kind."""
    BUDGET_STOPS.labels(exceeded.kind).inc()
