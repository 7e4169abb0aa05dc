"""UI answers over REST: `POST /api/chats/{chat_id}/ui/{request_id}` with `{"answer": …}`.

The same path as the WebSocket's `ui.response` frame and AG-UI's answers (`RunSupervisor.answer_ui`):
validated against the request as the log holds it, then recorded as `ui.responded`; a refusal
(422 with the failing JSON path, 404, 409, 403) records nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, post
from litestar.status_codes import HTTP_202_ACCEPTED

from app.http.auth import Principal
from app.http.controllers import owned_chat
from app.http.errors import error_responses
from app.runs.supervisor import RunSupervisor
from domain.store import MongoEventStore


class UiAnswer(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /api/chats/{id}/ui/{request_id}`: the answer (a form's object, a choice's option, a confirm's boolean)."""

    answer: Any


class UiAnswered(msgspec.Struct, frozen=True, kw_only=True):
    """The answer was recorded: the `ui.responded` record's seq."""

    chat_id: str
    request_id: str
    seq: int


@post(
    "/api/chats/{chat_id:str}/ui/{request_id:str}",
    status_code=HTTP_202_ACCEPTED,
    responses=error_responses(400, 401, 403, 404, 409, 422, 503),
)
async def answer_ui_request(
    request: Request[Principal, Any, Any],
    chat_id: str,
    request_id: str,
    data: UiAnswer,
    store: MongoEventStore,
    supervisor: RunSupervisor,
) -> UiAnswered:
    """Answer a UI request of the chat (a form, a choice or a confirm an agent is waiting on)."""
    await owned_chat(store, request.user, chat_id, control=True)
    record = await supervisor.answer_ui(chat_id, request_id, data.answer, request.user.user_id)
    return UiAnswered(chat_id=chat_id, request_id=request_id, seq=record.seq)
