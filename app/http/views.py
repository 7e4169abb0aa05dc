"""What the REST API answers: one msgspec Struct per response, so `/schema` documents every field."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from domain.events import Record


class View(msgspec.Struct, frozen=True, kw_only=True):
    """Base of the response Structs."""


class Info(View, frozen=True, kw_only=True):
    """`GET /api/info`: what a client needs to know before it connects."""

    version: str
    auth: bool
    heartbeat_s: float
    offline: bool
    node: str


class OutputView(View, frozen=True, kw_only=True):
    """An agent's structured output: its name and JSON Schema (the ChatUI titles fields from it)."""

    name: str
    schema: dict[str, Any]


class AgentView(View, frozen=True, kw_only=True):
    """An agent of a workflow."""

    name: str
    type: str
    structured_output: OutputView | None = None


class WorkflowView(View, frozen=True, kw_only=True):
    """A loaded workflow."""

    name: str
    description: str
    pattern: str
    max_turns: int
    entry_agent: str | None
    visual_agents: list[str]
    agents: list[AgentView]
    # "UserDriven": a chat starts with the user's message; "AgentDriven": its run starts on creation.
    startup_mode: str = "UserDriven"


class WorkflowList(View, frozen=True, kw_only=True):
    """`GET /api/workflows`: the loaded workflows, and the problems of those that failed to load."""

    workflows: list[WorkflowView]
    errors: list[str]


class ChatStarted(View, frozen=True, kw_only=True):
    """`POST /api/chats`: the new chat and the run started for it."""

    chat_id: str
    # null: a UserDriven chat created without a message waits for its first message.
    run_id: str | None
    workflow: str


class ChatSummary(View, frozen=True, kw_only=True):
    """One chat of the list: its state and the start of its first user message as a title."""

    chat_id: str
    workflow: str
    status: str
    created_at: datetime | None
    updated_at: datetime | None
    message_count: int
    user_id: str
    app_id: str
    title: str


class ChatList(View, frozen=True, kw_only=True):
    """`GET /api/chats`: a page of the caller's chats, newest first."""

    chats: list[ChatSummary]
    offset: int
    limit: int


class SessionMessage(View, frozen=True, kw_only=True):
    """A user's or agent's message in a chat session."""

    role: str
    agent: str | None = None
    content: str
    timestamp: datetime
    seq: int
    visible: bool = True
    truncated: bool = False


class ChatSession(View, frozen=True, kw_only=True):
    """`GET /api/chats/{id}`: the chat's session document, projected from its log."""

    chat_id: str
    app_id: str
    user_id: str
    workflow: str
    created_at: datetime
    updated_at: datetime
    status: str = "created"
    offline: bool = False
    last_run_id: str | None = None
    message_count: int = 0
    last_seq: int
    messages: list[SessionMessage] = []


class MessageAccepted(View, frozen=True, kw_only=True):
    """`POST /api/chats/{id}/messages`: what the message was recorded as (`input.received` or `message.user`)."""

    chat_id: str
    recorded: str


class StopAccepted(View, frozen=True, kw_only=True):
    """`POST /api/chats/{id}/stop`: the run that `run.stopped` was recorded for."""

    chat_id: str
    run_id: str
    recorded: str


class AuditRecord(View, frozen=True, kw_only=True):
    """A stored record as the audit API returns it: every field, the hash chain and the raw AG2 event too."""

    id: str
    chat_id: str
    seq: int
    type: str
    ts: str
    app_id: str
    user_id: str
    workflow: str
    run_id: str | None
    agent: str | None
    visible: bool
    data: dict[str, Any]
    ag2: str | None
    v: int
    prev_hash: str
    hash: str


class ChatEvents(View, frozen=True, kw_only=True):
    """`GET /api/chats/{id}/events`: the chat's records, filtered."""

    chat_id: str
    events: list[AuditRecord]


class Live(View, frozen=True, kw_only=True):
    """`GET /health/live`."""

    status: str


class ProjectionLag(View, frozen=True, kw_only=True):
    """How far the projections are behind the log."""

    events_behind: int
    seconds_behind: float
    applied: int
    caught_up: bool
    stuck_chats: int
    role: str = "writer"  # "writer": this replica holds the projection lease; "standby": another one writes


class Readiness(View, frozen=True, kw_only=True):
    """`GET /health/ready`: 200 when MongoDB answers and the projections have caught up, else 503."""

    status: str
    mongo: str
    projections: str
    lag: ProjectionLag | None = None
    # The OIDC provider's keys: "ok", "off" (no MOZAIKS_OIDC_ISSUER) or "error: why".
    identity: str = "off"


def audit_record(record: Record) -> AuditRecord:
    """A record as the audit API returns it: every stored field, the timestamp as ISO text."""
    return AuditRecord(
        id=record.id,
        chat_id=record.chat_id,
        seq=record.seq,
        type=record.type,
        ts=record.ts.isoformat().replace("+00:00", "Z"),
        app_id=record.app_id,
        user_id=record.user_id,
        workflow=record.workflow,
        run_id=record.run_id,
        agent=record.agent,
        visible=record.visible,
        data=record.data,
        ag2=record.ag2,
        v=record.v,
        prev_hash=record.prev_hash,
        hash=record.hash,
    )
