"""File routes: upload (multipart), list and download a chat's files (see domain/files.py)."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Annotated, Any, Final
from urllib.parse import quote

from litestar import Controller, Request, get, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body
from litestar.response import Stream

from app.http import codes
from app.http.auth import Principal
from app.http.controllers import owned_chat
from app.http.errors import Refused, error_responses
from app.http.views import View
from app.settings import Settings
from domain.events import FileUploaded, Pending, StreamRef
from domain.files import FileRefused, FileStore, check_upload, is_named
from domain.store import MongoEventStore

# A multipart body carries its file and some framing: the body limit is the file limit plus this.
MULTIPART_OVERHEAD: Final = 64 * 1024
DOWNLOAD_TYPE: Final = "application/octet-stream"
_CODES: Final = {400: codes.BAD_REQUEST, 413: codes.TOO_LARGE, 415: codes.UNSUPPORTED_TYPE}


class FileView(View, frozen=True, kw_only=True):
    """A file of the chat, as its `file.uploaded` record says."""

    sha256: str
    name: str
    size: int
    content_type: str
    # The `file.uploaded` record.
    seq: int
    ts: datetime


class FileList(View, frozen=True, kw_only=True):
    """`GET /api/chats/{id}/files`: the chat's files, oldest first."""

    chat_id: str
    files: list[FileView]


def file_view(record: Any) -> FileView:
    data = record.data
    return FileView(
        sha256=data["sha256"],
        name=data["name"],
        size=data["size"],
        content_type=data["content_type"],
        seq=record.seq,
        ts=record.ts,
    )


class FilesController(Controller):
    """A chat's files: stored in GridFS by sha256, recorded as `file.uploaded`."""

    path = "/api/chats"

    @post("/{chat_id:str}/files", responses=error_responses(400, 401, 403, 404, 413, 415))
    async def upload(
        self,
        request: Request[Principal, Any, Any],
        chat_id: str,
        data: Annotated[UploadFile, Body(media_type=RequestEncodingType.MULTI_PART)],
        store: MongoEventStore,
        settings: Settings,
    ) -> FileView:
        """Upload a file to the chat (multipart field `data`; the chat's own user): stored once per sha256,
        recorded as `file.uploaded`. 413 past MOZAIKS_MAX_UPLOAD_MB, 415 for a type outside
        MOZAIKS_UPLOAD_TYPES, 400 for an empty file."""
        first = await owned_chat(store, request.user, chat_id, control=True)
        if not isinstance(data, UploadFile):
            raise Refused(400, codes.BAD_REQUEST, "send the file as multipart/form-data, in the field 'data'")
        name = (data.filename or "file").replace("\\", "/").rsplit("/", 1)[-1] or "file"
        content_type = data.content_type or ""
        size = data.file.seek(0, 2)
        data.file.seek(0)
        files = FileStore(store.db)
        try:
            check_upload(
                name, size, content_type, max_bytes=settings.max_upload_bytes, allowed=settings.upload_types
            )
            stored = await files.put(data.read, max_bytes=settings.max_upload_bytes)
        except FileRefused as exc:
            raise Refused(exc.status, _CODES[exc.status], str(exc)) from exc
        event = FileUploaded(sha256=stored.sha256, name=name, size=stored.size, content_type=content_type)
        stream = StreamRef(
            chat_id=chat_id, app_id=first.app_id, user_id=first.user_id, workflow=first.workflow
        )
        try:
            [record] = await store.append(stream, [Pending(event=event)], None)
        except BaseException:
            if stored.created:  # stored for this record alone: a file no record names is not kept
                with contextlib.suppress(Exception):
                    if not await is_named(store.events, stored.sha256):
                        await files.drop(stored.sha256)
            raise
        return file_view(record)

    @get("/{chat_id:str}/files", responses=error_responses(401, 403, 404))
    async def list_files(
        self, request: Request[Principal, Any, Any], chat_id: str, store: MongoEventStore
    ) -> FileList:
        """The chat's uploaded files (owner, auditors of its app)."""
        await owned_chat(store, request.user, chat_id)
        records = store.find(chat_id, types=["file.uploaded"])
        return FileList(chat_id=chat_id, files=[file_view(r) async for r in records])

    @get(
        "/{chat_id:str}/files/{sha256:str}",
        media_type=DOWNLOAD_TYPE,
        responses={
            200: ResponseSpec(
                data_container=bytes,
                media_type=DOWNLOAD_TYPE,
                description="The file's bytes as an attachment (its own type is in the list and the record)",
                generate_examples=False,
            ),
            **error_responses(401, 403, 404),
        },
    )
    async def download(
        self, request: Request[Principal, Any, Any], chat_id: str, sha256: str, store: MongoEventStore
    ) -> Stream:
        """The bytes of a file uploaded to the chat (owner, auditors of its app), as an attachment.

        Always `application/octet-stream`: an uploaded file is never rendered by the browser as the
        runtime's own content (its declared type is in the list and in its record)."""
        await owned_chat(store, request.user, chat_id)
        found = [
            r async for r in store.find(chat_id, types=["file.uploaded"]) if r.data.get("sha256") == sha256
        ]
        if not found:
            raise NotFoundException(f"chat {chat_id} has no uploaded file {sha256}")
        view = file_view(found[-1])
        files = FileStore(store.db)
        if await files.first(sha256) is None:
            raise NotFoundException(f"file {sha256} of chat {chat_id} is recorded but not stored")
        return Stream(
            files.chunks_of(sha256),
            media_type=DOWNLOAD_TYPE,
            headers={
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(view.name)}",
                "Content-Length": str(view.size),
            },
        )


def files_controller(settings: Settings) -> type[FilesController]:
    """The files routes with this app's body limit (MOZAIKS_MAX_UPLOAD_MB plus the multipart framing)."""
    limit = settings.max_upload_bytes + MULTIPART_OVERHEAD
    return type("FilesController", (FilesController,), {"request_max_body_size": limit})
