"""Uploaded files: content-addressed (sha256) in GridFS in the same database, deduplicated by hash.

A chat's log holds `file.uploaded` (sha256, name, size, content type) for each file given to it, so a
file is verifiable like a record: its bytes hash to the name it is stored under.

How an upload is stored without leaving anything behind when it fails midway: the bytes are written
to GridFS (pymongo's `AsyncGridFSBucket`, bucket `uploads`) under a temporary name
(`partial/<uuid>`), hashed as they go; any error (a broken source, the database, a cancelled
request) aborts the write, which removes the chunks written so far. Only a whole file is renamed to
its sha256, and only then is `file.uploaded` recorded. If a file of that hash is stored already,
the new copy is deleted (the first one of that name stays: two uploads of the same bytes at once
keep exactly one).

What a node killed midway leaves behind (the chunks of a `partial/` write it never finished or
aborted; a whole file it never renamed; a file renamed but never recorded) is removed by `sweep`
once it is `ABANDONED_AFTER` old (the node's periodic sweep runs it, see app/runs/supervisor.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import msgspec

from domain.errors import MozaiksError

if TYPE_CHECKING:
    from pymongo.asynchronous.collection import AsyncCollection
    from pymongo.asynchronous.database import AsyncDatabase

# The driver (gridfs) is imported by `FileStore`, not here: the settings name `DEFAULT_TYPES`, and
# `mozaiks --help` loads the settings without the database driver.

BUCKET: Final = "uploads"
PARTIAL: Final = "partial/"
# What an upload may be unless MOZAIKS_UPLOAD_TYPES says otherwise.
DEFAULT_TYPES: Final = (
    "text/*",
    "application/json",
    "application/pdf",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
)
READ_CHUNK: Final = 256 * 1024
# A download is sent in pieces of this size (GridFS chunks are 255 KB: several per piece).
DOWNLOAD_PIECE: Final = 1024 * 1024
# An upload's leftovers are removed by `sweep` once they are this old: far longer than any upload
# takes (the request body is received before the write starts, and a file of MOZAIKS_MAX_UPLOAD_MB
# is written in seconds), so a write still going on, or a file renamed but not yet recorded, is
# never swept. Age: a partial write's first chunk's ObjectId (the time it was written), a file's
# `uploadDate` (the time its write was closed).
ABANDONED_AFTER: Final = timedelta(hours=1)


class FileRefused(MozaiksError):
    """An upload turned down before anything was stored: `status` 400 (empty), 413 (too large), 415 (type)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        super().__init__(detail)


class Swept(msgspec.Struct, frozen=True, kw_only=True):
    """What `FileStore.sweep` removed: partial writes (chunks, and a files document if it was closed),
    and whole files no `file.uploaded` record names."""

    partial: int = 0
    unnamed: int = 0


async def is_named(events: AsyncCollection[Any], sha: str) -> bool:
    """Whether a `file.uploaded` record of any chat names the file of that hash."""
    return await events.find_one({"type": "file.uploaded", "data.sha256": sha}, {"_id": 1}) is not None


class StoredFile(msgspec.Struct, frozen=True, kw_only=True):
    """A file in the bucket: its hash, size, and whether this upload stored it (False: it was there)."""

    sha256: str
    size: int
    created: bool


def type_allowed(content_type: str, allowed: Iterable[str]) -> bool:
    """Whether `content_type` (parameters ignored) matches one of `allowed` (`text/*` style patterns)."""
    media = content_type.split(";")[0].strip().lower()
    return bool(media) and any(fnmatch.fnmatchcase(media, pattern.strip().lower()) for pattern in allowed)


def check_upload(name: str, size: int, content_type: str, *, max_bytes: int, allowed: Iterable[str]) -> None:
    """Refuse an upload by its size and type (FileRefused), before it is stored."""
    if size > max_bytes:
        raise FileRefused(
            413, f"file {name!r} has {size} bytes; the limit is {max_bytes} (MOZAIKS_MAX_UPLOAD_MB)"
        )
    if size == 0:
        raise FileRefused(400, f"file {name!r} is empty")
    if not type_allowed(content_type, allowed):
        raise FileRefused(
            415,
            f"file {name!r} is {content_type or 'of no type'}; allowed: {', '.join(allowed)} (MOZAIKS_UPLOAD_TYPES)",
        )


def text_of(content: bytes, limit: int) -> str:
    """A file's bytes as text for an agent: decoded as UTF-8 (undecodable bytes replaced), cut at `limit`
    characters with a note saying so."""
    text = content.decode("utf-8", errors="replace")
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... cut at {limit} characters of {len(text)}]"


class FileStore:
    """The GridFS bucket of uploaded files, named by sha256."""

    def __init__(self, db: AsyncDatabase[Any]) -> None:
        from gridfs import AsyncGridFSBucket

        from domain.commit import DURABLE  # the driver, only once files are stored: not for `--help`

        self.db = db
        # Durable like the log: a file is on disk before the `file.uploaded` naming it is appended. On
        # the database, not the bucket: an upload stream writes with its database's write concern.
        durable = db.with_options(write_concern=DURABLE)
        self.bucket = AsyncGridFSBucket(durable, bucket_name=BUCKET)
        self.files = durable[f"{BUCKET}.files"]
        self.chunks = durable[f"{BUCKET}.chunks"]

    async def put(self, read: Callable[[int], Awaitable[bytes]], *, max_bytes: int) -> StoredFile:
        """Store the bytes `read(n)` gives until it gives b"" (FileRefused 413 past `max_bytes`).

        A failure midway removes what was written; a file already stored under the same hash is kept
        and this copy dropped.
        """
        digest = hashlib.sha256()
        size = 0

        class Source:
            @staticmethod
            async def read(n: int = -1) -> bytes:
                nonlocal size
                data = await read(READ_CHUNK if n is None or n < 0 else n)
                size += len(data)
                if size > max_bytes:
                    raise FileRefused(
                        413, f"the file is larger than {max_bytes} bytes (MOZAIKS_MAX_UPLOAD_MB)"
                    )
                digest.update(data)
                return data

        temporary = f"{PARTIAL}{uuid.uuid4().hex}"
        upload = self.bucket.open_upload_stream_with_id(temporary, temporary)
        try:
            await upload.write(Source())
            await upload.close()
        except BaseException:
            await upload.abort()
            raise
        sha = digest.hexdigest()
        try:
            await self.bucket.rename(temporary, sha)
            first = await self.first(sha)
        except BaseException:
            await self.bucket.delete(temporary)
            raise
        if first is not None and first["_id"] != temporary:
            await self.bucket.delete(temporary)
            return StoredFile(sha256=sha, size=size, created=False)
        return StoredFile(sha256=sha, size=size, created=True)

    async def first(self, sha: str) -> dict[str, Any] | None:
        """The stored file of that hash (the earliest, when two uploads raced)."""
        doc = await self.files.find_one({"filename": sha}, sort=[("uploadDate", 1), ("_id", 1)])
        return dict(doc) if doc is not None else None

    async def drop(self, sha: str) -> None:
        """Remove the file of that hash (a stored file no record will name)."""
        async for doc in self.files.find({"filename": sha}, {"_id": 1}):
            await self.bucket.delete(doc["_id"])

    async def sweep(
        self,
        events: AsyncCollection[Any],
        *,
        now: datetime | None = None,
        older_than: timedelta = ABANDONED_AFTER,
    ) -> Swept:
        """Remove what uploads left behind that is `older_than` (ABANDONED_AFTER) at `now`: every
        `partial/` write (its chunks, and its files document if it was closed but never renamed), and
        every whole file no `file.uploaded` record in `events` names. Recorded files are never touched.
        Nodes may sweep at once: each removal is idempotent."""
        from bson import ObjectId

        cutoff = (now or datetime.now(UTC)) - older_than
        # Every file keeps its `partial/<uuid>` id (a rename changes its filename only): a write never
        # closed is one whose chunks have no files document (`close` writes it).
        left: set[Any] = set()
        async for chunk in self.chunks.find(
            {"files_id": {"$regex": f"^{PARTIAL}"}, "n": 0, "_id": {"$lt": ObjectId.from_datetime(cutoff)}},
            {"files_id": 1},
        ):
            if await self.files.find_one({"_id": chunk["files_id"]}, {"_id": 1}) is None:
                left.add(chunk["files_id"])
        named = {
            str((doc.get("data") or {}).get("sha256"))
            async for doc in events.find({"type": "file.uploaded"}, {"data.sha256": 1})
        }
        unnamed = 0
        async for doc in self.files.find({"uploadDate": {"$lt": cutoff}}, {"_id": 1, "filename": 1}):
            name = str(doc.get("filename"))
            if name.startswith(PARTIAL):
                left.add(doc["_id"])  # closed, never renamed
            elif name not in named and not await is_named(events, name):  # asked again: recorded since?
                await self._remove(doc["_id"])
                unnamed += 1
        for files_id in left:
            await self._remove(files_id)
        return Swept(partial=len(left), unnamed=unnamed)

    async def _remove(self, files_id: Any) -> None:
        """Delete a file's document (if any) and its chunks; nothing to delete is no error."""
        await self.files.delete_one({"_id": files_id})
        await self.chunks.delete_many({"files_id": files_id})

    async def chunks_of(self, sha: str, limit: int | None = None) -> AsyncIterator[bytes]:
        """The file's bytes, chunk by chunk (at most `limit` bytes). Raises KeyError when it is not stored."""
        doc = await self.first(sha)
        if doc is None:
            raise KeyError(sha)
        left = limit
        async with await self.bucket.open_download_stream(doc["_id"]) as stream:
            while left is None or left > 0:
                data = await stream.read(DOWNLOAD_PIECE if left is None else min(left, DOWNLOAD_PIECE))
                if not data:
                    return
                if left is not None:
                    data = data[:left]
                    left -= len(data)
                yield data

    async def read(self, sha: str, limit: int) -> bytes:
        """The first `limit` bytes of the file."""
        return b"".join([chunk async for chunk in self.chunks_of(sha, limit)])
