"""The `chain_heads` projection (each chat's last seq and hash) and the writer that anchors changed heads.

    {"_id": chat_id, "chat_id", "app_id", "user_id", "workflow", "created_at", "updated_at",
     "last_seq", "hash": hash of record last_seq, "dirty": true until that head is anchored}

`AnchorWriter` anchors every dirty head (see `domain.anchors`) every `interval_s` seconds and as
soon as a terminal record (`run.completed|failed|stopped`) has been projected, then clears `dirty`
guarded on the anchored `last_seq`, so a head that moved meanwhile is anchored next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, Final

from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from domain.anchors import AnchorBook, Head
from domain.cancellation import raise_if_cancelling
from domain.events import EVENT_TYPES, TERMINAL_TYPES, AnyEvent, Record
from projections.projector import Projector
from projections.update import Update

log = logging.getLogger(__name__)

READ_BATCH: Final = 1000


class ChainHeadsProjector(Projector):
    """Projects each chat's head (last seq and its hash) into `chain_heads`."""

    name: ClassVar[str] = "chain_heads"
    collection: ClassVar[str] = "chain_heads"
    handles: ClassVar[frozenset[str]] = EVENT_TYPES
    indexes: ClassVar[tuple[IndexModel, ...]] = (IndexModel([("dirty", ASCENDING)], name="dirty"),)

    def empty(self) -> dict[str, Any]:
        """No head yet."""
        return {"hash": None, "dirty": True}

    def step(self, state: Mapping[str, Any], record: Record, event: AnyEvent | None = None) -> Update | None:
        """Every record moves the head; its payload is never decoded for that."""
        change = Update()
        change.set["updated_at"] = record.ts
        change.set["hash"] = record.hash
        change.set["dirty"] = True
        return change

    def update(self, state: Mapping[str, Any], record: Record, event: AnyEvent) -> Update:
        """See `step`."""
        change = self.step(state, record, event)
        assert change is not None
        return change


class AnchorWriter:
    """Anchors the heads of changed chats on an interval and after terminal records."""

    def __init__(self, db: AsyncDatabase[Any], book: AnchorBook, interval_s: float = 60.0) -> None:
        self.book = book
        self.interval_s = interval_s
        self.heads: AsyncCollection[Any] = db.get_collection(ChainHeadsProjector.collection)
        self.written = 0
        self._due = asyncio.Event()

    def notice(self, records: Sequence[Record], applied_at: datetime | None = None) -> None:
        """Told of every projected batch (the runner's `on_applied`): a terminal record anchors now."""
        if any(record.type in TERMINAL_TYPES for record in records):
            self._due.set()

    async def anchor_changed(self) -> int:
        """Anchor every head changed since it was last anchored; returns how many anchors were written."""
        written = 0
        while True:
            docs = await self.heads.find(
                {"dirty": True}, {"app_id": 1, "last_seq": 1, "hash": 1}, limit=READ_BATCH
            ).to_list()
            heads = [
                Head(
                    app_id=str(d["app_id"]),
                    chat_id=str(d["_id"]),
                    seq=int(d["last_seq"]),
                    hash=str(d["hash"]),
                )
                for d in docs
                if d.get("hash") and d.get("app_id") is not None
            ]
            if heads:
                written += await self.book.append(heads)
            if docs:
                await self.heads.bulk_write(
                    [
                        UpdateOne({"_id": d["_id"], "last_seq": d["last_seq"]}, {"$set": {"dirty": False}})
                        for d in docs
                    ],
                    ordered=False,
                )
            if len(docs) < READ_BATCH:
                self.written += written
                return written

    async def run(self) -> None:
        """Anchor until cancelled; a database error is logged and retried at the next turn."""
        await self.book.ensure_indexes()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), self.interval_s)
            self._due.clear()
            try:
                await self.anchor_changed()
            except PyMongoError as exc:
                raise_if_cancelling(exc)
                log.warning("anchoring failed, retrying in %.0f s: %s", self.interval_s, exc)
