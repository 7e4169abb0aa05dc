"""The projector contract: a named view of the log, one document per chat, changed one event at a time.

A projector turns one event into an `Update` of its chat's document. The writer applies it in one
atomic MongoDB update guarded by `last_seq == seq - 1`, so a repeated or out-of-order delivery has
no effect twice; every event advances `last_seq`, also one the projector does not handle, so the
guard follows the gapless per-chat seq of the log. A rebuild folds the same updates in memory.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final

from pymongo import IndexModel

from domain.events import AnyEvent, Record
from projections.update import ProjectionError, Update

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def epoch_ms(ts: datetime) -> int:
    """Milliseconds since the epoch, exact (stored timestamps have millisecond precision)."""
    aware = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    return (aware - _EPOCH) // _MS


class Projector(abc.ABC):
    """A named projection: `collection` holds one document per chat (`_id` = chat_id) with `last_seq`."""

    name: ClassVar[str]
    collection: ClassVar[str]
    handles: ClassVar[frozenset[str]]
    # The top-level fields `update` reads from the document; the live writer caches only these.
    state_fields: ClassVar[tuple[str, ...]] = ()
    # The event types whose update reads `state_fields` (others can be applied without knowing them).
    state_types: ClassVar[frozenset[str]] = frozenset()
    indexes: ClassVar[tuple[IndexModel, ...]] = ()

    def initial(self, first: Record) -> dict[str, Any]:
        """The chat's document before its first event is applied (`last_seq` 0)."""
        return {
            "_id": first.chat_id,
            "chat_id": first.chat_id,
            "app_id": first.app_id,
            "user_id": first.user_id,
            "workflow": first.workflow,
            "created_at": first.ts,
            "updated_at": first.ts,
            "last_seq": 0,
            **self.empty(),
        }

    @abc.abstractmethod
    def empty(self) -> dict[str, Any]:
        """The projector's own fields of a new document (zero counters, empty lists)."""

    @abc.abstractmethod
    def update(self, state: Mapping[str, Any], record: Record, event: AnyEvent) -> Update:
        """The change one handled event makes; reads only `state_fields` of `state`."""

    def refresh(self) -> None:
        """Called before each batch; a projector with external inputs (a price file) re-reads them here."""
        return None

    def state_of(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The part of a document the live writer keeps in memory."""
        state = {key: copy.deepcopy(doc[key]) for key in self.state_fields if key in doc}
        state["last_seq"] = doc["last_seq"]
        return state

    def step(self, state: Mapping[str, Any], record: Record, event: AnyEvent | None = None) -> Update | None:
        """The update for `record` (its `event` when already decoded), or None when this projector ignores its type."""
        if record.type not in self.handles:
            return None
        return self.update(state, record, record.event if event is None else event)


def apply_record(
    projector: Projector, doc: dict[str, Any] | None, record: Record, event: AnyEvent | None = None
) -> dict[str, Any]:
    """Apply one record to `doc` in memory (None starts a new chat at seq 1); returns the document."""
    if doc is None:
        if record.seq != 1:
            raise ProjectionError(f"chat {record.chat_id}: projection must start at seq 1, got {record.seq}")
        doc = projector.initial(record)
    if record.seq != doc["last_seq"] + 1:
        raise ProjectionError(
            f"chat {record.chat_id}: seq {record.seq} does not follow last_seq {doc['last_seq']}"
        )
    change = projector.step(doc, record, event)
    if change is not None:
        change.apply(doc)
    doc["last_seq"] = record.seq
    return doc


def fold(projector: Projector, doc: dict[str, Any] | None, records: Iterable[Record]) -> dict[str, Any]:
    """Apply `records` (consecutive seqs) to `doc` in memory; None starts a new chat at seq 1."""
    for record in records:
        doc = apply_record(projector, doc, record)
    if doc is None:
        raise ProjectionError("nothing to fold: no records and no document")
    return doc
