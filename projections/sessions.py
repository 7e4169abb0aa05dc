"""The `chat_sessions` projection: the seed's chat document (messages, counts), plus status and last_seq.

    {"_id": chat_id, "chat_id", "app_id", "user_id", "workflow", "created_at", "updated_at",
     "status": "created|running|waiting_input|waiting|completed|failed|stopped", "offline": bool,
     "ui_expires_at": str|null (the earliest `expires_at` of the UI requests since the last run.started),
     "last_run_id": str|null, "message_count": int (visible messages), "last_seq": int,
     "messages": [{"role": "user|assistant", "agent": str|null, "content": str,
                   "timestamp": datetime, "seq": int, "visible": bool}]}

Only `message.user` and `message.agent` become messages; a hidden agent's message has
`visible: false` (the ChatUI shows visible ones; the REST layer may filter on it). `waiting`: the
last run ended `run.suspended` on a UI request. `ui_expires_at` is the supervisor's index of UI
timeouts (`RunSupervisor.expire_due` reads only the chats whose deadline has passed).

The document stays far below MongoDB's 16 MB limit whatever a chat holds: `messages` keeps the
latest MAX_MESSAGES (`message_count` counts all the visible ones), and a message's `content` is cut at
MAX_CONTENT characters with `truncated: true`. The log keeps every message whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

from pymongo import ASCENDING, DESCENDING, IndexModel

from domain.events import (
    AnyEvent,
    ChatCreated,
    InputReceived,
    InputRequested,
    MessageAgent,
    MessageUser,
    Record,
    RunCompleted,
    RunFailed,
    RunStarted,
    RunStopped,
    RunSuspended,
    UiRequested,
)
from projections.projector import Projector
from projections.update import Update

MAX_MESSAGES: Final = 500
MAX_CONTENT: Final = 16_000

STATUS_BY_TYPE: Final[Mapping[str, str]] = {
    "chat.created": "created",
    "run.started": "running",
    "input.requested": "waiting_input",
    "input.received": "running",
    "run.completed": "completed",
    "run.failed": "failed",
    "run.stopped": "stopped",
    "run.suspended": "waiting",
}


class ChatSessionsProjector(Projector):
    """Projects each chat's conversation and status into `chat_sessions`."""

    name: ClassVar[str] = "chat_sessions"
    collection: ClassVar[str] = "chat_sessions"
    handles: ClassVar[frozenset[str]] = frozenset(
        {*STATUS_BY_TYPE, "message.user", "message.agent", "ui.requested"}
    )
    state_fields: ClassVar[tuple[str, ...]] = ("ui_expires_at",)
    state_types: ClassVar[frozenset[str]] = frozenset({"ui.requested"})
    indexes: ClassVar[tuple[IndexModel, ...]] = (
        IndexModel([("ui_expires_at", ASCENDING)], name="ui_expires_at"),
        IndexModel([("user_id", ASCENDING), ("updated_at", DESCENDING)], name="user_updated"),
        IndexModel([("app_id", ASCENDING), ("updated_at", DESCENDING)], name="app_updated"),
    )

    def empty(self) -> dict[str, Any]:
        """A chat with no messages yet."""
        return {
            "status": "created",
            "offline": False,
            "last_run_id": None,
            "ui_expires_at": None,
            "message_count": 0,
            "messages": [],
        }

    def update(self, state: Mapping[str, Any], record: Record, event: AnyEvent) -> Update:
        """Status, run and offline flags from run events; messages from user and agent messages."""
        change = Update()
        change.set["updated_at"] = record.ts
        status = STATUS_BY_TYPE.get(record.type)
        if status is not None:
            change.set["status"] = status
        match event:
            case MessageUser(content=content):
                self._message(change, record, "user", content)
            case MessageAgent(content=content):
                self._message(change, record, "assistant", content)
            case ChatCreated(offline=offline):
                change.set["offline"] = offline
            case RunStarted(offline=offline):
                change.set["offline"] = offline
                change.set["last_run_id"] = record.run_id
                change.set["ui_expires_at"] = None  # the requests before it were answered, or are past
            case UiRequested(expires_at=str(deadline)):
                known = state.get("ui_expires_at")
                change.set["ui_expires_at"] = min(known, deadline) if known else deadline
            case (
                InputRequested()
                | InputReceived()
                | RunCompleted()
                | RunFailed()
                | RunStopped()
                | RunSuspended()
            ):
                pass
        return change

    @staticmethod
    def _message(change: Update, record: Record, role: str, content: str) -> None:
        message = {
            "role": role,
            "agent": record.agent,
            "content": content[:MAX_CONTENT],
            "timestamp": record.ts,
            "seq": record.seq,
            "visible": record.visible,
            "truncated": len(content) > MAX_CONTENT,
        }
        change.push["messages"] = [message]
        change.keep["messages"] = MAX_MESSAGES
        if record.visible:  # what the user sees: a hidden agent's message is not one of theirs
            change.inc["message_count"] = 1
