"""The app-wide audit read: filtered records of many chats, in a stable order, paged by an opaque cursor.

Order: by `(ts, chat_id, seq)`, which is time order and, within a chat, seq order (a chat's
records are sealed in seq order, so their `ts` never decreases). Filtering by one chat or one run
reads that chat in seq order instead (the same order for a single chat). Every plan names the
index it reads (`hint`), an index whose keys end with the sort keys, so the server streams the
range in index order and never scans the collection.

The cursor is the `(ts, chat_id, seq)` of the last record returned, a key no two records share:
a page after it repeats nothing, and every record stored before paging began is returned exactly
once, however many records are appended meanwhile (they sort after it, or are reached later).
"""

from __future__ import annotations

import base64
import binascii
import heapq
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import msgspec
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from domain.anchors import Anchor, AnchorBook, AnchorScan, judge
from domain.chain import ChainCheck, Verification
from domain.errors import MozaiksError

TIME_ORDER: Final = [("ts", ASCENDING), ("chat_id", ASCENDING), ("seq", ASCENDING)]
CHAT_ORDER: Final = [("chat_id", ASCENDING), ("seq", ASCENDING)]
CHAT_INDEX: Final = "chat_seq"  # the log's unique (chat_id, seq) index, created by the store


def _time_index(name: str, *prefix: str) -> IndexModel:
    return IndexModel([*((field, ASCENDING) for field in prefix), *TIME_ORDER], name=name)


# One index per documented filter, each ending with the sort keys (see the module docstring).
AUDIT_INDEXES: Final = (
    _time_index("app_time", "app_id"),
    _time_index("app_type_time", "app_id", "type"),
    _time_index("app_agent_time", "app_id", "agent"),
    _time_index("app_user_time", "app_id", "user_id"),
    _time_index("app_workflow_time", "app_id", "workflow"),
    IndexModel([("run_id", ASCENDING), *CHAT_ORDER], name="run_chat_seq"),
)
# Which index serves a time-ordered query, by the first filter present (most selective first).
_TIME_INDEX_BY_FILTER: Final = (
    ("types", "app_type_time"),
    ("agent", "app_agent_time"),
    ("user_id", "app_user_time"),
    ("workflow", "app_workflow_time"),
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class BadCursor(MozaiksError):
    """A cursor that this server did not issue (or that was cut or edited)."""


class AuditFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What to read; every field given must match (types: any of them). `until` is exclusive."""

    app_id: str | None = None
    types: tuple[str, ...] = ()
    agent: str | None = None
    workflow: str | None = None
    user_id: str | None = None
    chat_id: str | None = None
    run_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    visible: bool | None = None


class Position(msgspec.Struct, frozen=True, array_like=True):
    """Where a page ended: the sort key of its last record."""

    ts_ms: int
    chat_id: str
    seq: int

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Position:
        """The position of a stored document."""
        return cls(_ms(doc["ts"]), str(doc["chat_id"]), int(doc["seq"]))

    @property
    def ts(self) -> datetime:
        """The position's timestamp (exact: stored times have millisecond precision)."""
        return _EPOCH + timedelta(milliseconds=self.ts_ms)

    def encode(self) -> str:
        """The opaque cursor text."""
        return base64.urlsafe_b64encode(_position_json.encode(self)).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Position:
        """Parse a cursor; raises BadCursor naming the problem."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            position = _position_json_decoder.decode(raw)
            if not 0 <= position.seq < 2**62:
                raise ValueError("seq out of range")
            _ = position.ts  # in datetime's range
            return position
        except (binascii.Error, ValueError, OverflowError, msgspec.DecodeError):
            raise BadCursor(
                f"cursor {text[:40]!r} is not one this server issued; start again without it"
            ) from None


_position_json = msgspec.json.Encoder()
_position_json_decoder = msgspec.json.Decoder(Position)


def _aware(ts: datetime) -> datetime:
    """A time without a zone is UTC (as BSON stores it)."""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _ms(ts: datetime) -> int:
    return (_aware(ts) - _EPOCH) // timedelta(milliseconds=1)


class Plan(NamedTuple):
    """One server query: filter, sort, and the index it must use."""

    query: dict[str, Any]
    sort: list[tuple[str, int]]
    hint: str


def plans(f: AuditFilter, after: Position | None = None) -> list[Plan]:
    """The queries that answer `f` after `after`: one, or one per type when several are asked for.

    Several types in one time-ordered query would make the server merge index ranges or sort in
    memory; separate queries, merged here, stream each range in index order.
    """
    time_ordered = f.chat_id is None and f.run_id is None and f.app_id is not None
    if time_ordered and len(f.types) > 1:
        return [_plan(msgspec.structs.replace(f, types=(t,)), after, time_ordered) for t in f.types]
    return [_plan(f, after, time_ordered)]


def _plan(f: AuditFilter, after: Position | None, time_ordered: bool) -> Plan:
    query: dict[str, Any] = {}
    for field in ("app_id", "agent", "workflow", "user_id", "chat_id", "run_id"):
        value = getattr(f, field)
        if value is not None:
            query[field] = str(value)  # always a plain value, never a query operator
    if len(f.types) == 1:
        query["type"] = str(f.types[0])
    elif f.types:
        query["type"] = {"$in": [str(t) for t in f.types]}
    if f.visible is not None:
        query["visible"] = bool(f.visible)
    window: dict[str, datetime] = {}
    if f.since is not None:
        window["$gte"] = _aware(f.since)
    if f.until is not None:
        window["$lt"] = _aware(f.until)
    if time_ordered:
        if after is not None:
            since = window.get("$gte")
            window["$gte"] = after.ts if since is None or after.ts > since else since
            query["$or"] = [
                {"ts": {"$gt": after.ts}},
                {"chat_id": {"$gt": after.chat_id}},
                {"chat_id": after.chat_id, "seq": {"$gt": after.seq}},
            ]
        if window:
            query["ts"] = window
        hint = next((index for field, index in _TIME_INDEX_BY_FILTER if getattr(f, field)), "app_time")
        return Plan(query, list(TIME_ORDER), hint)
    if window:
        query["ts"] = window
    if after is not None:
        if f.chat_id is not None:
            # One chat: the page goes on after the cursor's seq, or is empty past that chat.
            query["seq"] = {
                "$gt": after.seq
                if after.chat_id == f.chat_id
                else (0 if after.chat_id < f.chat_id else 2**62)
            }
        else:
            query["chat_id"] = {"$gte": after.chat_id}
            query["$or"] = [{"chat_id": {"$gt": after.chat_id}}, {"seq": {"$gt": after.seq}}]
    hint = "run_chat_seq" if f.run_id is not None and f.chat_id is None else CHAT_INDEX
    return Plan(query, list(CHAT_ORDER), hint)


def _sort_key(doc: Mapping[str, Any]) -> tuple[datetime, str, int]:
    ts: datetime = doc["ts"]
    return (ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC), str(doc["chat_id"]), int(doc["seq"]))


async def find_records(
    events: AsyncCollection[Any],
    f: AuditFilter,
    *,
    after: Position | None = None,
    limit: int | None = None,
    batch_size: int = 1000,
) -> AsyncIterator[dict[str, Any]]:
    """The stored documents matching `f` after `after`, in order, at most `limit`; streamed in batches."""
    queries = plans(f, after)
    cursors = [
        events.find(plan.query, sort=plan.sort, hint=plan.hint, batch_size=batch_size, limit=limit or 0)
        for plan in queries
    ]
    try:
        if len(cursors) == 1:
            async for doc in cursors[0]:
                yield doc
            return
        count = 0
        async for doc in _merge(cursors):
            yield doc
            count += 1
            if limit is not None and count >= limit:
                return
    finally:
        for cursor in cursors:
            await cursor.close()


async def _merge(cursors: Sequence[Any]) -> AsyncIterator[dict[str, Any]]:
    """Merge cursors that are each in TIME_ORDER into one sequence in TIME_ORDER."""
    heap: list[tuple[tuple[datetime, str, int], int, dict[str, Any]]] = []
    for index, cursor in enumerate(cursors):
        first = await anext(cursor, None)
        if first is not None:
            heap.append((_sort_key(first), index, first))
    heapq.heapify(heap)
    while heap:
        _, index, doc = heap[0]
        yield doc
        following = await anext(cursors[index], None)
        if following is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (_sort_key(following), index, following))


# ---- verifying the whole log ---------------------------------------------------------------------


class LogVerification(msgspec.Struct, kw_only=True):
    """Result of checking every chat's chain (and its tail anchor) in the log or one app."""

    app_id: str | None
    chats: int
    records: int
    anchors: int
    broken: list[Verification]
    anchor_problems: list[str]

    @property
    def ok(self) -> bool:
        """Every chain intact, every anchor signed and chained, no chat shorter than its anchor."""
        return not self.broken and not self.anchor_problems


class LogCheck:
    """Checks the chains of many chats from their stored documents, each chat's in seq order.

    Chats may be interleaved (documents in time order); `close` a chat once all of it was fed (in
    chat order) to keep memory flat. `result` judges every chat against its latest anchor and
    reports anchored chats never fed (deleted).
    """

    def __init__(
        self, anchors: AnchorScan | None, key: bytes | None, chat_ids: set[str] | None = None
    ) -> None:
        self.anchors = anchors
        self.key = key
        self.chat_ids = chat_ids
        self.records = 0
        self.seen: set[str] = set()
        self.broken: list[Verification] = []
        self._open: dict[str, ChainCheck] = {}

    def add(self, doc: Mapping[str, Any]) -> None:
        """Check one more document of its chat."""
        chat_id = str(doc.get("chat_id"))
        check = self._open.get(chat_id)
        if check is None:
            if self.chat_ids is not None and chat_id not in self.chat_ids:
                return
            anchor = self._anchored(chat_id)
            check = self._open[chat_id] = ChainCheck(
                chat_id, watch_seq=anchor.seq if anchor is not None else None
            )
            self.seen.add(chat_id)
        self.records += 1
        check.add(doc)

    def close(self, chat_id: str) -> None:
        """Judge a chat all of whose documents were fed."""
        check = self._open.pop(chat_id, None)
        if check is not None:
            self._judge(check)

    def result(self, app_id: str | None) -> LogVerification:
        """Judge the chats still open and the anchored chats never seen."""
        for chat_id in list(self._open):
            self.close(chat_id)
        latest = self.anchors.latest if self.anchors is not None else {}
        for chat_id in sorted(set(latest) - self.seen):
            if self.chat_ids is None or chat_id in self.chat_ids:
                self._judge(ChainCheck(chat_id))
        return LogVerification(
            app_id=app_id,
            chats=len(self.seen),
            records=self.records,
            anchors=self.anchors.count if self.anchors is not None else 0,
            broken=sorted(self.broken, key=lambda v: v.chat_id),
            anchor_problems=list(self.anchors.problems) if self.anchors is not None else [],
        )

    def _anchored(self, chat_id: str) -> Anchor | None:
        return self.anchors.latest.get(chat_id) if self.anchors is not None else None

    def _judge(self, check: ChainCheck) -> None:
        result = judge(check, self._anchored(check.chat_id), self.key)
        if not result.ok:
            self.broken.append(result)


Progress = Callable[[int, int], None]


async def verify_log(
    events: AsyncCollection[Any],
    book: AnchorBook | None,
    *,
    app_id: str | None = None,
    chat_ids: set[str] | None = None,
    exported: Iterable[Mapping[str, Any]] | None = None,
    progress: Progress | None = None,
    batch_size: int = 2000,
) -> LogVerification:
    """Check every chat's hash chain in one pass over the log, and each chat against its last anchor.

    With `chat_ids`, only those chats (the rest of the log is read but not checked). Reports a chat
    whose log ends before its anchored seq, whose anchored record changed, and an anchored chat
    that is gone. `exported`: anchors exported earlier (`audit anchors export`), checked against the
    database's and trusted where newer. `progress(records, total)` is called every `batch_size` records.
    """
    scan = await book.scan(app_id) if book is not None else None
    if scan is not None and book is not None and exported is not None:
        scan.compare((doc for doc in exported if app_id is None or doc.get("app_id") == app_id), book.key)
    log_check = LogCheck(scan, book.key if book else None, chat_ids)
    query: dict[str, Any] = {} if app_id is None else {"app_id": str(app_id)}
    total = await (events.count_documents(query) if app_id is not None else events.estimated_document_count())
    current: str | None = None
    read = 0
    async for doc in events.find(query, sort=list(CHAT_ORDER), hint=CHAT_INDEX, batch_size=batch_size):
        read += 1
        if progress is not None and read % batch_size == 0:
            progress(read, max(total, read))
        chat_id = str(doc.get("chat_id"))
        if chat_id != current:
            if current is not None:
                log_check.close(current)
            current = chat_id
        log_check.add(doc)
    if progress is not None:
        progress(read, read)
    return log_check.result(app_id)
