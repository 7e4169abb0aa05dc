"""Model I/O: each model call's exact request and response, stored once as content-addressed parts.

A request splits into parts: its parameters (model, temperature, stream flags: everything but the
tools and the messages), its tool list, then each message as sent. The response is one part. A
part is canonical JSON (sorted keys, no whitespace) stored under its sha256 in `model_io_parts`,
immutable and inserted if absent, so call k's repeated history costs nothing after call k-1's: a
chat's storage grows with its distinct content, not with the square of its length. `llm.call`
holds the hashes (`request`, `response`); `io` says what was kept: "full" (parts stored),
"hashes" (only the hashes: proves what was sent, keeps no content), "off" (neither).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec

if TYPE_CHECKING:
    from pymongo.asynchronous.database import AsyncDatabase

    from domain.store import RetryPolicy

# The driver is imported where parts are stored (`PartStore`), not here: the settings name
# `RecordMode`, and `mozaiks --help` loads the settings without the database driver.

PARTS_COLLECTION: Final = "model_io_parts"
RecordMode = Literal["full", "hashes", "off"]
RECORD_MODES: Final = ("full", "hashes", "off")
# Duplicate key: the part is already stored (by another call, node or process): that is success.
_DUPLICATE_KEY: Final = 11000
_KNOWN_KEPT: Final = 200_000


def _plain(value: Any) -> Any:
    """JSON form of an object in a request that is not plain data (a pydantic model, as the SDK sends it)."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json", exclude_none=True)
    raise TypeError(f"{type(value).__name__} is not JSON data")


_canonical = msgspec.json.Encoder(order="sorted", enc_hook=_plain)
_decode = msgspec.json.Decoder()


def canonical(value: Any) -> bytes:
    """Canonical JSON of a value: sorted keys, no whitespace, UTF-8 (what a part's hash is over)."""
    return _canonical.encode(value)


def part_hash(body: bytes) -> str:
    """The part's id: sha256 of its canonical JSON, hex."""
    return hashlib.sha256(body).hexdigest()


class Parts(msgspec.Struct, kw_only=True):
    """One call's parts (hash -> canonical JSON) and how they are referenced from its `llm.call`."""

    request: list[str]
    response: str | None = None
    bodies: dict[str, bytes] = {}


def split_request(body: Mapping[str, Any]) -> tuple[list[str], dict[str, bytes]]:
    """The request's part hashes in order (parameters, tools, each message) and the parts by hash.

    The tools part is `null` when the request had no tools, so a request reassembles exactly.
    """
    params = {k: v for k, v in body.items() if k not in ("messages", "tools")}
    pieces: list[Any] = [params, body.get("tools"), *(body.get("messages") or [])]
    hashes: list[str] = []
    bodies: dict[str, bytes] = {}
    for piece in pieces:
        encoded = canonical(piece)
        digest = part_hash(encoded)
        hashes.append(digest)
        bodies[digest] = encoded
    return hashes, bodies


def split_call(request: Mapping[str, Any], response: Mapping[str, Any] | None) -> Parts:
    """All parts of one call: the request's, then the response's (None for a failed try)."""
    hashes, bodies = split_request(request)
    response_hash = None
    if response is not None:
        encoded = canonical(response)
        response_hash = part_hash(encoded)
        bodies[response_hash] = encoded
    return Parts(request=hashes, response=response_hash, bodies=bodies)


def request_key(hashes: Sequence[str]) -> str:
    """One hash naming a whole request: sha256 over its part hashes in order (replay matches on it)."""
    return part_hash(canonical(list(hashes)))


def assemble_request(hashes: Sequence[str], parts: Mapping[str, Any]) -> dict[str, Any]:
    """The request as sent, from its part hashes and the decoded parts (KeyError names a missing part)."""
    params, tools, *messages = (parts[h] for h in hashes)
    request: dict[str, Any] = dict(params)
    if tools is not None:
        request["tools"] = tools
    request["messages"] = list(messages)
    return request


def bad_part(hash_: str, body: bytes) -> str | None:
    """What is wrong with a stored part (its bytes do not hash to its id, or are not JSON); None when sound."""
    if part_hash(body) != hash_:
        return f"model I/O part {hash_[:12]}… does not match its hash"
    try:
        _decode.decode(body)
    except msgspec.DecodeError:
        return f"model I/O part {hash_[:12]}… is not JSON"
    return None


def decode_part(body: bytes) -> Any:
    """A stored part's value."""
    return _decode.decode(body)


def request_diff(expected: Sequence[str], got: Sequence[str], parts: Mapping[str, Any]) -> tuple[str, str]:
    """Where two requests first differ, and how: (what differs, a unified text diff).

    `parts` must hold the decoded parts of both requests (missing ones show as absent).
    """
    labels = ["parameters", "tools"]
    length = max(len(expected), len(got))
    for index in range(length):
        a = expected[index] if index < len(expected) else None
        b = got[index] if index < len(got) else None
        if a == b:
            continue
        label = (
            labels[index] if index < 2 else _message_label(index - 2, parts.get(b or "", parts.get(a or "")))
        )
        lines = difflib.unified_diff(
            _text(parts.get(a or "")) if a else [],
            _text(parts.get(b or "")) if b else [],
            fromfile=f"recorded {label}",
            tofile=f"replayed {label}",
            lineterm="",
        )
        return label, "\n".join(lines)
    return "nothing", ""


def _message_label(index: int, message: Any) -> str:
    role = message.get("role") if isinstance(message, dict) else None
    return f"message {index} ({role})" if role else f"message {index}"


def _text(value: Any) -> list[str]:
    """A part as lines to diff: a message's text content as is, anything else as indented JSON."""
    if (
        isinstance(value, dict)
        and isinstance(value.get("content"), str)
        and set(value) <= {"role", "content", "name"}
    ):
        return str(value["content"]).splitlines()
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines()


class PartStore:
    """The `model_io_parts` collection: parts inserted if absent, read by hash, checked against it.

    Remembers (bounded) the parts this process has stored, so a chat's repeated history is not sent
    again: each call writes only its new parts, in one unordered `insert_many`.
    """

    def __init__(self, db: AsyncDatabase[Any], retry: RetryPolicy | None = None) -> None:
        from domain.commit import DURABLE, GroupCommit
        from domain.store import RetryPolicy

        # Durable like the log: a part is on disk before the record naming it is appended.
        self.collection = db.get_collection(PARTS_COLLECTION, write_concern=DURABLE)
        self.retry = retry or RetryPolicy()
        self.known: OrderedDict[str, None] = OrderedDict()
        self.inserts = 0
        # Concurrent calls' parts go in one unordered insert while one is in flight (one database
        # operation for many model calls under load; README "Performance").
        self.commit = GroupCommit(self.collection, ordered=False)

    async def put(self, bodies: Mapping[str, bytes]) -> int:
        """Store the parts not known to be stored; returns how many were sent."""
        from pymongo.errors import BulkWriteError, WriteConcernError

        from domain.store import with_retries

        new = [{"_id": h, "body": b.decode()} for h, b in bodies.items() if h not in self.known]
        if not new:
            return 0

        async def insert() -> None:
            self.inserts += 1
            try:
                await self.commit.insert(new)
            except BulkWriteError as exc:
                others = [e for e in exc.details.get("writeErrors", []) if e.get("code") != _DUPLICATE_KEY]
                if others:
                    raise
                # Duplicates are parts already stored (by an earlier try whose reply was lost); an
                # unconfirmed write is transient: re-send until the parts are confirmed.
                concern = exc.details.get("writeConcernErrors")
                if concern:
                    raise WriteConcernError(
                        concern[0].get("errmsg", "write concern"), concern[0].get("code")
                    ) from exc

        await with_retries(self.retry, "storing model I/O parts", insert)
        for doc in new:
            self.remember(doc["_id"])
        return len(new)

    def remember(self, hash_: str) -> None:
        self.known[hash_] = None
        self.known.move_to_end(hash_)
        while len(self.known) > _KNOWN_KEPT:
            self.known.popitem(last=False)

    async def get(self, hashes: Iterable[str]) -> dict[str, bytes]:
        """The stored parts of `hashes` by hash, as their bytes (absent ones left out)."""
        wanted = list(dict.fromkeys(hashes))
        found: dict[str, bytes] = {}
        for start in range(0, len(wanted), 1000):
            async for doc in self.collection.find({"_id": {"$in": wanted[start : start + 1000]}}):
                found[doc["_id"]] = str(doc["body"]).encode()
        return found

    async def values(self, hashes: Iterable[str]) -> dict[str, Any]:
        """The stored parts of `hashes`, decoded."""
        return {h: decode_part(b) for h, b in (await self.get(hashes)).items()}


def call_hashes(data: Mapping[str, Any]) -> list[str]:
    """Every part hash an `llm.call` payload refers to (request parts, then the response)."""
    return [*(data.get("request") or []), *([data["response"]] if data.get("response") else [])]


class CallIO(msgspec.Struct, frozen=True, kw_only=True):
    """One call's exact request and response, reassembled from its parts (None where not kept)."""

    io: str
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    # Parts the record names that are not stored (a "full" call should have none).
    missing: list[str] = []


async def read_call(parts: PartStore, data: Mapping[str, Any]) -> CallIO:
    """Reassemble an `llm.call` payload's request and response from the stored parts."""
    io = str(data.get("io") or "off")
    hashes = call_hashes(data)
    found = await parts.values(hashes) if io == "full" else {}
    missing = [h for h in dict.fromkeys(hashes) if h not in found] if io == "full" else []
    requested = list(data.get("request") or [])
    request = assemble_request(requested, found) if requested and not set(requested) - set(found) else None
    answer = data.get("response")
    response = found.get(answer) if answer else None
    return CallIO(io=io, request=request, response=response, missing=missing)


async def check_calls(
    parts: PartStore, calls: Iterable[tuple[int, Mapping[str, Any]]]
) -> tuple[int, str] | None:
    """The first `llm.call` (seq, problem) whose stored parts are missing or do not match their hashes.

    Only calls recorded "full" keep parts; "hashes" and "off" calls have nothing stored to check.
    """
    full = [(seq, call_hashes(data)) for seq, data in calls if data.get("io") == "full"]
    stored = await parts.get(h for _, hashes in full for h in hashes)
    for seq, hashes in full:
        for hash_ in hashes:
            body = stored.get(hash_)
            problem = f"model I/O part {hash_[:12]}… is missing" if body is None else bad_part(hash_, body)
            if problem is not None:
                return seq, problem
    return None


async def scan_parts(parts: PartStore) -> AsyncIterator[tuple[str, bytes, str | None]]:
    """Every stored part: (hash, canonical JSON, what is wrong with it or None)."""
    async for doc in parts.collection.find({}, batch_size=2000):
        hash_, body = str(doc["_id"]), str(doc.get("body", "")).encode()
        yield hash_, body, bad_part(hash_, body)
