"""The projection runner: tails the log and keeps every projection up to date, exactly once.

Start-up: open the change stream at the checkpointed resume token (or at "now" on a first start),
then catch up from the log for every chat some projection is behind on, then apply the stream in
batches. The checkpoint (`projection_checkpoints`) is written after the batch's views, so a crash
in between re-delivers events the `last_seq` guard then ignores. When the token has expired
(`HistoryLost`), the runner catches up from the log and reopens the stream at "now".

Across replicas one runner writes: with a `WriterLease` (a document in `projection_leases` with an
owner and an expiry, renewed every third of its TTL, like a run's lease), the replica holding it
writes and the others stand by, trying to take it over; when the writer dies its lease expires and
a standby takes over within the TTL, catching up from the checkpoint and the log. Two writers for a
moment (a writer that lost its lease and has not noticed yet) are harmless: every update is
guarded by `last_seq`, so the effect of an event still happens once.

Rounds: at most one per `min_interval_s` (what came meanwhile goes in one round, each chat's
documents written once), and a chat whose new records are only streamed text is held for a later
round (`ProjectionRunner._round`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from domain.cancellation import raise_if_cancelling
from domain.errors import HistoryLost
from domain.events import Record
from domain.store import Change, MongoEventStore
from projections.buckets import MetricsBucketsProjector
from projections.budgets import ChatSpendProjector
from projections.heads import ChainHeadsProjector
from projections.metrics import ChatMetricsProjector
from projections.prices import PriceTable, WatchedPrices
from projections.projector import Projector
from projections.sessions import ChatSessionsProjector
from projections.writer import ProjectionWriter, behind, catch_up

log = logging.getLogger(__name__)

CHECKPOINTS: Final = "projection_checkpoints"
LEASES: Final = "projection_leases"
# Streamed text changes no projection but a chat's position and chain head (see `_round`).
HELD_TYPES: Final = frozenset({"message.delta"})


def default_projectors(prices: PriceTable | WatchedPrices | None = None) -> list[Projector]:
    """chat_sessions, metrics, metrics_buckets and budgets (costed with `prices`, else the shipped table), chain_heads."""
    return [
        ChatSessionsProjector(),
        ChatMetricsProjector(prices),
        MetricsBucketsProjector(prices),
        ChainHeadsProjector(),
        ChatSpendProjector(prices),
    ]


class WriterLease:
    """The right to write the projections: one document per runner name with an owner and an expiry."""

    def __init__(self, db: AsyncDatabase[Any], name: str, owner: str, ttl_s: float) -> None:
        self.collection: AsyncCollection[Any] = db.get_collection(LEASES)
        self.name = name
        self.owner = owner
        self.ttl_s = ttl_s
        self._held_until = 0.0

    def _expiry(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.ttl_s)

    async def acquire(self) -> bool:
        """Take the lease if it is free or expired; True when this owner holds it now."""
        started = time.monotonic()
        try:
            await self.collection.find_one_and_update(
                {"_id": self.name, "expires_at": {"$lt": datetime.now(UTC)}},
                {"$set": {"owner": self.owner, "expires_at": self._expiry()}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        self._held_until = started + self.ttl_s
        return True

    async def renew(self) -> bool:
        """Push the expiry on; False when someone else took the lease over."""
        started = time.monotonic()
        result = await self.collection.update_one(
            {"_id": self.name, "owner": self.owner}, {"$set": {"expires_at": self._expiry()}}
        )
        if result.matched_count != 1:
            return False
        self._held_until = started + self.ttl_s
        return True

    async def hold(self) -> None:
        """Renew every third of the TTL; return when the lease is lost (or cannot be renewed before it expires)."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if not await self.renew():
                    return
            except PyMongoError as exc:
                raise_if_cancelling(exc)
                log.warning("projection lease renewal failed: %s", exc)
                if time.monotonic() >= self._held_until:
                    return

    async def release(self) -> None:
        """Give the lease up (a standby takes over at its next try instead of after the TTL)."""
        await self.collection.delete_one({"_id": self.name, "owner": self.owner})


Hook = Callable[[], Awaitable[None]]
Applied = Callable[[Sequence[Record], datetime], None]


class ProjectionRunner:
    """Feeds every projector from the change stream; use `run()` as a background task."""

    def __init__(
        self,
        db: AsyncDatabase[Any],
        store: MongoEventStore,
        projectors: Sequence[Projector] | None = None,
        *,
        name: str = "projections",
        batch_max: int = 1000,
        buffer_max: int = 20_000,
        checkpoint_every_s: float = 1.0,
        retry_after_s: float = 1.0,
        lease: WriterLease | None = None,
        min_interval_s: float = 0.0,
    ) -> None:
        self.db = db
        self.store = store
        self.name = name
        self.writers = [ProjectionWriter(db, store, p) for p in (projectors or default_projectors())]
        self.batch_max = batch_max
        self.buffer_max = buffer_max
        self.checkpoint_every_s = checkpoint_every_s
        self.retry_after_s = retry_after_s
        # Rounds (and the change stream's asks) at most this often: under load a round writes each
        # chat's documents once for all the records that came meanwhile (fewer database operations).
        self.min_interval_s = min_interval_s
        self.checkpoints: AsyncCollection[Any] = db.get_collection(CHECKPOINTS)
        # Test seam: awaited after a batch's views are written and before its checkpoint is.
        self.before_checkpoint: Hook | None = None
        # Observer of every applied batch with the time it was applied (benchmarks measure lag).
        self.on_applied: Applied | None = None
        self.applied = 0
        self._buffer: deque[Change] = deque()
        self._arrived = asyncio.Event()
        self._space = asyncio.Event()
        self._progress = asyncio.Event()
        self._initial = asyncio.Event()
        self._in_flight: list[Change] = []
        # Changes of chats that had only streamed text in a round, waiting for a later round (`_round`).
        self._held: list[Change] = []
        self._flush_held = False
        self._catching_up = 0
        self._recovering = False
        self._catch_up_since: datetime | None = None
        self._last_checkpoint = 0.0
        self._checkpointing: asyncio.Task[None] | None = None
        self._crash: BaseException | None = None
        # Without a lease this runner always writes; with one it writes only while it holds it.
        self.lease = lease
        self.role = "writer" if lease is None else "starting"
        self._role_known = asyncio.Event()  # set once the lease said whether this replica writes
        if lease is None:
            self._role_known.set()

    @classmethod
    def for_settings(
        cls,
        db: AsyncDatabase[Any],
        store: MongoEventStore,
        prices_path: Path | None = None,
        *,
        owner: str | None = None,
        lease_ttl_s: float = 30.0,
        min_interval_s: float = 0.0,
    ) -> ProjectionRunner:
        """The runtime's runner: both projections, prices from `prices_path` (re-read when it changes).

        With `owner` (the replica's node id) it writes only while it holds the writer lease.
        """
        lease = WriterLease(db, "projections", owner, lease_ttl_s) if owner else None
        return cls(
            db,
            store,
            default_projectors(WatchedPrices(prices_path)),
            lease=lease,
            min_interval_s=min_interval_s,
        )

    # ---- observing ----------------------------------------------------------------------------

    @property
    def caught_up(self) -> bool:
        """Ready: the catch-up from the log at start (or after a lost stream) has finished.

        The live backlog after that (events received, not yet applied) is in `lag()`; readiness does
        not flap with it under load. A standby replica counts as caught up: another one writes.
        """
        if self.role == "standby":
            return True
        return self.role == "writer" and self._initial.is_set() and not self._recovering

    def lag(self) -> dict[str, Any]:
        """How far the projections are behind: events received or known but not applied, and their age."""
        oldest: datetime | None = None
        if self._held:
            oldest = self._held[0].record.ts
        elif self._in_flight:
            oldest = self._in_flight[0].record.ts
        elif self._buffer:
            oldest = self._buffer[0].record.ts
        if self._catching_up and self._catch_up_since is not None:
            oldest = min(oldest, self._catch_up_since) if oldest is not None else self._catch_up_since
        seconds = 0.0
        if oldest is not None:
            aware = oldest if oldest.tzinfo is not None else oldest.replace(tzinfo=UTC)
            seconds = max((datetime.now(UTC) - aware).total_seconds(), 0.0)
        return {
            "events_behind": self._catching_up + len(self._buffer) + len(self._in_flight) + len(self._held),
            "seconds_behind": round(seconds, 3),
            "applied": self.applied,
            "caught_up": self.caught_up,
            "stuck_chats": len({chat for writer in self.writers for chat in writer.stuck}),
            "role": self.role,
        }

    async def wait_caught_up(self, timeout: float | None = None) -> None:
        """Wait until every event in the log now is in every projection and no batch is half done.

        Raises TimeoutError after `timeout` seconds, RuntimeError if the runner died. Chats stuck
        on a corrupt record count as caught up at the record before it.
        """
        async with asyncio.timeout(timeout):
            await self._wait_or_crash(self._role_known)  # a replica still starting may be the writer
            if self.role == "writer":
                await self._wait_or_crash(self._initial)
            chats: list[str] | None = None
            while True:
                self._progress.clear()
                lagging = self._unstuck(await behind(self.store, self.writers, chats))
                if not lagging and not self._in_flight:
                    if self._checkpointing is not None:
                        await asyncio.shield(self._checkpointing)
                    return
                chats = list(lagging)
                if self.role == "writer":
                    self._flush_held = True  # held streamed text goes in the next round, not a second later
                    self._arrived.set()
                    await self._wait_or_crash(self._progress)
                else:  # another replica writes (or this one is about to): look again shortly
                    if self._crash is not None:
                        raise RuntimeError("the projection runner stopped") from self._crash
                    await asyncio.sleep(0.1)

    def _unstuck(self, lagging: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        stuck = {chat for writer in self.writers for chat in writer.stuck}
        return {chat: span for chat, span in lagging.items() if chat not in stuck}

    async def _wait_or_crash(self, event: asyncio.Event) -> None:
        if self._crash is None:
            await event.wait()
        if self._crash is not None:
            raise RuntimeError("the projection runner stopped") from self._crash

    # ---- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Project until cancelled (standing by while another replica holds the lease); raises only on
        an error a retry cannot fix."""
        try:
            for writer in self.writers:
                await writer.ensure_indexes()
            if self.lease is None:
                await self._write()
            while True:
                await self._stand_by()
                await self._write_while_held()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._crash = exc
            for event in (self._role_known, self._initial, self._progress):
                event.set()  # wake whoever waits: they re-raise the crash
            raise
        finally:
            if self.lease is not None and self.role == "writer":
                with contextlib.suppress(PyMongoError):
                    await asyncio.shield(self.lease.release())

    async def _write(self) -> None:
        token = await self._load_checkpoint()
        while True:
            raise_if_cancelling()
            token = await self._session(token)

    async def _stand_by(self) -> None:
        """Try to take the writer lease until this replica holds it."""
        assert self.lease is not None
        while True:
            raise_if_cancelling()
            try:
                if await self.lease.acquire():
                    return
            except PyMongoError as exc:
                raise_if_cancelling(exc)
                log.warning("projection lease check failed: %s", exc)
            if self.role != "standby":
                log.info("projections: standing by (%s holds the writer lease)", self.lease.name)
            self.role = "standby"
            self._role_known.set()
            await asyncio.sleep(self.lease.ttl_s / 3)

    async def _write_while_held(self) -> None:
        assert self.lease is not None
        log.info("projections: %s writes", self.lease.owner)
        self.role = "writer"
        self._role_known.set()
        writing = asyncio.create_task(self._write(), name=f"{self.name}-writer")
        holding = asyncio.create_task(self.lease.hold(), name=f"{self.name}-lease")
        try:
            done, _ = await asyncio.wait({writing, holding}, return_when=asyncio.FIRST_COMPLETED)
            if writing in done:
                writing.result()  # raises what ended the writer
            log.warning("projections: %s lost the writer lease; standing by", self.lease.owner)
            self.role = "standby"
        finally:
            for task in (writing, holding):
                task.cancel()
            await asyncio.gather(writing, holding, return_exceptions=True)

    async def _session(self, token: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """Open the stream, catch up, apply until the stream fails; returns the token to reopen at."""
        if token is None:
            token = await self._token_now()
        self._buffer.clear()
        self._held = []  # the catch-up below applies them: it brings every chat up to the log
        reader = asyncio.create_task(self._read(token), name=f"{self.name}-tail")
        reader.add_done_callback(lambda _: self._arrived.set())
        last = token
        try:
            await self._catch_up()
            self._initial.set()
            while True:
                batch = await self._next_batch(reader)
                began = time.monotonic()
                await self._apply(batch)
                if batch:
                    last = batch[-1].token
                if (rest := began + self.min_interval_s - time.monotonic()) > 0:
                    await asyncio.sleep(rest)  # coalesce: what arrives meanwhile goes in one round
        except HistoryLost as exc:
            log.warning("projection stream history lost, catching up from the log: %s", exc)
            await self._clear_checkpoint()
            return None
        except PyMongoError as exc:
            log.warning("projection stream failed, reopening in %.1f s: %s", self.retry_after_s, exc)
            await asyncio.sleep(self.retry_after_s)
            return last
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            self._in_flight = []
            if self._checkpointing is not None:
                # A checkpoint still being written may land or not: the views already hold its batch.
                self._checkpointing.cancel()
                await asyncio.gather(self._checkpointing, return_exceptions=True)
                self._checkpointing = None

    async def _token_now(self) -> Mapping[str, Any] | None:
        """A resume token for the stream's current end, taken before catch-up reads the log."""
        async with self.store.appends() as appended:
            return appended.token

    async def _read(self, token: Mapping[str, Any] | None) -> None:
        changes = self.store.tail(resume_after=token, min_interval_s=self.min_interval_s)
        try:
            async for change in changes:
                while len(self._buffer) >= self.buffer_max:
                    self._space.clear()
                    await self._space.wait()
                self._buffer.append(change)
                self._arrived.set()
        finally:
            close = getattr(changes, "aclose", None)
            if close is not None:
                await close()  # closes the server-side change stream now, not at garbage collection
        raise PyMongoError("the change stream ended")

    async def _next_batch(self, reader: asyncio.Task[None]) -> list[Change]:
        while not self._buffer:
            if reader.done():
                reader.result()  # raises what ended the stream
            if self._held and (self._flush_held or self._hold_expired()):
                return []  # a round of the held changes alone
            self._arrived.clear()
            if not self._buffer and not reader.done():
                if not self._held:
                    await self._arrived.wait()
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(self._hold_left_s(), 0.0)):
                        await self._arrived.wait()
        count = min(len(self._buffer), self.batch_max)
        batch = [self._buffer.popleft() for _ in range(count)]
        self._space.set()
        self._in_flight = batch
        return batch

    async def _catch_up(self) -> None:
        def progress(done: int, total: int) -> None:
            self._catching_up = max(total - done, 0)

        self._catch_up_since = datetime.now(UTC)
        self._recovering = True
        try:
            await catch_up(self.store, self.writers, progress=progress)
        finally:
            self._catching_up = 0
            self._catch_up_since = None
            self._recovering = False
        self._progress.set()

    def _hold_left_s(self) -> float:
        """Seconds until the next checkpoint round, which applies every held change."""
        return self._last_checkpoint + self.checkpoint_every_s - time.monotonic()

    def _hold_expired(self) -> bool:
        return self._hold_left_s() <= 0

    def _round(self, batch: list[Change]) -> list[Change]:
        """What this round applies: the batch and the held changes, less the chats to hold again.

        A chat whose new records are all streamed text (`HELD_TYPES`) is held: its records wait,
        in order, for its next other record (the message's end comes soon) or for the next
        checkpoint round, at most `checkpoint_every_s` later, which applies everything held. While
        50 chats stream, a round would otherwise write each one's documents in every projection for
        nothing but a position (measured: those writes doubled the delta's way to the browser on
        the embedded server). The checkpoint never passes a held change (belt and braces: a restart's
        catch-up from the log would apply it anyway).
        """
        changes = [*self._held, *batch] if self._held else batch
        if self._flush_held or self._hold_expired():
            self._held, self._flush_held = [], False
            return changes
        text_only: dict[str, bool] = {}
        for change in changes:
            chat_id = change.record.chat_id
            text_only[chat_id] = text_only.get(chat_id, True) and change.record.type in HELD_TYPES
        self._held = [change for change in changes if text_only[change.record.chat_id]]
        return (
            [change for change in changes if not text_only[change.record.chat_id]] if self._held else changes
        )

    async def _apply(self, batch: list[Change]) -> None:
        applying = self._round(batch)
        by_chat: dict[str, list[Record]] = {}
        for change in applying:
            by_chat.setdefault(change.record.chat_id, []).append(change.record)
        if by_chat:
            for writer in self.writers:
                writer.projector.refresh()
            await asyncio.gather(*(writer.apply(by_chat) for writer in self.writers))
        self.applied += len(applying)
        if self.on_applied is not None and applying:
            self.on_applied([change.record for change in applying], datetime.now(UTC))
        if self.before_checkpoint is not None and applying:
            await self.before_checkpoint()
        if applying and not self._held and (not self._buffer or self._hold_expired()):
            # Written while the next batch is applied; one checkpoint in flight at a time, in order.
            if self._checkpointing is not None:
                await self._checkpointing
            self._last_checkpoint = time.monotonic()
            self._checkpointing = asyncio.create_task(self._save_checkpoint(applying[-1]))
        self._in_flight = []
        self._progress.set()

    # ---- checkpoint ---------------------------------------------------------------------------

    async def _load_checkpoint(self) -> Mapping[str, Any] | None:
        doc = await self.checkpoints.find_one({"_id": self.name})
        token = doc.get("token") if doc else None
        return token if isinstance(token, Mapping) else None

    async def _save_checkpoint(self, change: Change) -> None:
        await self.checkpoints.update_one(
            {"_id": self.name},
            {
                "$set": {
                    "token": dict(change.token),
                    "chat_id": change.record.chat_id,
                    "seq": change.record.seq,
                    "event_ts": change.record.ts,
                    "saved_at": datetime.now(UTC),
                }
            },
            upsert=True,
        )

    async def _clear_checkpoint(self) -> None:
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        await self.checkpoints.delete_one({"_id": self.name})
