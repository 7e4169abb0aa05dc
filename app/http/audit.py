"""Auditing across chats: `GET /api/events` (app-wide history) and the tail anchors' key.

Auditors read every record of their app; users read the visible records of their own chats.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime
from typing import Annotated, Any, Final

import msgspec
from litestar import Controller, MediaType, Request, Response, get
from litestar.exceptions import PermissionDeniedException, ValidationException
from litestar.params import Parameter

from app.http.auth import Principal
from app.http.controllers import NdjsonOperation, check_event_types, ndjson, wants_ndjson
from app.http.errors import error_responses
from app.http.views import AuditRecord, View, audit_record
from app.settings import Settings
from domain.anchors import derive_key
from domain.audit import AuditFilter, BadCursor, Position
from domain.events import to_record
from domain.store import MongoEventStore

KEY_FILE: Final = "anchor.key"
PAGE_DEFAULT: Final = 100
PAGE_MAX: Final = 1000
_ndjson = msgspec.json.Encoder(enc_hook=str)


def anchor_key(settings: Settings) -> bytes:
    """The anchors' HMAC key: MOZAIKS_ANCHOR_KEY, else derived from the auth secret, else a local key file.

    In local mode (no secret) the key is made once, at random, in `<data_dir>/anchor.key` (mode 600):
    outside the database, so access to the database alone cannot forge anchors.
    """
    if settings.anchor_key:
        return settings.anchor_key.encode()
    if settings.auth_secret:
        return derive_key(settings.auth_secret)
    path = settings.data_dir / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first
        else:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


class AuditPage(View, frozen=True, kw_only=True):
    """`GET /api/events`: a page of records; pass `next` as `cursor` for the following page while `more`."""

    events: list[AuditRecord]
    next: str | None
    more: bool


def _line(doc: dict[str, Any]) -> bytes:
    doc["id"] = doc.pop("_id")
    return _ndjson.encode(doc) + b"\n"


def scope(principal: Principal, f: AuditFilter) -> AuditFilter:
    """`f` narrowed to what the caller may read: their app; for a non-auditor, their own visible records."""
    if "auditor" in principal.roles:
        return msgspec.structs.replace(f, app_id=principal.app_id)
    if f.user_id is not None and f.user_id != principal.user_id:
        raise PermissionDeniedException("only auditors read other users' records")
    return msgspec.structs.replace(f, app_id=principal.app_id, user_id=principal.user_id, visible=True)


class AuditController(Controller):
    """The app-wide record history for auditors (users: their own chats)."""

    path = "/api/events"

    @get(responses=error_responses(401, 403), operation_class=NdjsonOperation)
    async def events(
        self,
        request: Request[Principal, Any, Any],
        store: MongoEventStore,
        event_type: Annotated[list[str] | None, Parameter(query="type")] = None,
        agent: str | None = None,
        workflow: str | None = None,
        user_id: str | None = None,
        chat_id: str | None = None,
        run_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: Annotated[int | None, Parameter(ge=1)] = None,
        fmt: Annotated[str | None, Parameter(query="format")] = None,
    ) -> Response[AuditPage]:
        """Records of many chats, filtered, in time order (one chat or run: in seq order).

        JSON: a page of `limit` (default 100, at most 1000) records and the cursor after it.
        NDJSON (`Accept: application/x-ndjson` or `?format=ndjson`): every matching record after
        `cursor` (at most `limit`), streamed.
        """
        check_event_types(event_type)
        try:
            after = Position.decode(cursor) if cursor else None
        except BadCursor as exc:
            raise ValidationException(str(exc)) from None
        wanted = scope(
            request.user,
            AuditFilter(
                types=tuple(event_type or ()),
                agent=agent,
                workflow=workflow,
                user_id=user_id,
                chat_id=chat_id,
                run_id=run_id,
                since=since,
                until=until,
            ),
        )
        if wants_ndjson(request, fmt):
            return ndjson(store.audit(wanted, after=after, limit=limit), _line)  # type: ignore[return-value]
        if limit is not None and limit > PAGE_MAX:
            raise ValidationException(
                f"limit {limit} is above {PAGE_MAX} for JSON pages; ask for NDJSON to stream more"
            )
        size = limit or PAGE_DEFAULT
        docs = [doc async for doc in store.audit(wanted, after=after, limit=size)]
        last = Position.of(docs[-1]).encode() if docs else cursor
        page = AuditPage(
            events=[audit_record(to_record(doc)) for doc in docs], next=last, more=len(docs) == size
        )
        return Response(page, media_type=MediaType.JSON)
