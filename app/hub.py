"""Live fan-out: one change stream on `events` per process, delivered to every local subscriber.

Records this process appended reach its subscribers twice over: from the store as soon as the
database acknowledged the insert (`MongoEventStore.on_append`), then from the change stream. A
subscriber takes each seq once: its queue drops a record at or below the highest seq it was
offered, and `follow` fills any gap from the log (another node's record the local path overtook),
so each seq reaches it once and in order whatever path it came by. Other nodes' records come by
the change stream only.

Each subscriber gets a bounded queue. A subscriber that falls behind by more than the bound is
marked overflowed and its queue is closed: the WebSocket layer then closes that client with a
"resume from seq" hint, and nothing is buffered without limit.

`LiveHub.client_view` is what a chat's client is shown (WebSocket, and any later transport): the
visible records only, and in the replay no `message.delta` of a message that has finished (its
`message.agent` carries the whole text).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog
from pymongo.errors import PyMongoError

from app.observability import EVENTS_SEEN
from domain.cancellation import raise_if_cancelling
from domain.errors import HistoryLost
from domain.events import Record
from domain.store import MongoEventStore, ReplayDone, follow

log = structlog.get_logger("mozaiks.hub")


class Overflowed(Exception):
    """The subscriber fell more than its queue bound behind the live stream."""

    def __init__(self, last_seq: int) -> None:
        self.last_seq = last_seq
        super().__init__(f"client too slow; resume from seq {last_seq}")


class _Subscriber:
    def __init__(
        self, chat_id: str, bound: int, store: MongoEventStore, on_overflow: Callable[[], None] | None
    ) -> None:
        self.chat_id = chat_id
        self.store = store
        self.on_overflow = on_overflow
        self.queue: asyncio.Queue[Record | None] = asyncio.Queue(maxsize=bound)
        self.overflowed = False
        self.offered = 0  # the highest seq queued: the same record by the other path is dropped

    def offer(self, record: Record | None) -> None:
        if self.overflowed:
            return
        if record is not None:
            if record.seq <= self.offered:
                return
            self.offered = record.seq
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.overflowed = True
            if self.on_overflow is not None:
                self.on_overflow()

    async def records(self) -> AsyncIterator[Record]:
        while True:
            record = await self.queue.get()
            if self.overflowed and self.queue.empty():
                return
            if record is None:
                # A poke: hand the log's newest record to `follow`, which fills any gap before it.
                async for newest in self.store.find(self.chat_id, limit=1, newest_first=True):
                    yield newest
            else:
                yield record


class LiveHub:
    """Tails the log once and fans records out to per-chat subscribers of this process."""

    def __init__(
        self, store: MongoEventStore, queue_bound: int = 1000, stream_interval_s: float = 0.0
    ) -> None:
        self.store = store
        self.queue_bound = queue_bound
        self.stream_interval_s = stream_interval_s  # the change stream asks at most this often
        self._subscribers: dict[str, set[_Subscriber]] = {}
        self._ready = asyncio.Event()
        self._token: Mapping[str, Any] | None = None
        # Test seam: awaited with each change before it is dispatched (a test delays the stream).
        self.stream_delay: Callable[[Record], Awaitable[None]] | None = None
        self.delivered_locally = 0  # records offered from this process's own appends

    @property
    def subscriber_count(self) -> int:
        """How many live subscriptions this process serves."""
        return sum(len(subs) for subs in self._subscribers.values())

    async def run(self) -> None:
        """Tail the change stream forever, reopening it after a break (subscribers then re-check the log);
        meanwhile deliver this process's own appends on their acknowledgement."""
        stop_local = self.store.on_append(self._deliver_local)
        try:
            while True:
                raise_if_cancelling()
                try:
                    async for change in self.store.tail(
                        resume_after=self._token, on_open=self._opened, min_interval_s=self.stream_interval_s
                    ):
                        if self.stream_delay is not None:
                            await self.stream_delay(change.record)
                        self._dispatch(change.record)
                        self._token = change.token
                except asyncio.CancelledError:
                    raise
                except HistoryLost:
                    log.warning("hub.history_lost", detail="reopening the change stream from now")
                    self._token = None
                except PyMongoError as exc:  # keep serving; the stream reopens shortly
                    raise_if_cancelling(exc)
                    log.warning("hub.stream_error", error=str(exc))
                    await asyncio.sleep(0.5)
        finally:
            stop_local()

    def _opened(self) -> None:
        self._ready.set()
        # After a break in the stream, wake every subscriber so it re-reads the log for a gap.
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.offer(None)

    async def wait_ready(self) -> None:
        """Wait until the change stream is open."""
        await self._ready.wait()

    def _dispatch(self, record: Record) -> None:
        EVENTS_SEEN.labels(record.type).inc()
        for subscriber in self._subscribers.get(record.chat_id, ()):
            subscriber.offer(record)

    def _deliver_local(self, records: Sequence[Record]) -> None:
        """Records this process appended, acknowledged by the database: to the chat's subscribers now.

        Runs in the appender's task: it never raises into the append (the change stream brings
        the records anyway).
        """
        try:
            subscribers = self._subscribers.get(records[0].chat_id)
            if not subscribers:
                return
            for record in records:
                for subscriber in list(subscribers):
                    subscriber.offer(record)
            self.delivered_locally += len(records)
        except Exception:  # a subscriber's bug must not fail a stored append
            log.exception("hub.local_delivery_failed", chat_id=records[0].chat_id)

    @contextlib.asynccontextmanager
    async def _listen(
        self, chat_id: str, on_overflow: Callable[[], None] | None
    ) -> AsyncIterator[_Subscriber]:
        subscriber = _Subscriber(chat_id, self.queue_bound, self.store, on_overflow)
        self._subscribers.setdefault(chat_id, set()).add(subscriber)
        try:
            yield subscriber
        finally:
            subs = self._subscribers.get(chat_id)
            if subs is not None:
                subs.discard(subscriber)
                if not subs:
                    del self._subscribers[chat_id]

    async def client_view(
        self, chat_id: str, after: int = 0, on_overflow: Callable[[], None] | None = None
    ) -> AsyncIterator[Record | ReplayDone]:
        """`subscribe` as a client sees it: visible records only, and finished messages' deltas left out of the replay.

        A delta is skipped in the replay when its message's `message.agent` has seq > `after` (the
        final record then brings the whole text); deltas of a message still streaming (or one that
        never finished) are replayed, then the live ones follow, so a client resuming mid-message
        has the text so far and every later piece exactly once. A live delta is never skipped.
        Skipped and hidden records are never sent, so the client's cursor (the last seq it received)
        may stay below `ReplayDone.last_seq`; resuming from it re-reads and skips them again.
        """
        finished = await self.store.completed_messages(chat_id, after)
        replaying = True
        async for item in self.subscribe(chat_id, after, on_overflow):
            if isinstance(item, ReplayDone):
                replaying = False
            elif not item.visible or (
                replaying and item.type == "message.delta" and item.data.get("message_id") in finished
            ):
                continue
            yield item

    async def subscribe(
        self, chat_id: str, after: int = 0, on_overflow: Callable[[], None] | None = None
    ) -> AsyncIterator[Record | ReplayDone]:
        """Stored records after `after`, a ReplayDone marker, then live records: no gap, no duplicate.

        Raises Overflowed when this subscriber falls more than `queue_bound` records behind;
        `on_overflow` is called at that moment (the consumer may be blocked elsewhere).
        """
        await self._ready.wait()
        async with self._listen(chat_id, on_overflow) as subscriber:
            last = after
            async for item in follow(
                self.store.read_ahead, chat_id, after, subscriber.records(), mark_replay=True
            ):
                if isinstance(item, Record):
                    last = item.seq
                yield item
            if subscriber.overflowed:
                raise Overflowed(last)

    async def records(self, chat_id: str, after: int = 0) -> AsyncIterator[Record]:
        """The chat's records after `after`, stored then live, for consumers inside the process (run control).

        Rides the process's one change stream; a consumer that falls more than the queue bound
        behind carries on from the log where it was, so it never sees a gap or a duplicate.
        """
        last = after
        while True:
            try:
                async for item in self.subscribe(chat_id, last):
                    if isinstance(item, Record):
                        last = item.seq
                        yield item
                return
            except Overflowed as exc:
                last = exc.last_seq
