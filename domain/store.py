"""The event store: an append-only, hash-chained log per chat in the MongoDB `events` collection.

The store offers append and read only; no code path updates or deletes an event. The unique
`(chat_id, seq)` index is the optimistic-concurrency guard, and appends are idempotent because a
record's `_id` is fixed before the first try.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Final, Protocol, TypeVar

import msgspec
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from domain.anchors import AnchorBook
from domain.audit import (
    AUDIT_INDEXES,
    AuditFilter,
    LogVerification,
    Position,
    conditions,
    document_check,
    find_records,
    verify_log,
    whole_query,
)
from domain.cancellation import raise_if_cancelling
from domain.chain import ChainCheck, Verification
from domain.commit import DURABLE, GroupCommit
from domain.cursors import prefetched
from domain.errors import Conflict, CorruptRecord, HistoryLost, StorageUnavailable
from domain.events import (
    GENESIS_HASH,
    TERMINAL_TYPES,
    Pending,
    Record,
    StreamRef,
    now,
    seal,
    to_record,
)

EVENTS: Final = "events"
DUPLICATE_KEY: Final = 11000
# Server codes meaning a resume token can no longer be used: ChangeStreamHistoryLost,
# ChangeStreamFatalError, and the older "resume point no longer in the oplog".
HISTORY_LOST_CODES: Final = frozenset({286, 280, 136})
_HEAD_CACHE_SIZE: Final = 10_000
_HEAD_FIELDS: Final = {"seq": 1, "hash": 1}  # what `last_seq` reads of a chat's last record
_INSERTED_CACHE_SIZE: Final = 10_000
SCAN_BATCH: Final = 2000  # log records per cursor batch of a scan
_LOOKUPS_AT_ONCE: Final = 16  # exact index lookups in flight while finding where chats end
_INSERTS: Final = [{"$match": {"operationType": "insert"}}]  # change-stream pipeline: new records
# Server codes that mean "the same request may succeed in a moment": host unreachable/not found,
# network timeout, shutdown in progress, max time expired, primary stepped down, exceeded time
# limit, socket exception, write concern failed, not primary (the 10107 family), interrupted
# (at shutdown, generally, due to a replica-set state change).
TRANSIENT_CODES: Final = frozenset(
    {6, 7, 64, 89, 91, 134, 189, 262, 9001, 10058, 10107, 11600, 11601, 11602, 13435, 13436}
)
T = TypeVar("T")


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How long the store keeps re-sending an operation that failed with a transient error.

    Waits `first_delay_s`, doubling up to `max_delay_s`, until `budget_s` has passed since the first
    try; then the operation fails with StorageUnavailable naming the last error.
    """

    budget_s: float = 30.0
    first_delay_s: float = 0.05
    max_delay_s: float = 2.0


def is_transient(exc: BaseException) -> bool:
    """Whether re-sending the operation that raised `exc` may succeed (and is safe for our appends).

    Network errors, not-primary / shutdown / interrupted codes, the `RetryableWriteError` label and
    write-concern errors (the write applied but was not confirmed: re-sending meets our own `_id`).
    """
    if isinstance(exc, ConnectionFailure | WriteConcernError):
        return True
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        return bool(details.get("writeConcernErrors")) and not details.get("writeErrors")
    if isinstance(exc, PyMongoError) and exc.has_error_label("RetryableWriteError"):
        return True
    return isinstance(exc, OperationFailure) and exc.code in TRANSIENT_CODES


class Backoff:
    """One operation's retry state under a RetryPolicy: `await backoff.wait(exc)` between tries."""

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy = policy
        self.what = what
        self.tries = 0
        self.started = time.monotonic()
        self.delay = policy.first_delay_s

    async def wait(self, exc: PyMongoError) -> None:
        """Sleep before the next try; re-raise a permanent error, StorageUnavailable when spent."""
        raise_if_cancelling(exc)
        self.tries += 1
        waited = time.monotonic() - self.started
        if not is_transient(exc):
            raise exc
        if waited + self.delay > self.policy.budget_s:
            raise StorageUnavailable(self.what, self.tries, waited, exc) from exc
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.policy.max_delay_s)


async def with_retries(policy: RetryPolicy, what: str, operation: Callable[[], Awaitable[T]]) -> T:
    """Run `operation`, re-running it after transient database errors as `policy` allows."""
    backoff = Backoff(policy, what)
    while True:
        try:
            return await operation()
        except PyMongoError as exc:
            await backoff.wait(exc)


class Change(msgspec.Struct, frozen=True):
    """One record seen on the change stream, with the token to resume after it."""

    record: Record
    token: Mapping[str, Any]


class Appends:
    """A change stream over appends, opened at one moment: its resume token and the chats appended since."""

    def __init__(self, stream: AsyncChangeStream[Any]) -> None:
        self._stream = stream

    @property
    def token(self) -> Mapping[str, Any] | None:
        """A resume token for the log's end when the stream was opened (or at the last change read)."""
        return self._stream.resume_token

    async def chats(self) -> set[str]:
        """The chats that got records since the stream opened, as far as it has seen (PyMongoError if it broke)."""
        chats: set[str] = set()
        while (change := await self._stream.try_next()) is not None:
            chats.add(str(change["fullDocument"]["chat_id"]))
        return chats


class EventStore(Protocol):
    """The contract every event store backend keeps."""

    async def append(
        self, stream: StreamRef, events: Sequence[Pending], expected_seq: int | None
    ) -> list[Record]: ...

    async def last_seq(self, chat_id: str) -> int: ...

    def read(self, chat_id: str, after: int = 0, limit: int | None = None) -> AsyncIterator[Record]: ...

    async def verify(self, chat_id: str) -> Verification: ...

    def subscribe(self, chat_id: str, after: int = 0) -> AsyncIterator[Record]: ...

    def find(
        self,
        chat_id: str | None = None,
        *,
        after: int = 0,
        limit: int | None = None,
        types: Sequence[str] | None = None,
        agent: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        app_id: str | None = None,
        user_id: str | None = None,
        visible: bool | None = None,
        newest_first: bool = False,
    ) -> AsyncIterator[Record]: ...

    def tail(
        self,
        resume_after: Mapping[str, Any] | None = None,
        on_open: Callable[[], None] | None = None,
        *,
        min_interval_s: float = 0.0,
    ) -> AsyncIterator[Change]: ...

    async def count(self, chat_id: str | None = None) -> int: ...

    async def chats(self) -> list[str]: ...

    async def heads_after(self, positions: Mapping[str, int]) -> dict[str, int]: ...

    def scan(
        self, chat_id: str | None = None, *, positions: Sequence[tuple[str, int]] | None = None
    ) -> AsyncGenerator[Record | CorruptRecord, None]: ...

    def appends(self, *, max_await_time_ms: int | None = None) -> AbstractAsyncContextManager[Appends]: ...


class MongoEventStore:
    """EventStore on a MongoDB (or MongoDB-wire) database, using PyMongo's async API."""

    def __init__(self, db: AsyncDatabase[Any], retry: RetryPolicy | None = None) -> None:
        self.db = db
        self.retry = retry or RetryPolicy()
        # Durable writes: majority-acknowledged and journaled before an append returns.
        self.events: AsyncCollection[Any] = db.get_collection(EVENTS, write_concern=DURABLE)
        # Appends of all chats, grouped into one insert while one is in flight (domain/commit.py).
        self.commit = GroupCommit(self.events)
        # chat_id -> (seq, hash) of the last record this process appended or read at the head.
        self._heads: OrderedDict[str, tuple[int, str]] = OrderedDict()
        # _id -> Record of inserts seen on change streams: every tail of this process shares one decode.
        self._inserted: OrderedDict[Any, Record] = OrderedDict()
        # Called with each chat's records this process appended, once the database acknowledged them.
        self._appended: list[Callable[[Sequence[Record]], None]] = []

    def on_append(self, listener: Callable[[Sequence[Record]], None]) -> Callable[[], None]:
        """Call `listener` with the records each append of this process stored (one chat's, in seq
        order), as soon as the write is acknowledged; returns the function that stops it.

        The live hub delivers them to its subscribers from here, without waiting for the change
        stream to bring them back; a listener must not block (it runs in the appender's task).
        """
        self._appended.append(listener)
        return lambda: self._appended.remove(listener) if listener in self._appended else None

    async def ensure_indexes(self) -> None:
        """Create the indexes the log relies on (idempotent; never drops anything)."""
        await self.events.create_indexes(
            [
                IndexModel([("chat_id", ASCENDING), ("seq", ASCENDING)], unique=True, name="chat_seq"),
                IndexModel([("type", ASCENDING), ("ts", ASCENDING)], name="type_ts"),
                # The app-wide audit query's indexes (they supersede the former `app_ts`).
                *AUDIT_INDEXES,
            ]
        )

    # ---- append -------------------------------------------------------------------------------

    async def append(
        self, stream: StreamRef, events: Sequence[Pending], expected_seq: int | None
    ) -> list[Record]:
        """Append `events` after `expected_seq` as one batch (group commit) and return the records.

        `expected_seq` is the last seq the caller saw (0 for a new chat); if another writer got
        there first, raises Conflict and nothing of this batch is stored. With `None`, appends at
        the current end of the log, retrying on conflicts. Re-sending a batch whose reply was lost
        (same Pending ids) returns the stored records instead of duplicating them.
        """
        chat_id = stream.chat_id

        async def attempt() -> list[Record]:
            if expected_seq is not None:
                return await self._append_at(stream, events, expected_seq)
            while True:
                # The head this process appended last, without asking: a run's recorder is its
                # chat's usual writer. If another writer went on meanwhile, the (chat_id, seq)
                # key refuses the insert (Conflict), and the log's end is read.
                cached = self._heads.get(chat_id)
                try:
                    head = cached[0] if cached is not None else await self.last_seq(chat_id)
                    return await self._append_at(stream, events, head)
                except Conflict:
                    self._heads.pop(chat_id, None)

        async def once_more() -> list[Record]:
            # After a transient error the cached head may be stale (a reply lost, a batch half in).
            self._heads.pop(chat_id, None)
            return await attempt()

        backoff = Backoff(self.retry, f"append to chat {chat_id}")
        try:
            return await attempt()
        except PyMongoError as exc:
            await backoff.wait(exc)
        while True:
            try:
                return await once_more()
            except PyMongoError as exc:
                await backoff.wait(exc)

    async def _append_at(
        self, stream: StreamRef, events: Sequence[Pending], expected_seq: int
    ) -> list[Record]:
        chat_id = stream.chat_id
        landed: list[Record] = []
        head_seq = expected_seq
        head_hash = await self._hash_at(chat_id, head_seq)
        while len(landed) < len(events):
            docs = self._seal_batch(stream, events[len(landed) :], head_seq, head_hash)
            try:
                await self.commit.insert(docs)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors") or []
                if not errors or errors[0].get("code") != DUPLICATE_KEY:
                    raise  # a write-concern error (all applied, unconfirmed) is retried by `append`
                inserted = int(exc.details.get("nInserted", 0))
                landed.extend(to_record(doc) for doc in docs[:inserted])
                if inserted:
                    head_seq, head_hash = docs[inserted - 1]["seq"], docs[inserted - 1]["hash"]
                own = await self._own_prefix(docs[inserted:])
                landed.extend(own)
                if own[-1].seq > head_seq:
                    head_seq, head_hash = own[-1].seq, own[-1].hash
                continue
            landed.extend(to_record(doc) for doc in docs)
            head_seq, head_hash = docs[-1]["seq"], docs[-1]["hash"]
        if landed:
            self._remember_head(chat_id, head_seq, head_hash)
            for listener in list(self._appended):
                listener(landed)
        return landed

    async def finish_run(self, stream: StreamRef, run_id: str, events: Sequence[Pending]) -> Record:
        """Append `events`, ending with the run's terminal event, unless the run already has one.

        Returns the run's terminal record: the one just appended, or the one already in the log
        (then `events` are not appended, so a terminal record is always its run's last record).
        Checked and appended at the log's end with the optimistic guard, so two nodes finishing the
        same run record one terminal between them. Re-sending after a lost reply is idempotent.
        """
        chat_id = stream.chat_id

        async def attempt() -> Record:
            # The end of the log first, then the check: a terminal appended after this read makes
            # the append below conflict; one appended before it is found by the check. (`last_seq`
            # reads the log from the head this process knows on: the true end, read cheaply.)
            last = await self.last_seq(chat_id)
            stored = await self.events.find_one(
                {"chat_id": chat_id, "run_id": run_id, "type": {"$in": sorted(TERMINAL_TYPES)}}
            )
            if stored is not None:
                return to_record(stored)
            return (await self._append_at(stream, events, last))[-1]

        while True:
            try:
                return await with_retries(self.retry, f"record the end of run {run_id}", attempt)
            except Conflict:
                continue  # someone appended meanwhile: look again for a terminal record, then retry

    @staticmethod
    def _seal_batch(
        stream: StreamRef, events: Sequence[Pending], head_seq: int, head_hash: str
    ) -> list[dict[str, Any]]:
        ts = now()
        docs: list[dict[str, Any]] = []
        prev = head_hash
        for offset, pending in enumerate(events, start=1):
            doc = seal(stream, pending, head_seq + offset, prev, ts)
            docs.append(doc)
            prev = doc["hash"]
        return docs

    async def _own_prefix(self, docs: Sequence[Mapping[str, Any]]) -> list[Record]:
        """After a duplicate key: the stored records of `docs` that an earlier try already landed.

        An ordered insert lands a prefix, so these are the leading docs whose `_id` is stored (for
        this chat). None of them stored means another writer took the seq: Conflict.
        """
        ids = [doc["_id"] for doc in docs]
        stored = {d["_id"]: d async for d in self.events.find({"_id": {"$in": ids}})}
        own: list[Record] = []
        for doc in docs:
            found = stored.get(doc["_id"])
            if found is None or found.get("chat_id") != doc["chat_id"]:
                break
            own.append(to_record(found))
        if not own:
            self._heads.pop(docs[0]["chat_id"], None)
            raise Conflict(docs[0]["chat_id"], docs[0]["seq"])
        return own

    async def _hash_at(self, chat_id: str, seq: int) -> str:
        if seq == 0:
            return GENESIS_HASH
        cached = self._heads.get(chat_id)
        if cached is not None and cached[0] == seq:
            return cached[1]
        doc = await self.events.find_one({"chat_id": chat_id, "seq": seq}, {"hash": 1})
        if doc is None:
            last = await self.last_seq(chat_id)
            raise Conflict(chat_id, seq + 1, f"expected seq {seq} but the log ends at {last}")
        return str(doc["hash"])

    def _remember_head(self, chat_id: str, seq: int, hash_: str) -> None:
        self._heads[chat_id] = (seq, hash_)
        self._heads.move_to_end(chat_id)
        if len(self._heads) > _HEAD_CACHE_SIZE:
            self._heads.popitem(last=False)

    # ---- read ---------------------------------------------------------------------------------

    async def last_seq(self, chat_id: str) -> int:
        """The seq of the chat's last record, 0 when the chat has none; remembers that head."""
        head: dict[str, Any] | None = None
        cached = self._heads.get(chat_id)
        if cached is not None:
            # From the last head this process saw on: a server that sorts before it limits (the
            # embedded one) then reads a record or two, not the whole chat. None there: the log
            # was cut below that head, and the whole chat is asked.
            head = await self.events.find_one(
                {"chat_id": chat_id, "seq": {"$gte": cached[0]}}, _HEAD_FIELDS, sort=[("seq", DESCENDING)]
            )
        if head is None:
            head = await self.events.find_one({"chat_id": chat_id}, _HEAD_FIELDS, sort=[("seq", DESCENDING)])
        if head is None:
            return 0
        seq = int(head["seq"])
        if isinstance(head.get("hash"), str):
            self._remember_head(chat_id, seq, head["hash"])  # an append at the end needs no second read
        return seq

    async def read(self, chat_id: str, after: int = 0, limit: int | None = None) -> AsyncIterator[Record]:
        """The chat's records with seq > `after`, in seq order, at most `limit` of them.

        A transient database error mid-read resumes after the last record yielded (RetryPolicy).
        """
        backoff: Backoff | None = None
        while True:
            try:
                async for record in self.find(chat_id=chat_id, after=after, limit=limit):
                    yield record
                    after = record.seq
                    if limit is not None:
                        limit -= 1
                        if limit == 0:
                            return
                return
            except PyMongoError as exc:
                backoff = backoff or Backoff(self.retry, f"read chat {chat_id}")
                await backoff.wait(exc)

    async def read_ahead(self, chat_id: str, after: int = 0, batch: int = 1000) -> AsyncIterator[Record]:
        """Like `read`, for long reads (a reconnect's replay): the log is read in batches of `batch`,
        the next one fetched while the caller works through the current one."""
        cursor = self.events.find(
            {"chat_id": str(chat_id), "seq": {"$gt": int(after)}}, sort=[("seq", ASCENDING)], batch_size=batch
        )
        async for docs in prefetched(cursor, batch, ahead=1):
            for doc in docs:
                yield to_record(doc)

    async def find(
        self,
        chat_id: str | None = None,
        *,
        after: int = 0,
        limit: int | None = None,
        types: Sequence[str] | None = None,
        agent: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        app_id: str | None = None,
        user_id: str | None = None,
        visible: bool | None = None,
        newest_first: bool = False,
    ) -> AsyncIterator[Record]:
        """Audit read: records matching every given filter, by chat and seq (reversed if `newest_first`).

        Filter values are matched as plain values (never as query operators). With `chat_id`, the
        server reads the chat's `(chat_id, seq)` range and the other filters are checked on each
        record here (`domain.audit`: a filter field outside an index's prefix makes SecantusDB scan
        the whole collection).
        """
        wanted = conditions(
            AuditFilter(
                types=tuple(types or ()), agent=agent, app_id=app_id, user_id=user_id, visible=visible
            )
        )
        query: dict[str, Any]
        if chat_id is not None:
            query = {"chat_id": str(chat_id)}
            if after:
                query["seq"] = {"$gt": int(after)}
            check = document_check(wanted, query, since, until)
        else:
            query, check = whole_query(wanted, since, until), None
        order = DESCENDING if newest_first else ASCENDING
        cursor = self.events.find(query, sort=[("chat_id", order), ("seq", order)])
        if limit is not None and check is None:
            cursor = cursor.limit(int(limit))
        left = limit or None  # 0: no limit, as the driver reads it
        try:
            async for doc in cursor:
                if check is not None and not check(doc):
                    continue
                yield to_record(doc)
                if left is not None:
                    left -= 1
                    if left <= 0:
                        return
        finally:
            await cursor.close()

    async def completed_messages(self, chat_id: str, after: int = 0) -> set[str]:
        """The `message_id`s of the chat's `message.agent` records with seq > `after` (streamed messages that finished)."""
        # The chat's range only: a `type` in the query would make SecantusDB scan the collection.
        query = {"chat_id": str(chat_id), "seq": {"$gt": int(after)}}
        found: set[str] = set()
        async for doc in self.events.find(query, {"type": 1, "data.message_id": 1}):
            if doc.get("type") != "message.agent":
                continue
            message_id = (doc.get("data") or {}).get("message_id")
            if message_id:
                found.add(str(message_id))
        return found

    def audit(
        self,
        f: AuditFilter,
        *,
        after: Position | None = None,
        limit: int | None = None,
        batch_size: int = 1000,
    ) -> AsyncIterator[dict[str, Any]]:
        """The app-wide audit read (`domain.audit`): stored documents matching `f` after `after`, in order."""
        return find_records(self.events, f, after=after, limit=limit, batch_size=batch_size)

    async def verify_all(
        self,
        book: AnchorBook | None,
        *,
        app_id: str | None = None,
        chat_ids: set[str] | None = None,
        exported: Iterable[Mapping[str, Any]] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> LogVerification:
        """Every chat's chain (of one app, or `chat_ids`) against its tail anchor, in one pass (`verify_log`)."""
        return await verify_log(
            self.events, book, app_id=app_id, chat_ids=chat_ids, exported=exported, progress=progress
        )

    async def verify(self, chat_id: str, check: ChainCheck | None = None) -> Verification:
        """Recompute the chat's hash chain from the stored documents; report the first broken seq.

        `check` is the fold to feed (one watching an anchored seq, say); by default a plain one.
        """
        check = check or ChainCheck(chat_id)
        async for doc in self.events.find({"chat_id": chat_id}, sort=[("seq", ASCENDING)]):
            if not check.add(doc):
                break
        return check.result()

    # ---- live ---------------------------------------------------------------------------------

    async def subscribe(self, chat_id: str, after: int = 0) -> AsyncIterator[Record]:
        """Stored records after `after`, then live ones as they are appended: no gap, no duplicate."""
        pipeline = [{"$match": {"operationType": "insert", "fullDocument.chat_id": chat_id}}]
        async with await self.events.watch(pipeline) as stream:

            async def live() -> AsyncIterator[Record]:
                async for change in stream:
                    yield self._decode_insert(change["fullDocument"])

            async for record in follow(self.read, chat_id, after, live()):
                yield record

    async def tail(
        self,
        resume_after: Mapping[str, Any] | None = None,
        on_open: Callable[[], None] | None = None,
        *,
        min_interval_s: float = 0.0,
    ) -> AsyncIterator[Change]:
        """Every record appended from now on (or after `resume_after`), for all chats.

        `on_open` is called once the change stream is listening (before the first record).
        With `min_interval_s`, the stream asks the server for more (a `getMore`) at most that often:
        under load each ask brings a batch of records instead of one or two (measured: change-stream
        getMores were the largest count of database operations per model call).
        Raises HistoryLost when the token is too old: the caller then catches up from the log.
        """
        pipeline = [{"$match": {"operationType": "insert"}}]
        try:
            async with await self.events.watch(pipeline, resume_after=resume_after) as stream:
                if on_open is not None:
                    on_open()
                fetched = 0.0  # when the last getMore (or the stream's first batch) came back
                while True:
                    fetch = min_interval_s > 0 and not _batch_left(stream)
                    if fetch and (wait := fetched + min_interval_s - time.monotonic()) > 0:
                        await asyncio.sleep(wait)
                    try:
                        change = await stream.next()
                    except StopAsyncIteration:
                        return
                    if fetch:
                        fetched = time.monotonic()
                    try:
                        record = self._decode_insert(change["fullDocument"])
                    except CorruptRecord:
                        continue  # a bad record is reported by every read of its chat; the tail goes on
                    yield Change(record, change["_id"])
        except OperationFailure as exc:
            if exc.code in HISTORY_LOST_CODES or (resume_after is not None and "resume" in str(exc).lower()):
                raise HistoryLost(f"change stream cannot resume: {exc}") from exc
            raise

    def _decode_insert(self, document: Mapping[str, Any]) -> Record:
        """The record of an insert seen on a change stream, decoded once per process.

        Safe to share: an insert event carries the document as inserted, and no event is ever
        updated. Reads of the collection itself always decode what is stored now (audit, verify).
        """
        key = document.get("_id")
        record = self._inserted.get(key)
        if record is None:
            record = to_record(document)
            self._inserted[key] = record
            if len(self._inserted) > _INSERTED_CACHE_SIZE:
                self._inserted.popitem(last=False)
        return record

    # ---- whole-log reads (projections: catch-up, rebuild, status) ------------------------------

    async def count(self, chat_id: str | None = None) -> int:
        """How many records the log holds: estimated for the whole log, exact for one chat."""
        if chat_id is None:
            return int(await self.events.estimated_document_count())
        return int(await self.events.count_documents({"chat_id": str(chat_id)}))

    async def chats(self) -> list[str]:
        """Every chat with records: `distinct` on the leading field of the `(chat_id, seq)` index
        (MongoDB answers it with a DISTINCT_SCAN: one index key per chat, not one per event)."""
        return [str(chat_id) for chat_id in await self.events.distinct("chat_id")]

    async def heads_after(self, positions: Mapping[str, int]) -> dict[str, int]:
        """The last seq of each chat whose log goes on after its position (chat_id -> seq).

        O(chats), never a pass over the log: one exact `(chat_id, seq)` index lookup per chat, and
        the head is asked for only where the log goes on.
        """
        chats = list(positions)
        heads: dict[str, int] = {}

        async def goes_on(chat_id: str) -> bool:
            doc = await self.events.find_one(
                {"chat_id": str(chat_id), "seq": int(positions[chat_id]) + 1}, {"_id": 1}
            )
            return doc is not None

        for start in range(0, len(chats), _LOOKUPS_AT_ONCE):
            chunk = chats[start : start + _LOOKUPS_AT_ONCE]
            found = await asyncio.gather(*map(goes_on, chunk))
            more = [chat_id for chat_id, yes in zip(chunk, found, strict=True) if yes]
            heads.update(zip(more, await asyncio.gather(*map(self.last_seq, more)), strict=True))
        return heads

    async def scan(
        self, chat_id: str | None = None, *, positions: Sequence[tuple[str, int]] | None = None
    ) -> AsyncGenerator[Record | CorruptRecord, None]:
        """The log (or one chat, or each chat of `positions` after its seq) in (chat_id, seq) order.

        A record that cannot be decoded comes as its CorruptRecord (naming chat and seq), so a
        caller can stop that chat and go on with the others. The next batch is already requested
        while this one is used: the server scans while this process folds.
        """
        query: dict[str, Any] = {}
        if positions is not None:
            query = {"$or": [{"chat_id": str(c), "seq": {"$gt": int(at)}} for c, at in positions]}
        elif chat_id is not None:
            query = {"chat_id": str(chat_id)}
        cursor = self.events.find(
            query, sort=[("chat_id", ASCENDING), ("seq", ASCENDING)], batch_size=SCAN_BATCH
        )
        async for batch in prefetched(cursor, SCAN_BATCH, ahead=4):
            for doc in batch:
                try:
                    item: Record | CorruptRecord = to_record(doc)
                except CorruptRecord as exc:
                    item = exc
                yield item

    @contextlib.asynccontextmanager
    async def appends(self, *, max_await_time_ms: int | None = None) -> AsyncIterator[Appends]:
        """A change stream over appends from now on (for a resume token, or the chats appended meanwhile)."""
        async with await self.events.watch(_INSERTS, max_await_time_ms=max_await_time_ms) as stream:
            yield Appends(stream)


def _batch_left(stream: AsyncChangeStream[Any]) -> bool:
    """Whether the change stream still holds records of its last batch (no `getMore` needed for the next).

    PyMongo has no public way to ask; its cursor's `_has_next` answers (pinned PyMongo; without it,
    every next counts as an ask and `min_interval_s` paces per record instead of per batch).
    """
    cursor = getattr(stream, "_cursor", None)
    has_next = getattr(cursor, "_has_next", None)
    return bool(has_next()) if callable(has_next) else False


def _conforms(store: MongoEventStore) -> EventStore:
    # mypy checks here that the class keeps the contract.
    return store


ReadAfter = Callable[[str, int], AsyncIterator[Record]]


class ReplayDone(msgspec.Struct, frozen=True):
    """Marker yielded by `follow(..., mark_replay=True)` between the replay and the live part."""

    last_seq: int


async def follow(
    read: ReadAfter,
    chat_id: str,
    after: int,
    live: AsyncIterator[Record],
    *,
    mark_replay: bool = False,
) -> AsyncIterator[Any]:
    """Merge a replay from the log with a live source into one gapless, duplicate-free sequence.

    `live` must already be listening before this is called, so nothing falls between the replay
    and the first live record; records it repeats are skipped and gaps are filled from the log.
    With `mark_replay`, a `ReplayDone` is yielded once the stored records have all been yielded.
    """
    last = after
    async for record in read(chat_id, last):
        yield record
        last = record.seq
    if mark_replay:
        yield ReplayDone(last)
    async for record in live:
        if record.chat_id != chat_id or record.seq <= last:
            continue
        if record.seq > last + 1:
            async for missing in read(chat_id, last):
                if missing.seq >= record.seq:
                    break
                yield missing
                last = missing.seq
        if record.seq == last + 1:
            yield record
            last = record.seq
