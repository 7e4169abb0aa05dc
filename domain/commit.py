"""Group commit across chats: the batches of many appenders go to the database as one ordered insert.

Every run appends its own chat's batches. Sent one insert each, 50 concurrent runs measured 293
records/s on the embedded server (each insert a thread of its own there, contending); the same
records as one insert of 50 came to about 1,000/s. `GroupCommit.insert` keeps one insert in flight:
batches handed in meanwhile wait, and go together in the next. An idle store sends at once.

An insert holds at most one batch per chat, and is ordered when a batch has several records (a
chat's records must land as a prefix: never one after a record that failed). For each caller the
outcome is that of its own batch inserted alone with `ordered=True`:
- all of it stored: returns;
- a write error on one of its records: a `BulkWriteError` whose `nInserted` and error `index` count
  from the batch's first record (the prefix before it is stored, nothing after it);
- in an ordered insert, the batches after a failing one were not tried: they go in the next insert;
- any other failure (the database unreachable, a write-concern error) is raised to every caller of
  that insert; `store.append` retries, and re-sent records are recognised by their `_id`.
A caller cancelled before its batch is sent is left out; once sent, its records may land, as with
an insert of its own.

With `ordered=False` (documents independent of each other: model I/O parts), any batches go
together in one unordered insert, and a batch's write errors are all reported to its caller (a
`BulkWriteError` holding them, indexed from the batch's first document).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pymongo import WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from domain.cancellation import raise_if_cancelling

# What a crash must not lose is written with DURABLE: the log, the model I/O parts its records name,
# the anchors, the uploads and the run leases. Derived documents (projections, their checkpoints)
# take the client's default: the log rebuilds them. On the embedded server this is the difference
# that matters: it journals (fsyncs) a commit only when the write asks `j: true`.
DURABLE: Final = WriteConcern(w="majority", j=True)

MAX_DOCS: Final = 1_000  # records per insert: a big backlog goes in a few inserts, not one huge one


class _Batch:
    __slots__ = ("docs", "done")

    def __init__(self, docs: Sequence[Mapping[str, Any]], done: asyncio.Future[None]) -> None:
        self.docs = docs
        self.done = done


class GroupCommit:
    """One collection's inserts, grouped while an insert is in flight (see the module's text)."""

    def __init__(
        self, collection: AsyncCollection[Any], max_docs: int = MAX_DOCS, *, ordered: bool = True
    ) -> None:
        self.collection = collection
        self.max_docs = max_docs
        self.ordered = ordered
        self._waiting: deque[_Batch] = deque()
        self._sending: asyncio.Task[None] | None = None
        self.inserts = 0  # inserts sent (a test and the benchmarks read it)

    async def insert(self, docs: Sequence[Mapping[str, Any]]) -> None:
        """Store `docs` (one chat's consecutive records) as an ordered insert of their own would."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append(_Batch(docs, done))
        # (A sender of another loop is one whose loop has ended: a store outlives a test's loop.)
        if self._sending is None or self._sending.done() or self._sending.get_loop() is not loop:
            self._sending = loop.create_task(self._send_all(), name="group-commit")
        await done

    async def _send_all(self) -> None:
        group: list[_Batch] = []
        try:
            while self._waiting:
                raise_if_cancelling()
                group = self._take()
                if group:
                    await self._send(group)
        except BaseException as exc:
            # Whatever ends the sender ends every batch it has not settled: no caller waits forever.
            for batch in [*group, *self._waiting]:
                _fail(batch, exc)
            self._waiting.clear()
            raise

    def _take(self) -> list[_Batch]:
        """The next insert's batches, in arrival order: at most one per chat (a chat's next batch
        was sealed on the head before this one and would only conflict), `max_docs` in all."""
        group: list[_Batch] = []
        chats: set[Any] = set()
        later: list[_Batch] = []
        size = 0
        while self._waiting:
            batch = self._waiting.popleft()
            if batch.done.done():  # its caller was cancelled while it waited: not sent
                continue
            chat = batch.docs[0].get("chat_id") if self.ordered else object()
            if chat in chats or (group and size + len(batch.docs) > self.max_docs):
                later.append(batch)
                continue
            group.append(batch)
            chats.add(chat)
            size += len(batch.docs)
        self._waiting.extendleft(reversed(later))
        return group

    async def _send(self, group: list[_Batch]) -> None:
        docs = [doc for batch in group for doc in batch.docs]
        # One record per batch: each is independent of the others, so a conflict stops none of them.
        ordered = self.ordered and any(len(batch.docs) > 1 for batch in group)
        try:
            self.inserts += 1
            await self.collection.insert_many(docs, ordered=ordered)
        except BulkWriteError as exc:
            self._settle(group, exc, ordered)
        except BaseException as exc:
            for batch in group:
                _fail(batch, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise_if_cancelling(exc)  # PyMongo may have turned this task's cancellation into its error
        else:
            for batch in group:
                if not batch.done.done():
                    batch.done.set_result(None)

    def _settle(self, group: list[_Batch], exc: BulkWriteError, ordered: bool) -> None:
        """Each batch's share of a failed insert: stored, failed at its own record, or (after the
        failure of an ordered insert) not tried."""
        errors = {int(error["index"]): error for error in exc.details.get("writeErrors") or []}
        if not errors:  # e.g. a write-concern error: everything may be stored, nothing confirmed
            for batch in group:
                _fail(batch, exc)
            return
        # A write-concern error beside the write errors: nothing of this insert is confirmed, so
        # each batch's outcome carries it (its caller re-sends; re-sent records are found by `_id`).
        concern = exc.details.get("writeConcernErrors") or []
        # An ordered insert stops at its first error: the batches after that one were not tried.
        stopped_at = min(errors) if ordered else None
        start = 0
        untried: list[_Batch] = []
        for batch in group:
            end = start + len(batch.docs)
            failed = [i for i in range(start, end) if i in errors]
            if stopped_at is not None and start > stopped_at:
                untried.append(batch)
            elif failed:
                own = [{**errors[i], "index": i - start} for i in failed]
                inserted = failed[0] - start if ordered else len(batch.docs) - len(failed)
                details: dict[str, Any] = {"nInserted": inserted, "writeErrors": own}
                if concern:
                    details["writeConcernErrors"] = concern
                _fail(batch, BulkWriteError(details))
            elif concern:
                _fail(
                    batch,
                    BulkWriteError(
                        {"nInserted": len(batch.docs), "writeErrors": [], "writeConcernErrors": concern}
                    ),
                )
            elif not batch.done.done():
                batch.done.set_result(None)
            start = end
        self._waiting.extendleft(reversed(untried))  # first in the next insert, in their order


def _fail(batch: _Batch, exc: BaseException) -> None:
    """End a batch's wait with `exc` (a cancellation cancels it), unless it has ended already."""
    if batch.done.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        batch.done.cancel()
    else:
        batch.done.set_exception(exc)
