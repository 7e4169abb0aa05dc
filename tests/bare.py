"""Bare AG2 runs: the same team and scripted client, no recording (benchmark baseline, count checks)."""

from __future__ import annotations

from typing import Any

from autogen.agentchat import a_run_group_chat
from autogen.agentchat.group import ContextVariables

from app.runs.agents import build_team
from app.runs.clients import Ledger, ScriptedBackend
from app.runs.workflows import Workflow


async def run_bare(
    workflow: Workflow, message: str, *, answers: list[str] | None = None, default_model: str = "gpt-4o-mini"
) -> tuple[list[Any], ScriptedBackend]:
    """Run `workflow` offline on plain AG2 and return every event it produced and the scripted backend.

    Input requests are answered from `answers` in order ("exit" once they run out).
    """
    backend = ScriptedBackend(workflow.fixtures)
    ledger = Ledger(backend)
    context = ContextVariables(data=dict(workflow.context))
    team = build_team(
        workflow, client_cls=ledger.client_class(), context=context, default_model=default_model
    )
    response = await a_run_group_chat(team.pattern, message, max_rounds=workflow.max_turns)
    replies = list(answers or [])
    events: list[Any] = []
    async for event in response.events:
        events.append(event)
        if getattr(event, "type", None) == "input_request":
            await event.content.respond(replies.pop(0) if replies else "exit")
    return events, backend
