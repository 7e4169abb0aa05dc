"""One error shape for every REST error, Litestar's own included: `{"error": code, "detail": text}`,
plus `fields` when a parameter or body failed validation.

Codes come from `app.http.codes`; the WebSocket's error frames use the same codes (`error_code`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec
import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.types import ExceptionHandlersMap
from pymongo.errors import ConnectionFailure

from app.http import codes
from app.http.auth import IdentityUnavailable, TokenRefused
from app.runs.budgets import BudgetReached
from app.runs.supervisor import NoActiveRun, NodeBusy, RunActive
from app.runs.ui import InvalidAnswer, UiRequestClosed, UnknownUiRequest
from app.runs.workflows import UnknownWorkflow
from domain.errors import Conflict, CorruptRecord, StorageUnavailable, UnknownChat

log = structlog.get_logger("mozaiks.http")


class FieldProblem(msgspec.Struct, frozen=True, kw_only=True):
    """One invalid parameter or body field."""

    name: str
    message: str
    source: str | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Every REST error: a stable code to branch on, a sentence for people, and the invalid fields."""

    error: str
    detail: str
    fields: list[FieldProblem] | None = None


# Status → code for errors raised as Litestar's HTTPException (its own 400/401/403/404/405/413/429 among them).
_CODE_BY_STATUS: Final[Mapping[int, str]] = {
    400: codes.BAD_REQUEST,
    401: codes.UNAUTHORIZED,
    403: codes.FORBIDDEN,
    404: codes.NOT_FOUND,
    405: codes.METHOD_NOT_ALLOWED,
    409: codes.CONFLICT,
    413: codes.TOO_LARGE,
    429: codes.RATE_LIMITED,
    500: codes.INTERNAL,
    503: codes.NOT_READY,
}
# The runtime's own errors: status and code.
_DOMAIN: Final[Mapping[type[Exception], tuple[int, str]]] = {
    UnknownChat: (404, codes.UNKNOWN_CHAT),
    BudgetReached: (429, codes.BUDGET_EXCEEDED),
    UnknownWorkflow: (404, codes.UNKNOWN_WORKFLOW),
    Conflict: (409, codes.CONFLICT),
    RunActive: (409, codes.RUN_ACTIVE),
    NoActiveRun: (409, codes.NO_ACTIVE_RUN),
    UnknownUiRequest: (404, codes.UNKNOWN_REQUEST),
    UiRequestClosed: (409, codes.REQUEST_CLOSED),
    InvalidAnswer: (422, codes.INVALID_ANSWER),
    NodeBusy: (503, codes.NODE_BUSY),
    CorruptRecord: (500, codes.CORRUPT_RECORD),
    # The database does not answer: past the store's retry budget, or a read that found no server.
    StorageUnavailable: (503, codes.STORAGE_UNAVAILABLE),
    ConnectionFailure: (503, codes.STORAGE_UNAVAILABLE),
    IdentityUnavailable: (503, codes.IDENTITY_UNAVAILABLE),
}
STORAGE_RETRY_AFTER_S: Final = 5


class Refused(Exception):
    """A request turned down with its own status and code (for refusals no domain error names)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(detail)


def error_code(exc: Exception) -> str:
    """The code of an error, the same on REST and on the WebSocket."""
    if isinstance(exc, (Refused, TokenRefused)):
        return exc.code
    for kind, (_, code) in _DOMAIN.items():
        if isinstance(exc, kind):
            return code
    if isinstance(exc, HTTPException):
        return _CODE_BY_STATUS.get(exc.status_code, codes.ERROR)
    return codes.ERROR


def _fields(extra: Any) -> list[FieldProblem] | None:
    if not isinstance(extra, list) or not extra:
        return None
    problems = []
    for item in extra:
        if isinstance(item, Mapping):
            source = item.get("source")
            problems.append(
                FieldProblem(
                    name=str(item.get("key") or ""),
                    message=str(item.get("message") or ""),
                    source=str(getattr(source, "value", source)) if source is not None else None,
                )
            )
    return problems or None


def _response(status: int, body: ErrorBody, headers: Mapping[str, str] | None = None) -> Response[ErrorBody]:
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=dict(headers or {}))


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    status = exc.status_code
    if status >= 500:
        log.error("request.failed", method=request.method, path=request.url.path, error=repr(exc))
    fields = _fields(exc.extra) if status == 400 else None
    return _response(
        status, ErrorBody(error=error_code(exc), detail=str(exc.detail), fields=fields), exc.headers
    )


def _domain_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    status, code = next(pair for kind, pair in _DOMAIN.items() if isinstance(exc, kind))
    if status >= 500:
        log.error("request.failed", method=request.method, path=request.url.path, error=repr(exc))
    headers: dict[str, str] | None = None
    if isinstance(exc, NodeBusy):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, BudgetReached):
        seconds = exc.exceeded.retry_after_s()
        headers = {"Retry-After": str(seconds)} if seconds is not None else None
    elif code in (codes.STORAGE_UNAVAILABLE, codes.IDENTITY_UNAVAILABLE):
        headers = {"Retry-After": str(STORAGE_RETRY_AFTER_S)}
    fields = None
    if isinstance(exc, InvalidAnswer):  # the failing JSON path of the answer, like any invalid field
        fields = [FieldProblem(name=exc.path, message=exc.message, source="body")]
    return _response(status, ErrorBody(error=code, detail=str(exc), fields=fields), headers)


def _refused(request: Request[Any, Any, Any], exc: Refused) -> Response[ErrorBody]:
    return _response(exc.status, ErrorBody(error=exc.code, detail=exc.detail))


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.error("request.crashed", method=request.method, path=request.url.path, exc_info=exc)
    return _response(
        500, ErrorBody(error=codes.INTERNAL, detail="internal server error; the server log has the details")
    )


EXCEPTION_HANDLERS: Final[ExceptionHandlersMap] = {
    HTTPException: _http_error,
    **{kind: _domain_error for kind in _DOMAIN},
    Refused: _refused,
    Exception: _unexpected,
}

_DESCRIPTIONS: Final[Mapping[int, str]] = {
    400: "A parameter or the body is invalid (`fields` names each one)",
    401: "No bearer token, or an invalid one",
    403: "Not yours, or a role is missing",
    404: "No such chat, workflow or document",
    409: "The chat's state forbids it (a run is going, or none is; a UI request already closed)",
    413: "The body is too large",
    415: "The upload's content type is not allowed (MOZAIKS_UPLOAD_TYPES)",
    422: "The answer does not fit the UI request (`fields` names the failing JSON path), or a fork's "
    "at_seq is past the chat's end or not a message (`bad_fork_point`)",
    429: "Too many chat starts (`rate_limited`; RateLimit-Reset says when to retry), or a budget is spent "
    "(`budget_exceeded`; Retry-After for daily limits)",
    500: "A stored record cannot be read, or a bug",
    503: "The node runs MOZAIKS_MAX_ACTIVE_RUNS runs (`node_busy`), or the database does not answer "
    "(`storage_unavailable`); Retry-After says when to retry",
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the errors a route answers with (400, 500 and 503 always): all one `ErrorBody` shape."""
    return {
        status: ResponseSpec(
            data_container=ErrorBody,
            description=_DESCRIPTIONS.get(status, "Error"),
            examples=[Example(value={"error": _CODE_BY_STATUS.get(status, codes.ERROR), "detail": "…"})],
            generate_examples=False,
        )
        for status in sorted({400, *statuses, 500, 503})
    }
