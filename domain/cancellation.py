"""Cancellation that survives the database driver.

PyMongo can surface a cancellation that hit it mid-operation as one of its own errors (a server
selection timeout, an `AutoReconnect`), and the `CancelledError` is then gone. A loop that retries
on driver errors would go on forever, and a shutdown that waits for it would hang. Every such loop
calls `raise_if_cancelling` where it catches the driver's error and before it sleeps.
"""

from __future__ import annotations

import asyncio


def cancel_requested() -> bool:
    """Whether the current task has a cancellation pending."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_cancelling(cause: BaseException | None = None) -> None:
    """Raise `CancelledError` (from `cause`) when the current task has a cancellation pending."""
    if cancel_requested():
        raise asyncio.CancelledError from cause
