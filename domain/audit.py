"""The app-wide audit read: filtered records of many chats, in a stable order, paged by an opaque cursor.

Order: by `(ts, chat_id, seq)`, which is time order and, within a chat, seq order (a chat's
records are sealed in seq order, so their `ts` never decreases). Filtering by one chat or one run
reads that chat in seq order instead (the same order for a single chat). Every plan's equality
filters are the prefix of an index whose keys end with the sort keys (`AUDIT_INDEXES`), so the
server reads an index range in order and never scans the collection. Plans leave the choice of
index to the server: a `hint` makes SecantusDB walk the whole hinted index (every document of the
collection, per query), and MongoDB picks the prefix index itself. Only a plan that reads every
chat of every app names one (`chat_seq`), so that MongoDB walks it in order instead of sorting.

The cursor is the `(ts, chat_id, seq)` of the last record returned, a key no two records share:
a page after it repeats nothing, and every record stored before paging began is returned exactly
once, however many records are appended meanwhile (they sort after it, or are reached later).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import heapq
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import msgspec
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from domain.anchors import Anchor, AnchorBook, AnchorScan, judge
from domain.chain import ChainCheck, Verification
from domain.cursors import prefetched
from domain.errors import MozaiksError
from domain.events import ForkedFrom
from domain.lineage import anchored, forked_from

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
    """One ordered read: index ranges read one after another, each in `sort` order, and all in it.

    Each query holds only what an index serves: the equalities of its prefix and a range on the
    next key. A filter field outside that prefix would make SecantusDB scan the collection (and a
    `hint` makes it walk the whole hinted index), so the other conditions are `checks` on each
    document read. A page after a cursor is "everything after this key", which as one filter needs
    an `$or`, no index range: it is read as the rest of the cursor's chat at its instant, the later
    chats at that instant, then every later instant.
    """

    queries: list[dict[str, Any]]
    sort: list[tuple[str, int]]
    hint: str | None = None  # the index to walk (only a read of every app's log names one)
    checks: Callable[[Mapping[str, Any]], bool] | None = None


def plans(f: AuditFilter, after: Position | None = None) -> list[Plan]:
    """The reads that answer `f` after `after`: one, or one per type when several are asked for.

    Several types in one time-ordered query would make the server merge index ranges or sort in
    memory; separate reads, merged here, stream each range in index order.
    """
    time_ordered = f.chat_id is None and f.run_id is None and f.app_id is not None
    if time_ordered and len(f.types) > 1:
        return [_plan(msgspec.structs.replace(f, types=(t,)), after, time_ordered) for t in f.types]
    return [_plan(f, after, time_ordered)]


def conditions(f: AuditFilter) -> dict[str, frozenset[Any]]:
    """`f`'s equality filters: each field with the values it may take (plain values, never operators)."""
    wanted: dict[str, frozenset[Any]] = {
        field: frozenset([str(value)])
        for field in ("app_id", "agent", "workflow", "user_id", "chat_id", "run_id")
        if (value := getattr(f, field)) is not None
    }
    if f.types:
        wanted["type"] = frozenset(str(t) for t in f.types)
    if f.visible is not None:
        wanted["visible"] = frozenset([bool(f.visible)])
    return wanted


def whole_query(
    wanted: Mapping[str, frozenset[Any]], since: datetime | None, until: datetime | None
) -> dict[str, Any]:
    """Every condition and the time window as one server query (for a read that walks an index whole)."""
    query: dict[str, Any] = {
        field: next(iter(values)) if len(values) == 1 else {"$in": sorted(values)}
        for field, values in wanted.items()
    }
    window = _window(since, until)
    if window:
        query["ts"] = window
    return query


def _window(since: datetime | None, until: datetime | None) -> dict[str, datetime]:
    window: dict[str, datetime] = {}
    if since is not None:
        window["$gte"] = _aware(since)
    if until is not None:
        window["$lt"] = _aware(until)
    return window


def _plan(f: AuditFilter, after: Position | None, time_ordered: bool) -> Plan:
    wanted = conditions(f)
    since = _aware(f.since) if f.since is not None else None
    until = _aware(f.until) if f.until is not None else None
    window = _window(since, until)
    if time_ordered:
        # (app_id, one of type/agent/user_id/workflow, ts, chat_id, seq): AUDIT_INDEXES.
        second = next((field for field in ("type", "agent", "user_id", "workflow") if field in wanted), None)
        prefix = _equalities(wanted, ("app_id", second) if second else ("app_id",))
        rest = document_check(wanted, prefix)
        if after is None:
            return Plan([{**prefix, "ts": window} if window else prefix], list(TIME_ORDER), None, rest)
        later: dict[str, datetime] = (
            {"$gt": after.ts} if since is None or after.ts >= since else {"$gte": since}
        )
        if until is not None:
            later["$lt"] = until
        ranges = [{**prefix, "ts": later}]
        if (since is None or after.ts >= since) and (until is None or after.ts < until):
            ranges[:0] = [
                {**prefix, "ts": after.ts, "chat_id": after.chat_id, "seq": {"$gt": after.seq}},
                {**prefix, "ts": after.ts, "chat_id": {"$gt": after.chat_id}},
            ]
        return Plan(ranges, list(TIME_ORDER), None, rest)
    if f.chat_id is None and f.run_id is None:
        # Every app's log, in chat order: the whole (chat_id, seq) index, walked in order and filtered.
        query = whole_query(wanted, since, until)
        if after is not None:
            query["$or"] = [
                {"chat_id": {"$gt": after.chat_id}},
                {"chat_id": after.chat_id, "seq": {"$gt": after.seq}},
            ]
        return Plan([query], list(CHAT_ORDER), CHAT_INDEX)
    # One chat (chat_seq) or one run (run_chat_seq), in seq order.
    prefix = _equalities(wanted, ("chat_id",) if f.chat_id is not None else ("run_id",))
    rest = document_check(wanted, prefix, since, until)
    if after is None:
        return Plan([prefix], list(CHAT_ORDER), None, rest)
    if f.chat_id is not None:
        # One chat: the page goes on after the cursor's seq, or is empty past that chat.
        seq = after.seq if after.chat_id == f.chat_id else (0 if after.chat_id < f.chat_id else 2**62)
        return Plan([{**prefix, "seq": {"$gt": seq}}], list(CHAT_ORDER), None, rest)
    ranges = [
        {**prefix, "chat_id": after.chat_id, "seq": {"$gt": after.seq}},
        {**prefix, "chat_id": {"$gt": after.chat_id}},
    ]
    return Plan(ranges, list(CHAT_ORDER), None, rest)


def _equalities(wanted: Mapping[str, frozenset[Any]], fields: Sequence[str]) -> dict[str, Any]:
    return {field: next(iter(wanted[field])) for field in fields}


def document_check(
    wanted: Mapping[str, frozenset[Any]],
    served: Mapping[str, Any],
    since: datetime | None = None,
    until: datetime | None = None,
) -> Callable[[Mapping[str, Any]], bool] | None:
    """What an index range does not serve (`wanted` values of fields not in `served`, the time
    window), as a check of one stored document; None when nothing is left to check."""
    left = [(field, values) for field, values in wanted.items() if field not in served]
    if not left and since is None and until is None:
        return None
    since = _aware(since) if since is not None else None
    until = _aware(until) if until is not None else None

    def keep(doc: Mapping[str, Any]) -> bool:
        if any(doc.get(field) not in values for field, values in left):
            return False
        ts = _aware(doc["ts"])
        return (since is None or ts >= since) and (until is None or ts < until)

    return keep


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
    reads = [_read(events, plan, limit, batch_size) for plan in plans(f, after)]
    merged = reads[0] if len(reads) == 1 else _merge(reads)
    count = 0
    try:
        async for doc in merged:
            yield doc
            count += 1
            if limit is not None and count >= limit:
                return
    finally:
        for read in reads:
            await read.aclose()


async def _read(
    events: AsyncCollection[Any], plan: Plan, limit: int | None, batch_size: int
) -> AsyncGenerator[dict[str, Any]]:
    """The plan's ranges, one cursor after another (at most `limit` documents in all)."""
    left = limit
    for query in plan.queries:
        if left == 0:
            return
        # With checks made here, the server cannot count the documents that will be kept.
        server_limit = (left or 0) if plan.checks is None else 0
        cursor = events.find(query, sort=plan.sort, hint=plan.hint, batch_size=batch_size, limit=server_limit)
        async with contextlib.aclosing(prefetched(cursor, batch_size, ahead=1)) as batches:
            async for docs in batches:
                for doc in docs:
                    if plan.checks is not None and not plan.checks(doc):
                        continue
                    yield doc
                    if left is not None:
                        left -= 1
                        if left == 0:
                            return


async def _merge(reads: Sequence[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """Merge reads that are each in TIME_ORDER into one sequence in TIME_ORDER."""
    heap: list[tuple[tuple[datetime, str, int], int, dict[str, Any]]] = []
    for index, read in enumerate(reads):
        first = await anext(read, None)
        if first is not None:
            heap.append((_sort_key(first), index, first))
    heapq.heapify(heap)
    while heap:
        _, index, doc = heap[0]
        yield doc
        following = await anext(reads[index], None)
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
    # Model I/O parts (domain/model_io.py) whose content does not match their hash, or missing ones.
    part_problems: list[str] = []
    # Forks among the chats, each checked against its `forked_from` anchor in the parent's log too.
    forks: int = 0

    @property
    def ok(self) -> bool:
        """Every chain intact, every anchor signed and chained, no chat shorter than its anchor, every part sound."""
        return not self.broken and not self.anchor_problems and not self.part_problems


class LogCheck:
    """Checks the chains of many chats from their stored documents, each chat's in seq order.

    Chats may be interleaved (documents in time order); `close` a chat once all of it was fed (in
    chat order) to keep memory flat. `check_forks` checks each fork's `forked_from` anchor in its
    parent's log (`domain.lineage.anchored`, the per-chat verify's check). `result` judges every
    chat against its latest anchor and reports anchored chats never fed (deleted).
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
        # Forks fed (their `chat.created` holds `forked_from`) and their verdicts once closed.
        self._anchors: dict[str, ForkedFrom] = {}
        self._forks: dict[str, Verification] = {}

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
        if doc.get("seq") == 1 and (parent := forked_from(doc)) is not None:
            self._anchors[chat_id] = parent
        check.add(doc)

    def close(self, chat_id: str) -> None:
        """Judge a chat all of whose documents were fed."""
        check = self._open.pop(chat_id, None)
        if check is not None:
            self._judge(check)

    async def check_forks(self, events: AsyncCollection[Any]) -> None:
        """Judge the chats still open, and check every fork's `forked_from` anchor in its parent's log."""
        for chat_id in list(self._open):
            self.close(chat_id)
        for chat_id, verdict in list(self._forks.items()):
            self._forks[chat_id] = await anchored(events, verdict, self._anchors[chat_id])

    def result(self, app_id: str | None) -> LogVerification:
        """Judge the chats still open and the anchored chats never seen (forks' anchors: `check_forks` first)."""
        for chat_id in list(self._open):
            self.close(chat_id)
        self.broken.extend(verdict for verdict in self._forks.values() if not verdict.ok)
        self._forks.clear()
        latest = self.anchors.latest if self.anchors is not None else {}
        for chat_id in sorted(set(latest) - self.seen):
            if self.chat_ids is None or chat_id in self.chat_ids:
                self._judge(ChainCheck(chat_id))
        return LogVerification(
            app_id=app_id,
            chats=len(self.seen),
            records=self.records,
            anchors=self.anchors.count if self.anchors is not None else 0,
            forks=len(self._anchors),
            broken=sorted(self.broken, key=lambda v: v.chat_id),
            anchor_problems=list(self.anchors.problems) if self.anchors is not None else [],
        )

    def _anchored(self, chat_id: str) -> Anchor | None:
        return self.anchors.latest.get(chat_id) if self.anchors is not None else None

    def _judge(self, check: ChainCheck) -> None:
        result = judge(check, self._anchored(check.chat_id), self.key)
        if check.chat_id in self._anchors:
            self._forks[check.chat_id] = result  # reported by `result`, after `check_forks`
        elif not result.ok:
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
    A fork's `forked_from` anchor is checked in its parent's log as the per-chat verify does
    (`domain.lineage.anchored`): a parent's record changed at the fork point fails the fork at seq 1.
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
    await log_check.check_forks(events)
    if progress is not None:
        progress(read, read)
    return log_check.result(app_id)
