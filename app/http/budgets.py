"""Budgets over HTTP: `GET /api/budgets?app=…`, and the 429 `budget_exceeded` refusal of a new message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get
from litestar.exceptions import PermissionDeniedException
from litestar.params import Parameter

from app.http.auth import Principal
from app.http.errors import error_responses
from app.runs.budgets import BudgetReached
from app.runs.orchestrator import Orchestrator
from app.runs.workflows import UnknownWorkflow
from domain.budgets import NANO_PER_USD, Spend, day_end, utc_day
from domain.events import StreamRef
from domain.manifest import Budget


class BudgetLine(msgspec.Struct, frozen=True, kw_only=True):
    """One daily limit: its maximum, what was spent today and what remains (None: no such limit)."""

    max_tokens: int | None
    max_cost_usd: float | None
    spent_tokens: int
    spent_cost_usd: float
    remaining_tokens: int | None
    remaining_cost_usd: float | None


class Budgets(msgspec.Struct, frozen=True, kw_only=True):
    """An app's daily budgets on the current UTC day: the app's and one user's."""

    app_id: str
    user_id: str | None
    day: str
    resets_at: str
    app: BudgetLine | None
    user: BudgetLine | None


def line(budget: Budget | None, spend: Spend) -> BudgetLine | None:
    """A limit beside its spend."""
    if budget is None:
        return None
    cost = spend.cost_nanousd / NANO_PER_USD
    return BudgetLine(
        max_tokens=budget.max_tokens,
        max_cost_usd=budget.max_cost_usd,
        spent_tokens=spend.tokens,
        spent_cost_usd=cost,
        remaining_tokens=max(budget.max_tokens - spend.tokens, 0) if budget.max_tokens is not None else None,
        remaining_cost_usd=max(budget.max_cost_usd - cost, 0.0) if budget.max_cost_usd is not None else None,
    )


async def refuse_over_budget(orchestrator: Orchestrator, stream: StreamRef) -> None:
    """Raise BudgetReached (429 `budget_exceeded`) when a limit of this chat, its app or its user is reached."""
    try:
        budget = orchestrator.workflows.get(stream.workflow).manifest.budget
    except UnknownWorkflow:
        budget = None
    exceeded = await orchestrator.budgets.over(stream, budget)
    if exceeded is not None:
        raise BudgetReached(exceeded)


class BudgetController(Controller):
    """Daily budgets and spend of an app (owners see their own line, analysts and auditors any user's)."""

    path = "/api/budgets"

    @get(responses=error_responses(401, 403))
    async def budgets(
        self,
        request: Request[Principal, Any, Any],
        orchestrator: Orchestrator,
        app: str | None = None,
        user: Annotated[
            str | None, Parameter(description="a user of the app (analysts and auditors)")
        ] = None,
    ) -> Budgets:
        """The app's and a user's daily limits, today's spend and what remains (projected from `llm.call`)."""
        principal = request.user
        app_id = app or principal.app_id
        if app_id != principal.app_id:
            raise PermissionDeniedException(f"app {app_id!r} is not yours")
        user_id = user or principal.user_id
        if user_id != principal.user_id and not {"analyst", "auditor"} & principal.roles:
            raise PermissionDeniedException("only analysts and auditors see other users' budgets")
        book = orchestrator.budgets
        day = utc_day(datetime.now(UTC))
        stream = StreamRef(chat_id="", app_id=app_id, user_id=user_id, workflow="")
        app_limit, user_limit = book.limits(stream)
        spends: dict[str, Spend] = {}
        for key, _ in book.keys(stream, day):
            await book.refresh(key, None, None)
            spends[key[0]] = book.spend(key)
        return Budgets(
            app_id=app_id,
            user_id=user_id,
            day=day,
            resets_at=day_end(day).isoformat(),
            app=line(app_limit, spends.get("app_day", Spend())),
            user=line(user_limit, spends.get("user_day", Spend())),
        )
