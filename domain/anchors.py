"""Tail anchors: signed, per-app-chained copies of chat heads, kept apart from the log they vouch for.

The per-chat hash chain catches an edited, inserted or removed record inside a chat, but not the
removal of a chat's last records or of the whole chat: nothing in the chain remembers where it
ended. An anchor does: `(chat_id, seq, hash)` of a chat's head at some moment, in the
`chain_anchors` collection, HMAC-signed and chained per app (`n` = 1, 2, 3 … and `prev_sig`). A
chat whose log now ends before its last anchored seq, whose record at that seq changed, or that is
gone, is reported by every verification.

What it does not protect against: a writer who holds the key can rewrite the log and the anchors
alike; one without it can still delete the newest anchors together with the tail they vouch for
(the chain shows no gap at its end). A copy of the anchors kept elsewhere
(`mozaiks audit anchors export`) is the stronger check.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from domain.chain import ChainCheck, Verification
from domain.commit import DURABLE
from domain.events import GENESIS_HASH, now

ANCHORS: Final = "chain_anchors"
DUPLICATE_KEY: Final = 11000
INSERT_BATCH: Final = 1000
_KEY_LABEL: Final = b"mozaiks chain anchors v1"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_signed = msgspec.json.Encoder()


def derive_key(secret: str) -> bytes:
    """The anchor key derived from another secret (the auth secret), distinct from it."""
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


class Head(msgspec.Struct, frozen=True, kw_only=True):
    """A chat's last record: what an anchor vouches for."""

    app_id: str
    chat_id: str
    seq: int
    hash: str


class Anchor(msgspec.Struct, frozen=True, kw_only=True, rename={"id": "_id"}):
    """One stored anchor: the head of `chat_id` at `ts`, number `n` of its app's chain."""

    id: str
    app_id: str
    n: int
    chat_id: str
    seq: int
    hash: str
    ts: datetime
    prev_sig: str
    sig: str

    def expected_sig(self, key: bytes) -> str:
        """The signature these fields should carry under `key`."""
        return signature(key, self.app_id, self.n, self.chat_id, self.seq, self.hash, self.ts, self.prev_sig)

    def signed_by(self, key: bytes) -> bool:
        """Whether the stored signature matches the fields under `key`."""
        return hmac.compare_digest(self.expected_sig(key), self.sig)

    def describe(self) -> str:
        """`anchor P#12 of 2026-12-01T10:00:00Z`."""
        return (
            f"anchor {self.app_id}#{self.n} of {self.ts.astimezone(UTC).isoformat().replace('+00:00', 'Z')}"
        )


def signature(
    key: bytes, app_id: str, n: int, chat_id: str, seq: int, hash_: str, ts: datetime, prev_sig: str
) -> str:
    """HMAC-SHA256 over every field of an anchor but its signature (time as epoch milliseconds)."""
    aware = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    body = [app_id, n, chat_id, seq, hash_, (aware - _EPOCH) // timedelta(milliseconds=1), prev_sig]
    return hmac.new(key, _signed.encode(body), hashlib.sha256).hexdigest()


class AnchorScan(msgspec.Struct, kw_only=True):
    """Every anchor checked: the latest trustworthy one per chat, and what is wrong with the rest."""

    latest: dict[str, Anchor]
    problems: list[str]
    count: int
    # id -> signature of every stored anchor, to compare an exported copy with.
    signatures: dict[str, str] = {}

    def compare(self, exported: Iterable[Mapping[str, Any]], key: bytes) -> None:
        """Check the database's anchors against an exported copy kept elsewhere.

        An exported anchor missing from the database, or stored differently, is a problem, and a
        valid exported anchor newer than the database's latest for its chat becomes that chat's latest.
        """
        for doc in exported:
            anchor = _anchor(doc)
            if anchor is None:
                self.problems.append(f"exported anchor {doc.get('_id')!r} is malformed")
                continue
            if not anchor.signed_by(key):
                self.problems.append(f"exported {anchor.describe()}: signature does not match this key")
                continue
            stored = self.signatures.get(anchor.id)
            if stored is None:
                self.problems.append(
                    f"{anchor.describe()} (chat {anchor.chat_id}, seq {anchor.seq}) is in the exported file "
                    "but not in the database: anchors were deleted"
                )
            elif stored != anchor.sig:
                self.problems.append(f"{anchor.describe()} differs from the exported copy")
            current = self.latest.get(anchor.chat_id)
            if current is None or current.n < anchor.n:
                self.latest[anchor.chat_id] = anchor


class AnchorBook:
    """The `chain_anchors` collection: appends signed anchors, finds and checks them."""

    def __init__(self, db: AsyncDatabase[Any], key: bytes) -> None:
        self.key = key
        self.anchors: AsyncCollection[Any] = db.get_collection(ANCHORS, write_concern=DURABLE)

    async def ensure_indexes(self) -> None:
        """The per-app chain guard `(app_id, n)` and the per-chat lookup (idempotent)."""
        await self.anchors.create_indexes(
            [
                IndexModel([("app_id", ASCENDING), ("n", ASCENDING)], unique=True, name="app_n"),
                IndexModel([("chat_id", ASCENDING), ("n", DESCENDING)], name="chat_n"),
            ]
        )

    async def append(self, heads: Iterable[Head]) -> int:
        """Anchor `heads`, chaining each app's anchors after its last one; returns how many were written.

        Another writer chaining the same app at the same moment takes some numbers first (the
        unique `(app_id, n)` guard): the rest are re-chained after its anchors.
        """
        by_app: dict[str, list[Head]] = {}
        for head in heads:
            by_app.setdefault(head.app_id, []).append(head)
        written = 0
        for app_id, pending in by_app.items():
            while pending:
                batch, pending = pending[:INSERT_BATCH], pending[INSERT_BATCH:]
                written += await self._append_app(app_id, batch)
        return written

    async def _append_app(self, app_id: str, heads: list[Head]) -> int:
        written = 0
        while heads:
            last = await self.anchors.find_one(
                {"app_id": app_id}, {"n": 1, "sig": 1}, sort=[("n", DESCENDING)]
            )
            n = int(last["n"]) if last else 0
            prev = str(last["sig"]) if last else GENESIS_HASH
            ts = now()
            docs: list[dict[str, Any]] = []
            for head in heads:
                n += 1
                sig = signature(self.key, app_id, n, head.chat_id, head.seq, head.hash, ts, prev)
                docs.append(
                    {
                        "_id": f"{app_id}#{n}",
                        "app_id": app_id,
                        "n": n,
                        "chat_id": head.chat_id,
                        "seq": head.seq,
                        "hash": head.hash,
                        "ts": ts,
                        "prev_sig": prev,
                        "sig": sig,
                    }
                )
                prev = sig
            try:
                await self.anchors.insert_many(docs, ordered=True)
            except BulkWriteError as exc:
                inserted = int(exc.details.get("nInserted", 0))
                errors = exc.details.get("writeErrors") or [{}]
                if errors[0].get("code") != DUPLICATE_KEY:
                    raise
                written += inserted
                heads = heads[inserted:]
                continue
            written += len(docs)
            heads = []
        return written

    async def latest(self, chat_id: str) -> Anchor | None:
        """The chat's most recent anchor (signature not checked here: see `judge`), or None."""
        doc = await self.anchors.find_one({"chat_id": str(chat_id)}, sort=[("n", DESCENDING)])
        return _anchor(doc) if doc is not None else None

    def documents(self, app_id: str | None = None) -> Any:
        """A cursor over the anchors (of one app), by app and number."""
        query: dict[str, Any] = {} if app_id is None else {"app_id": str(app_id)}
        return self.anchors.find(query, sort=[("app_id", ASCENDING), ("n", ASCENDING)])

    async def scan(self, app_id: str | None = None) -> AnchorScan:
        """Check every anchor (of one app): signature, numbering and chaining; the latest per chat."""
        latest: dict[str, Anchor] = {}
        problems: list[str] = []
        signatures: dict[str, str] = {}
        count = 0
        app: str | None = None
        expected_n, prev_sig = 1, GENESIS_HASH
        async for doc in self.documents(app_id):
            count += 1
            anchor = _anchor(doc)
            if anchor is None:
                problems.append(f"anchor {doc.get('_id')!r} is malformed")
                continue
            signatures[anchor.id] = anchor.sig
            if anchor.app_id != app:
                app, expected_n, prev_sig = anchor.app_id, 1, GENESIS_HASH
            if anchor.n != expected_n:
                problems.append(f"anchors {app}#{expected_n}..#{anchor.n - 1} are missing")
            elif anchor.prev_sig != prev_sig:
                problems.append(f"{anchor.describe()} does not chain to {app}#{anchor.n - 1}")
            if not anchor.signed_by(self.key):
                problems.append(
                    f"{anchor.describe()} (chat {anchor.chat_id}): signature does not match: "
                    "edited, or signed with another key"
                )
            else:
                latest[anchor.chat_id] = anchor
            expected_n, prev_sig = anchor.n + 1, anchor.sig
        return AnchorScan(latest=latest, problems=problems, count=count, signatures=signatures)


def _anchor(doc: Mapping[str, Any]) -> Anchor | None:
    try:
        return msgspec.convert(dict(doc), Anchor)
    except (msgspec.ValidationError, TypeError):
        return None


def judge(check: ChainCheck, anchor: Anchor | None, key: bytes | None) -> Verification:
    """A chat's chain check against its latest anchor: removed tail, rewritten head, deleted chat, bad anchor."""
    result = check.result()
    if anchor is None:
        return result
    result = msgspec.structs.replace(result, anchored_seq=anchor.seq)
    if key is not None and not anchor.signed_by(key):
        detail = f"{anchor.describe()} has a bad signature (edited, or signed with another key)"
        return msgspec.structs.replace(result, ok=False, detail=_join(result.detail, detail))
    if not result.ok:
        return result  # the chain itself breaks first; that is the first broken seq
    where = f"seq {anchor.seq} was anchored in {anchor.describe()}"
    if check.checked == 0:
        return msgspec.structs.replace(
            result,
            ok=False,
            broken_seq=1,
            detail=f"the log has no records of this chat, but {where}: the chat was deleted",
        )
    if check.last_seq < anchor.seq:
        return msgspec.structs.replace(
            result,
            ok=False,
            broken_seq=check.last_seq + 1,
            detail=f"the log ends at seq {check.last_seq}, but {where}: records were removed from its end",
        )
    if check.watch_seq == anchor.seq and check.watch_hash != anchor.hash:
        return msgspec.structs.replace(
            result,
            ok=False,
            broken_seq=anchor.seq,
            detail=f"record seq {anchor.seq} is not the one anchored ({where}): the chat was rewritten",
        )
    return result


def _join(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second
