"""Errors of the domain, as values a user can act on: what was wrong, where, what to do."""

from __future__ import annotations


class MozaiksError(Exception):
    """Base of every error the runtime raises on purpose."""


class Conflict(MozaiksError):
    """Another writer appended to the chat first: the expected sequence number is taken."""

    def __init__(self, chat_id: str, seq: int, detail: str = "") -> None:
        self.chat_id = chat_id
        self.seq = seq
        message = f"chat {chat_id}: seq {seq} is already taken by another writer"
        if detail:
            message += f" ({detail})"
        super().__init__(message + "; re-read the log and retry")


class CorruptRecord(MozaiksError):
    """A stored record could not be decoded as any known event."""

    def __init__(self, chat_id: str, seq: object, detail: str) -> None:
        self.chat_id = chat_id
        self.seq = seq
        self.detail = detail
        super().__init__(f"chat {chat_id}, seq {seq}: stored record is malformed: {detail}")


class HistoryLost(MozaiksError):
    """The change stream can no longer resume from the given token; catch up from the log."""


class UnknownChat(MozaiksError):
    """No chat with this id exists in the log."""

    def __init__(self, chat_id: str) -> None:
        self.chat_id = chat_id
        super().__init__(f"chat {chat_id} does not exist")


class ManifestError(MozaiksError):
    """A workflow manifest is invalid; names the workflow, the file and the JSON path."""

    def __init__(self, workflow: str, file: str, path: str, detail: str) -> None:
        self.workflow = workflow
        self.file = file
        self.path = path
        self.detail = detail
        where = f"{file} at {path}" if path else file
        super().__init__(f"workflow {workflow!r}: {where}: {detail}")


class StorageUnavailable(MozaiksError):
    """The database kept failing with transient errors until the retry budget was spent."""

    def __init__(self, what: str, tries: int, waited_s: float, cause: BaseException) -> None:
        self.what = what
        self.tries = tries
        self.cause = cause
        super().__init__(
            f"{what}: the database failed {tries} tries over {waited_s:.1f} s; "
            f"last error {type(cause).__name__}: {cause}"
        )
