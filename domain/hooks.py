"""Hooks and derived context: the argument a hook gets, and how a derived variable reads a text.

Pure rules only; running hooks (threads, time limits, records) is `app/runs/hooks.py`.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from domain.errors import MozaiksError
from domain.manifest import Derived

HOOK_EVENTS: Final = ("before_chat", "after_chat", "before_agent", "after_agent", "before_tool", "after_tool")
_GROUP: Final = re.compile(r"\$(\d+)")


class HookCall(msgspec.Struct, kw_only=True):
    """The one argument every hook gets: where in the chat it runs, and the chat's context variables.

    `context` is a copy: a hook changes variables by returning `{name: value}` (None removes one).
    A `before_tool` hook refuses the call with `call.refuse("why")`; the agent gets the reason as
    the tool's result, and the tool does not run.
    """

    event: str
    chat_id: str
    run_id: str
    app_id: str
    user_id: str
    workflow: str
    agent: str | None = None
    # before_agent: the last message the agent received; after_agent: its reply; chat: the last message.
    message: str | None = None
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    # after_tool: what the tool returned.
    result: str | None = None
    context: dict[str, Any] = {}
    refusal: str | None = None

    def refuse(self, reason: str) -> None:
        """Refuse the tool call (before_tool only); `reason` becomes the tool's result."""
        self.refusal = reason or "refused by a hook"


class HookFailed(MozaiksError):
    """A hook raised, ran past its time limit or returned something unusable: the run fails (reason hook)."""

    def __init__(self, event: str, function: str, error: str) -> None:
        self.event = event
        self.function = function
        self.error = error
        super().__init__(f"hook {function} ({event}) failed: {error}")


def derive(spec: Derived, text: str) -> tuple[bool, Any]:
    """(True, value) when `spec.match` is found in `text`: `value` with "$0", "$1" ... filled in."""
    found = re.search(spec.match, text)
    if found is None:
        return False, None
    if spec.value is None:
        return True, found.group(0)
    if not isinstance(spec.value, str):
        return True, spec.value
    whole = _GROUP.fullmatch(spec.value)
    if whole is not None:  # exactly "$N": the group itself (None when it did not take part)
        return True, found.group(int(whole.group(1)))
    return True, _GROUP.sub(lambda m: found.group(int(m.group(1))) or "", spec.value)


def derivation_applies(spec: Derived, source: str, agent: str | None, tool: str | None) -> bool:
    """Whether a record from `source` (agent_text, user_text, tool_result) by `agent`/`tool` feeds `spec`."""
    if spec.source != source:
        return False
    if spec.agent is not None and spec.agent != agent:
        return False
    return spec.tool is None or spec.tool == tool
