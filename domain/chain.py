"""Checking a chat's hash chain record by record: one fold shared by the per-chat and the log-wide check."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from domain.events import GENESIS_HASH, ForkedFrom, chain_hash


class Verification(msgspec.Struct, frozen=True, kw_only=True):
    """Result of recomputing one chat's hash chain."""

    chat_id: str
    ok: bool
    checked: int
    last_seq: int
    broken_seq: int | None = None
    detail: str | None = None
    # The seq of the chat's latest tail anchor, when one was checked (see domain.anchors).
    anchored_seq: int | None = None
    # A fork: the parent's record its chain is anchored in, checked too (see domain.lineage).
    forked_from: ForkedFrom | None = None


class ChainCheck:
    """Feed one chat's stored documents in seq order; stops at the first record that breaks the chain."""

    __slots__ = (
        "broken_seq",
        "chat_id",
        "checked",
        "detail",
        "last_hash",
        "last_seq",
        "watch_hash",
        "watch_seq",
    )

    def __init__(self, chat_id: str, watch_seq: int | None = None) -> None:
        """`watch_seq`: remember the stored hash of that seq (an anchored head) in `watch_hash`."""
        self.chat_id = chat_id
        self.watch_seq = watch_seq
        self.watch_hash: str | None = None
        self.checked = 0
        self.last_seq = 0
        self.last_hash = GENESIS_HASH
        self.broken_seq: int | None = None
        self.detail: str | None = None

    @property
    def ok(self) -> bool:
        """No broken record seen so far."""
        return self.broken_seq is None

    def add(self, doc: Mapping[str, Any]) -> bool:
        """Check the next document; False (and nothing more is checked) once the chain is broken."""
        if self.broken_seq is not None:
            return False
        seq = doc.get("seq")
        problem = None
        if seq != self.last_seq + 1:
            problem = f"expected seq {self.last_seq + 1}, found {seq}"
        elif doc.get("prev_hash") != self.last_hash:
            problem = "prev_hash does not match the previous record's hash"
        elif doc.get("hash") != chain_hash(self.last_hash, doc):
            problem = "hash does not match the record's content"
        if problem is not None:
            self.broken_seq = seq if isinstance(seq, int) else self.last_seq + 1
            self.detail = problem
            return False
        self.checked += 1
        self.last_seq += 1  # == seq, checked above
        if self.last_seq == self.watch_seq:
            self.watch_hash = str(doc["hash"])
        self.last_hash = str(doc["hash"])
        return True

    def result(self) -> Verification:
        """The verification so far."""
        return Verification(
            chat_id=self.chat_id,
            ok=self.ok,
            checked=self.checked,
            last_seq=self.last_seq,
            broken_seq=self.broken_seq,
            detail=self.detail,
        )
