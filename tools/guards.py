"""Hooks of the Guarded example workflow: keep file tools inside the workspace, count what ran.

A hook takes one argument, the hook call (`domain.hooks.HookCall`: chat and run ids, app, user,
workflow, agent, message or tool call, a copy of the context variables) and may return a dict of
context-variable updates. `before_tool` refuses a call with `call.refuse(reason)`.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any


def start_chat(call: Any) -> dict[str, Any]:
    """before_chat: note who started this run."""
    return {"started_by": call.user_id}


def inside_workspace(call: Any) -> None:
    """before_tool: refuse any `path` argument that leaves the workspace (checked before the tool runs)."""
    path = (call.arguments or {}).get("path")
    if path is None:
        return
    root = Path(os.environ.get("MOZAIKS_WORKSPACE") or ".mozaiks/workspace").resolve()
    if not (root / str(path)).resolve().is_relative_to(root):
        call.refuse(f"path {path!r} is outside the workspace")


def count_tool(call: Any) -> dict[str, Any]:
    """after_tool: count the tool calls that ran."""
    return {"tool_calls": int(call.context.get("tool_calls") or 0) + 1}


async def note_agent(call: Any) -> None:
    """before_agent / after_agent: an async hook that looks and changes nothing."""
    await asyncio.sleep(0)


def finish_chat(call: Any) -> dict[str, Any]:
    """after_chat: mark the run's end in the context."""
    return {"finished": True}


def explode(call: Any) -> None:
    """A hook that raises (tests: the run fails with reason hook)."""
    raise RuntimeError(f"hook exploded at {call.event}")


def linger(call: Any) -> None:
    """A hook slower than any sane time limit (tests: MOZAIKS_HOOK_TIMEOUT_S ends the run)."""
    time.sleep(3)
