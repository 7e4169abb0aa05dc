// Generated from app/http/codes.py by `codes.javascript()`; tests/test_contract.py keeps them equal.

/** WebSocket close codes the server uses. */
export const CLOSE = Object.freeze({
  TOO_BIG: 1009,
  TRY_AGAIN_LATER: 1013,
  HEARTBEAT: 4000,
  BAD_REQUEST: 4400,
  UNAUTHORIZED: 4401,
  FORBIDDEN: 4403,
  UNKNOWN_CHAT: 4404,
  SLOW: 4408,
});

/** Error codes of REST error bodies (`error`) and WebSocket error frames (`code`). */
export const ERROR = Object.freeze({
  BAD_REQUEST: "bad_request",
  UNAUTHORIZED: "unauthorized",
  TOKEN_EXPIRED: "token_expired",
  TOKEN_NOT_YET_VALID: "token_not_yet_valid",
  WRONG_AUDIENCE: "wrong_audience",
  WRONG_ISSUER: "wrong_issuer",
  UNKNOWN_KEY: "unknown_key",
  BAD_SIGNATURE: "bad_signature",
  ALGORITHM_NOT_ALLOWED: "algorithm_not_allowed",
  IDENTITY_UNAVAILABLE: "identity_unavailable",
  FORBIDDEN: "forbidden",
  NOT_FOUND: "not_found",
  UNKNOWN_CHAT: "unknown_chat",
  UNKNOWN_WORKFLOW: "unknown_workflow",
  METHOD_NOT_ALLOWED: "method_not_allowed",
  CONFLICT: "conflict",
  RUN_ACTIVE: "run_active",
  NO_ACTIVE_RUN: "no_active_run",
  TOO_LARGE: "too_large",
  RATE_LIMITED: "rate_limited",
  BUDGET_EXCEEDED: "budget_exceeded",
  CORRUPT_RECORD: "corrupt_record",
  INTERNAL: "internal_error",
  NOT_READY: "not_ready",
  UNKNOWN_INTERRUPT: "unknown_interrupt",
  WRONG_WORKFLOW: "wrong_workflow",
  INTERRUPT_PENDING: "interrupt_pending",
  UNKNOWN_REQUEST: "unknown_request",
  REQUEST_CLOSED: "request_closed",
  INVALID_ANSWER: "invalid_answer",
  NODE_BUSY: "node_busy",
  STORAGE_UNAVAILABLE: "storage_unavailable",
  BAD_FORK_POINT: "bad_fork_point",
  UNSUPPORTED_TYPE: "unsupported_type",
  BAD_FRAME: "bad_frame",
  ERROR: "error",
});

/** Statuses of a chat with a run going (or about to start): it may be stopped. */
export const ACTIVE_STATUSES = new Set(["created", "running", "waiting_input"]);
