"""Applying records to a projection exactly once, and catching a projection up with the log.

`ProjectionWriter.apply` writes each chat's consecutive new records as one guarded write: an insert
of the folded document for a new chat (the unique `_id` is the guard), else one update filtered on
`last_seq == first seq - 1`. All chats of a batch go in one unordered bulk write. A write that
misses its guard (a duplicate delivery, another runner, a rebuild swap) re-reads the chat's
`last_seq` and retries only what is still missing, reading a gap from the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from pymongo import InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from domain.errors import CorruptRecord
from domain.events import Record
from domain.store import DUPLICATE_KEY, MongoEventStore
from projections.projector import Projector, fold
from projections.update import ProjectionError, Update

log = logging.getLogger(__name__)

MAX_ATTEMPTS: Final = 50
CATCH_UP_EVENTS: Final = 5_000  # events read from the log per catch-up round
CATCH_UP_CHATS: Final = 500

_ABSENT: Final[dict[str, Any]] = {}  # cache marker: the chat has no document (yet)


class _Write(NamedTuple):
    chat_id: str
    operation: InsertOne[Any] | UpdateOne
    records: int
    state: dict[str, Any] | None


class ProjectionWriter:
    """Writes one projector's documents; caches each recent chat's `last_seq` and state fields."""

    def __init__(
        self,
        db: AsyncDatabase[Any],
        store: MongoEventStore,
        projector: Projector,
        *,
        collection: str | None = None,
        cache_size: int = 10_000,
    ) -> None:
        self.projector = projector
        self.store = store
        self.collection: AsyncCollection[Any] = db.get_collection(collection or projector.collection)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # chat_id -> first seq that could not be read from the log (a corrupt or missing record).
        self.stuck: dict[str, int] = {}
        # Records delivered again after they were applied (a resumed stream, another runner): ignored.
        self.duplicates = 0

    async def ensure_indexes(self) -> None:
        """Create the projector's indexes (idempotent)."""
        if self.projector.indexes:
            await self.collection.create_indexes(list(self.projector.indexes))

    async def apply(self, by_chat: Mapping[str, Sequence[Record]]) -> int:
        """Apply each chat's records (any order, repeats allowed); returns how many were newly applied.

        A chat whose `last_seq` is not cached is written optimistically, guarded on the seq before
        its first record (the usual case when tailing), unless one of its records needs the
        projector's state; only a missed guard makes the writer read the chat's `last_seq`.
        """
        pending: dict[str, list[Record]] = {}
        for chat_id, records in by_chat.items():
            unique = {record.seq: record for record in records}
            pending[chat_id] = [unique[seq] for seq in sorted(unique)]
        applied = 0
        must_read: set[str] = set()
        counted: set[str] = set()  # chats whose repeats are counted (once, when their last_seq is known)
        for _ in range(MAX_ATTEMPTS):
            await self._load_states(
                [
                    c
                    for c in pending
                    if c not in self._cache and (c in must_read or self._needs_state(pending[c]))
                ]
            )
            writes: list[_Write] = []
            for chat_id, records in list(pending.items()):
                state = self._cache.get(chat_id)  # None: not known, write optimistically
                if state is None:
                    last = records[0].seq - 1
                else:
                    last = int(state["last_seq"]) if state is not _ABSENT else 0
                todo = [record for record in records if record.seq > last]
                if state is not None and chat_id not in counted:
                    # Known on the first attempt, or only after an optimistic write missed its guard
                    # (a resumed stream delivering a batch again to a writer that had not cached it).
                    counted.add(chat_id)
                    self.duplicates += len(records) - len(todo)
                if todo and (todo[0].seq != last + 1 or todo[-1].seq - last != len(todo)):
                    # A gap (lost, delayed or reordered delivery): the log has what is missing.
                    todo = await self._from_log(chat_id, last, todo[-1].seq)
                    pending[chat_id] = todo
                if todo:
                    writes.append(self._plan(chat_id, state, todo))
            if not writes:
                return applied
            failed = await self._write(writes)
            for write in writes:
                if write.chat_id in failed:
                    self._cache.pop(write.chat_id, None)
                else:
                    self._remember(write.chat_id, write.state)
                    applied += write.records
            if not failed:
                return applied
            must_read |= failed
            pending = {chat_id: pending[chat_id] for chat_id in failed}
        raise ProjectionError(
            f"{self.projector.name}: chats {sorted(pending)[:5]} kept missing their last_seq guard "
            f"after {MAX_ATTEMPTS} attempts"
        )

    def _needs_state(self, records: Sequence[Record]) -> bool:
        return bool(self.projector.state_fields) and any(
            r.type in self.projector.state_types for r in records
        )

    def _plan(self, chat_id: str, state: dict[str, Any] | None, records: list[Record]) -> _Write:
        """The write of `records`; `state` is the cached state, _ABSENT (no document) or None (unknown)."""
        if state is _ABSENT or (state is None and records[0].seq == 1):
            doc = fold(self.projector, None, records)
            return _Write(chat_id, InsertOne(doc), len(records), self.projector.state_of(doc))
        known = state is not None or not self.projector.state_fields
        current = self.projector.state_of(state if state is not None else {"last_seq": records[0].seq - 1})
        merged = Update()
        for record in records:
            change = self.projector.step(current, record)
            if change is not None:
                change.apply(current)
                merged.merge(change)
            current = self.projector.state_of({**current, "last_seq": record.seq})
        guard = {"_id": chat_id, "last_seq": records[0].seq - 1}
        # An optimistic write leaves a stateful projector's state unknown: it is read when needed.
        operation = UpdateOne(guard, merged.document(records[-1].seq))
        return _Write(chat_id, operation, len(records), current if known else None)

    async def _write(self, writes: list[_Write]) -> set[str]:
        """One unordered bulk write; returns the chats whose write may not have landed."""
        try:
            result = await self.collection.bulk_write([w.operation for w in writes], ordered=False)
            matched, errors = result.matched_count, []
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != DUPLICATE_KEY for error in errors):
                raise
            matched = int(exc.details.get("nMatched", 0))
        failed = {writes[error["index"]].chat_id for error in errors}
        updates = [w.chat_id for w in writes if isinstance(w.operation, UpdateOne)]
        if matched < len(updates):
            # Unordered bulk results do not say which update missed its guard: re-check them all.
            failed.update(updates)
        return failed

    async def _load_states(self, chat_ids: list[str]) -> None:
        if not chat_ids:
            return
        fields = {"last_seq": 1, **dict.fromkeys(self.projector.state_fields, 1)}
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(chat_ids), 1000):
            async for doc in self.collection.find({"_id": {"$in": chat_ids[start : start + 1000]}}, fields):
                found[doc["_id"]] = self.projector.state_of(doc)
        for chat_id in chat_ids:
            self._remember(chat_id, found.get(chat_id, _ABSENT))

    def _remember(self, chat_id: str, state: dict[str, Any] | None) -> None:
        if state is None:
            self._cache.pop(chat_id, None)
            return
        self._cache[chat_id] = state
        self._cache.move_to_end(chat_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _from_log(self, chat_id: str, after: int, upto: int) -> list[Record]:
        """The chat's records after `after` through `upto`, stopping before a corrupt or missing one."""
        records: list[Record] = []
        try:
            async for record in self.store.read(chat_id, after=after, limit=upto - after):
                if record.seq != after + len(records) + 1:
                    break
                records.append(record)
        except CorruptRecord as exc:
            log.error("projection %s stops at chat %s: %s", self.projector.name, chat_id, exc)
        if len(records) < upto - after:
            self.stuck[chat_id] = after + len(records) + 1
        return records


# ---- catching up with the log -------------------------------------------------------------------


async def positions(
    collection: AsyncCollection[Any], chat_ids: Iterable[str] | None = None
) -> dict[str, int]:
    """Each projected chat's `last_seq`."""
    query: dict[str, Any] = {} if chat_ids is None else {"_id": {"$in": list(chat_ids)}}
    return {doc["_id"]: int(doc.get("last_seq", 0)) async for doc in collection.find(query, {"last_seq": 1})}


async def behind(
    store: MongoEventStore, writers: Sequence[ProjectionWriter], chat_ids: Iterable[str] | None = None
) -> dict[str, tuple[int, int]]:
    """Chats some projection is behind on: chat_id -> (lowest projected last_seq, log head).

    Costs O(chats), never a pass over the log: the chats are `chat_ids`, else every chat of the
    log (`store.chats()`) or of a projection, and `store.heads_after` looks each one up at its
    lowest projected position.
    """
    wanted = list(chat_ids) if chat_ids is not None else None
    projected = [await positions(writer.collection, wanted) for writer in writers]
    if wanted is None:
        wanted = sorted(set(await store.chats()).union(*projected))
    lowest = {chat_id: min((at.get(chat_id, 0) for at in projected), default=0) for chat_id in wanted}
    heads = await store.heads_after(lowest)
    return {chat_id: (lowest[chat_id], head) for chat_id, head in heads.items()}


CatchUpProgress = Callable[[int, int], None]


async def catch_up(
    store: MongoEventStore,
    writers: Sequence[ProjectionWriter],
    chat_ids: Iterable[str] | None = None,
    progress: CatchUpProgress | None = None,
) -> int:
    """Bring every projection up to the log for all chats (or `chat_ids`); returns events read."""
    lagging = await behind(store, writers, chat_ids)
    total = sum(head - at for at, head in lagging.values())
    done = 0
    async for chunk, broken in _read_chunks(store, lagging):
        for writer in writers:
            writer.projector.refresh()
            writer.stuck.update(broken)
        await asyncio.gather(*(writer.apply(chunk) for writer in writers))
        done += sum(len(records) for records in chunk.values())
        if progress is not None:
            progress(done, total)
    return done


Chunk = tuple[dict[str, list[Record]], dict[str, int]]


async def _read_chunks(
    store: MongoEventStore, lagging: Mapping[str, tuple[int, int]]
) -> AsyncIterator[Chunk]:
    group: list[tuple[str, int]] = []
    size = 0
    for chat_id, (at, head) in sorted(lagging.items()):
        group.append((chat_id, at))
        size += head - at
        if size >= CATCH_UP_EVENTS or len(group) >= CATCH_UP_CHATS:
            yield await _read_after(store, group)
            group, size = [], 0
    if group:
        yield await _read_after(store, group)


async def _read_after(store: MongoEventStore, group: list[tuple[str, int]]) -> Chunk:
    """The group's records after each chat's position; a chat stops before a corrupt record (`broken`)."""
    chunk: dict[str, list[Record]] = {}
    broken: dict[str, int] = {}
    async for item in store.scan(positions=group):
        if item.chat_id in broken:
            continue
        if isinstance(item, CorruptRecord):
            log.error("catch-up stops at chat %s: %s", item.chat_id, item)
            broken[item.chat_id] = item.seq if isinstance(item.seq, int) else 0
            continue
        chunk.setdefault(item.chat_id, []).append(item)
    return chunk, broken
