"""Helpers for the process's long-running asyncio tasks."""

from __future__ import annotations

import asyncio


def cancel_requested() -> bool:
    """Whether the current task has a cancellation pending.

    PyMongo can surface a cancellation that hit it mid-operation as one of its own errors; a loop
    that retries on driver errors checks this first so that shutdown is never swallowed.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
