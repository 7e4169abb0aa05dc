"""Rebuild projections from the log: fold every chat in memory, then replace each chat's document.

Safe while the service runs: each chat's document is replaced atomically by one computed from the
log, and documents of chats the log does not have are removed. Afterwards a catch-up applies
(guarded by `last_seq`) every event appended while the rebuild ran, and the live runner's own guard
sends it to the log for any chat whose new document is behind what it had cached. With `chat_id`,
only that chat's documents are recomputed and replaced, then caught up the same way.

Why not build a new collection and `renameCollection` it over the live one: on the embedded
SecantusDB server (0.7.0b3) a rename whose target is being written concurrently livelocks the
whole server (seen in the suite: the rename spins inside WiredTiger and every client waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
from pymongo import ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from domain.errors import CorruptRecord
from domain.store import Appends, MongoEventStore
from projections.buckets import MetricsBucketsProjector
from projections.budgets import ChatSpendProjector
from projections.heads import ChainHeadsProjector
from projections.metrics import ChatMetricsProjector
from projections.prices import PriceTable
from projections.projector import Projector, apply_record
from projections.sessions import ChatSessionsProjector
from projections.writer import ProjectionWriter, catch_up

log = logging.getLogger(__name__)

PROJECTION_NAMES: Final = (
    ChatSessionsProjector.name,
    ChatMetricsProjector.name,
    MetricsBucketsProjector.name,
    ChainHeadsProjector.name,
    ChatSpendProjector.name,
)
WRITE_BATCH: Final = 500  # documents per bulk replace into a projection collection
PROGRESS_EVERY: Final = 1000  # events between progress callbacks

Progress = Callable[[int, int], None]


class RebuildSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What a rebuild did."""

    names: list[str]
    chat_id: str | None
    chats: int
    events: int
    seconds: float
    events_per_s: float
    # Events appended while the rebuild ran, applied after the swap.
    caught_up_after_swap: int
    # chat_id -> first seq that could not be read (corrupt or missing): its projection stops before it.
    broken_chats: dict[str, int]


class UnknownProjection(ValueError):
    """A rebuild was asked for a projection that does not exist."""


def select_projectors(
    names: Iterable[str] | None, prices: PriceTable | Path | None = None
) -> list[Projector]:
    """The projectors called `names` (default: all), metrics costed with `prices` (a table or its file)."""
    wanted = list(names) if names else list(PROJECTION_NAMES)
    unknown = [name for name in wanted if name not in PROJECTION_NAMES]
    if unknown:
        raise UnknownProjection(f"unknown projection(s) {unknown}; known: {list(PROJECTION_NAMES)}")
    table = prices if isinstance(prices, PriceTable) else PriceTable.load(prices)
    available: dict[str, Projector] = {
        ChatSessionsProjector.name: ChatSessionsProjector(),
        ChatMetricsProjector.name: ChatMetricsProjector(table),
        MetricsBucketsProjector.name: MetricsBucketsProjector(table),
        ChainHeadsProjector.name: ChainHeadsProjector(),
        ChatSpendProjector.name: ChatSpendProjector(table),
    }
    return [available[name] for name in PROJECTION_NAMES if name in wanted]


async def rebuild(
    db: AsyncDatabase[Any],
    store: MongoEventStore,
    names: Iterable[str] | None = None,
    chat_id: str | None = None,
    progress: Progress | None = None,
    *,
    prices: PriceTable | Path | None = None,
) -> RebuildSummary:
    """Recompute projections `names` (default all) from the log, for every chat or just `chat_id`.

    `progress(done, total)` is called as events are folded; `prices` is the table (or its file)
    metrics are costed with, by default the shipped table.
    """
    projectors = select_projectors(names, prices)
    started = time.perf_counter()
    touched: set[str] | None = {chat_id} if chat_id is not None else None
    if chat_id is None:
        # Opened before the scan: it names every chat that gets events while the rebuild runs.
        async with store.appends(max_await_time_ms=50) as appended:
            total = await store.count()
            chats, events, broken = await _rebuild_all(db, store, projectors, total, progress)
            touched = await _chats_appended(appended)
    else:
        total = await store.count(chat_id)
        chats, events, broken = await _rebuild_chat(db, store, projectors, chat_id, total, progress)
    writers = [ProjectionWriter(db, store, projector) for projector in projectors]
    late = await catch_up(store, writers, chat_ids=touched) if touched is None or touched else 0
    seconds = time.perf_counter() - started
    return RebuildSummary(
        names=[p.name for p in projectors],
        chat_id=chat_id,
        chats=chats,
        events=events,
        seconds=round(seconds, 3),
        events_per_s=round(events / seconds, 1) if seconds > 0 else 0.0,
        caught_up_after_swap=late,
        broken_chats=broken,
    )


async def _chats_appended(appended: Appends) -> set[str] | None:
    """The chats the stream saw events of until now; None (meaning: check all) if it failed."""
    try:
        return await appended.chats()
    except PyMongoError as exc:
        log.warning("rebuild: change stream lost (%s); checking every chat against the log", exc)
        return None


class _Folded(msgspec.Struct):
    chat_id: str
    docs: list[dict[str, Any] | None]
    broken_at: int = 0


async def _fold_log(
    store: MongoEventStore,
    projectors: Sequence[Projector],
    chat_id: str | None,
    counted: Callable[[], None],
) -> AsyncGenerator[_Folded, None]:
    """Each chat's folded documents, reading the log (or one chat) once in (chat_id, seq) order."""
    current: _Folded | None = None
    scan = store.scan(chat_id)
    async with contextlib.aclosing(scan):  # stops the store's prefetching when folding stops early
        async for record in scan:
            if current is None or record.chat_id != current.chat_id:
                if current is not None:
                    yield current
                current = _Folded(record.chat_id, [None] * len(projectors))
            if current.broken_at:
                continue
            expected = (current.docs[0]["last_seq"] if current.docs[0] is not None else 0) + 1
            if isinstance(record, CorruptRecord):
                log.error("rebuild stops at chat %s: %s", record.chat_id, record)
                current.broken_at = expected
                continue
            if record.seq != expected:
                log.error(
                    "rebuild stops at chat %s: seq %d is missing from the log", record.chat_id, expected
                )
                current.broken_at = expected
                continue
            event = record.event
            for index, projector in enumerate(projectors):
                current.docs[index] = apply_record(projector, current.docs[index], record, event)
            counted()
    if current is not None:
        yield current


class _Counter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done = 0
        self.total = total
        self.progress = progress

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None and self.done % PROGRESS_EVERY == 0:
            self.progress(self.done, max(self.total, self.done))

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.done)


async def _rebuild_all(
    db: AsyncDatabase[Any],
    store: MongoEventStore,
    projectors: Sequence[Projector],
    total: int,
    progress: Progress | None,
) -> tuple[int, int, dict[str, int]]:
    targets = [db.get_collection(p.collection) for p in projectors]
    for projector, target in zip(projectors, targets, strict=True):
        if projector.indexes:
            await target.create_indexes(list(projector.indexes))
    counter = _Counter(total, progress)
    buffers: list[list[dict[str, Any]]] = [[] for _ in projectors]
    writing: asyncio.Future[Any] | None = None
    chats = 0
    rebuilt: set[str] = set()
    broken: dict[str, int] = {}

    async def flush() -> None:
        nonlocal writing, buffers
        if writing is not None:
            await writing  # one batch in flight while the next is folded
        batches, buffers = buffers, [[] for _ in projectors]
        writing = asyncio.gather(
            *(
                target.bulk_write(
                    [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs], ordered=False
                )
                for target, docs in zip(targets, batches, strict=True)
                if docs
            )
        )

    folding = _fold_log(store, projectors, None, counter)
    try:
        async for folded in folding:
            if folded.broken_at:
                broken[folded.chat_id] = folded.broken_at
            if folded.docs[0] is None:
                continue
            chats += 1
            rebuilt.add(folded.chat_id)
            for buffer, doc in zip(buffers, folded.docs, strict=True):
                assert doc is not None
                buffer.append(doc)
            if len(buffers[0]) >= WRITE_BATCH:
                await flush()
        await flush()
        if writing is not None:
            await writing
        counter.finish()
        for target in targets:
            await _remove_others(target, rebuilt)
    except BaseException:
        await folding.aclose()
        if writing is not None:
            writing.cancel()
        raise
    return chats, counter.done, broken


async def _remove_others(collection: AsyncCollection[Any], keep: set[str]) -> None:
    """Delete the documents of chats the rebuild did not produce (the log has no events for them)."""
    stale = [doc["_id"] async for doc in collection.find({}, {"_id": 1}) if doc["_id"] not in keep]
    for start in range(0, len(stale), WRITE_BATCH):
        await collection.delete_many({"_id": {"$in": stale[start : start + WRITE_BATCH]}})


async def _rebuild_chat(
    db: AsyncDatabase[Any],
    store: MongoEventStore,
    projectors: Sequence[Projector],
    chat_id: str,
    total: int,
    progress: Progress | None,
) -> tuple[int, int, dict[str, int]]:
    counter = _Counter(total, progress)
    chats = [folded async for folded in _fold_log(store, projectors, chat_id, counter)]
    folded = chats[0] if chats else None
    counter.finish()
    for index, projector in enumerate(projectors):
        collection = db.get_collection(projector.collection)
        doc = folded.docs[index] if folded is not None else None
        if doc is None:
            await collection.delete_one({"_id": chat_id})
        else:
            await collection.replace_one({"_id": chat_id}, doc, upsert=True)
    broken = {chat_id: folded.broken_at} if folded is not None and folded.broken_at else {}
    return int(folded is not None and folded.docs[0] is not None), counter.done, broken
