"""The codes a client acts on, in one place: error codes (REST bodies and WebSocket error frames),
WebSocket close codes and chat statuses.

`app/static/js/codes.js` holds the same values for the ChatUI; `tests/test_contract.py` checks that
the two agree.
"""

from __future__ import annotations

from typing import Final

from projections.sessions import STATUS_BY_TYPE

# ---- error codes: `{"error": CODE, "detail": ...}` on REST, `{"type": "error", "code": CODE}` on the socket
BAD_REQUEST: Final = "bad_request"  # 400: a parameter or body failed validation (`fields` says which)
UNAUTHORIZED: Final = "unauthorized"  # 401: no token, or a bad one
TOKEN_EXPIRED: Final = "token_expired"  # 401: the token's exp has passed
TOKEN_NOT_YET_VALID: Final = "token_not_yet_valid"  # 401: the token's nbf is still ahead
WRONG_AUDIENCE: Final = "wrong_audience"  # 401: aud is not MOZAIKS_OIDC_AUDIENCE
WRONG_ISSUER: Final = "wrong_issuer"  # 401: iss is not MOZAIKS_OIDC_ISSUER
UNKNOWN_KEY: Final = "unknown_key"  # 401: no key of the provider's JWKS has the token's kid
BAD_SIGNATURE: Final = "bad_signature"  # 401: the signature does not match the token
ALGORITHM_NOT_ALLOWED: Final = "algorithm_not_allowed"  # 401: none, or an alg outside the allow-list
IDENTITY_UNAVAILABLE: Final = "identity_unavailable"  # 503: the provider's keys cannot be fetched
FORBIDDEN: Final = "forbidden"  # 403: not yours, or a missing role
NOT_FOUND: Final = "not_found"  # 404: no such route or document
UNKNOWN_CHAT: Final = "unknown_chat"  # 404: no chat with that id
UNKNOWN_WORKFLOW: Final = "unknown_workflow"  # 404: no loaded workflow with that name
METHOD_NOT_ALLOWED: Final = "method_not_allowed"  # 405
CONFLICT: Final = "conflict"  # 409: the log moved on under an append
RUN_ACTIVE: Final = "run_active"  # 409: the chat has a run going
NO_ACTIVE_RUN: Final = "no_active_run"  # 409: nothing to stop
TOO_LARGE: Final = "too_large"  # 413: body over MOZAIKS_MAX_BODY_BYTES
RATE_LIMITED: Final = "rate_limited"  # 429: too many chat starts; see RateLimit-Reset
BUDGET_EXCEEDED: Final = (
    "budget_exceeded"  # 429: a chat, app or user budget is spent; Retry-After for daily ones
)
CORRUPT_RECORD: Final = "corrupt_record"  # 500: a stored record cannot be read
INTERNAL: Final = "internal_error"  # 500: a bug; the server log has the details
NOT_READY: Final = "not_ready"  # 503
UNKNOWN_INTERRUPT: Final = "unknown_interrupt"  # 404 (AG-UI): a resume entry names no interrupt of the chat
WRONG_WORKFLOW: Final = "wrong_workflow"  # 409 (AG-UI): the thread is a chat of another workflow
INTERRUPT_PENDING: Final = "interrupt_pending"  # 409 (AG-UI): answer the open interrupt with `resume` first
UNKNOWN_REQUEST: Final = "unknown_request"  # 404: the chat has no UI request of that id
REQUEST_CLOSED: Final = "request_closed"  # 409: the UI request was answered, has expired, or is an artifact
INVALID_ANSWER: Final = (
    "invalid_answer"  # 422: the answer does not fit the UI request (`fields` names the JSON path)
)
NODE_BUSY: Final = "node_busy"  # 503: the node runs MOZAIKS_MAX_ACTIVE_RUNS runs; see Retry-After
STORAGE_UNAVAILABLE: Final = "storage_unavailable"  # 503: the database does not answer; see Retry-After
BAD_FORK_POINT: Final = "bad_fork_point"  # 422: a fork's at_seq is past the chat's end or not a message
UNSUPPORTED_TYPE: Final = "unsupported_type"  # 415: an upload's content type is not in MOZAIKS_UPLOAD_TYPES
BAD_FRAME: Final = "bad_frame"  # socket only: a client frame that does not decode
ERROR: Final = "error"  # any other refusal

ERROR_CODES: Final = (
    BAD_REQUEST, UNAUTHORIZED, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, WRONG_AUDIENCE, WRONG_ISSUER, UNKNOWN_KEY,
    BAD_SIGNATURE, ALGORITHM_NOT_ALLOWED, IDENTITY_UNAVAILABLE, FORBIDDEN, NOT_FOUND, UNKNOWN_CHAT, UNKNOWN_WORKFLOW, METHOD_NOT_ALLOWED,
    CONFLICT, RUN_ACTIVE, NO_ACTIVE_RUN, TOO_LARGE, RATE_LIMITED, CORRUPT_RECORD, INTERNAL, NOT_READY,
    UNKNOWN_INTERRUPT, WRONG_WORKFLOW, INTERRUPT_PENDING, UNKNOWN_REQUEST, REQUEST_CLOSED, INVALID_ANSWER, NODE_BUSY, STORAGE_UNAVAILABLE, BAD_FORK_POINT, UNSUPPORTED_TYPE, BAD_FRAME, ERROR,
    BUDGET_EXCEEDED,
)  # fmt: skip

# ---- WebSocket close codes (4000-4999 are the application's own)
CLOSE_TOO_BIG: Final = 1009
CLOSE_TRY_AGAIN_LATER: Final = 1013  # the identity provider's keys cannot be fetched right now
CLOSE_HEARTBEAT: Final = 4000
CLOSE_BAD_REQUEST: Final = 4400
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_FORBIDDEN: Final = 4403
CLOSE_UNKNOWN_CHAT: Final = 4404
CLOSE_SLOW: Final = 4408

# ---- chat statuses (`status` of a chat session), in the order a chat goes through them
CHAT_STATUSES: Final = tuple(dict.fromkeys(STATUS_BY_TYPE.values()))
# A chat in one of these has a run going (or about to start): it may be stopped.
ACTIVE_STATUSES: Final = ("created", "running", "waiting_input")


def javascript() -> str:
    """These codes as the ChatUI's ES module `app/static/js/codes.js` (a test keeps the file equal to this)."""
    closes = {
        name.removeprefix("CLOSE_"): value for name, value in globals().items() if name.startswith("CLOSE_")
    }
    errors = {
        name: value for name, value in globals().items() if isinstance(value, str) and value in ERROR_CODES
    }
    lines = [
        "// Generated from app/http/codes.py by `codes.javascript()`; tests/test_contract.py keeps them equal.",
        "",
        "/** WebSocket close codes the server uses. */",
        "export const CLOSE = Object.freeze({",
        *[f"  {name}: {value}," for name, value in closes.items()],
        "});",
        "",
        "/** Error codes of REST error bodies (`error`) and WebSocket error frames (`code`). */",
        "export const ERROR = Object.freeze({",
        *[f'  {name}: "{value}",' for name, value in errors.items()],
        "});",
        "",
        "/** Statuses of a chat with a run going (or about to start): it may be stopped. */",
        f"export const ACTIVE_STATUSES = new Set([{', '.join(f'{s!r}' for s in ACTIVE_STATUSES)}]);".replace(
            "'", '"'
        ),
        "",
    ]
    return "\n".join(lines)
