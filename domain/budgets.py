"""Budget rules: spend, limits, which limit a spend has reached, the budgets file and UTC days.

Spend is tokens (prompt + completion) and cost in nano-USD (integers, like the metrics), so sums
are exact. A limit is reached when the spend is at or over it: the next model call is not made.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import msgspec

from domain.errors import MozaiksError
from domain.manifest import Budget, Manifest, split_error_path

NANO_PER_USD: Final = 10**9
# Limit kinds (the Prometheus label and the first part of a limit's name).
CHAT: Final = "chat"
APP_DAY: Final = "app_day"
USER_DAY: Final = "user_day"


class Spend(msgspec.Struct, frozen=True, kw_only=True):
    """What was spent: tokens and nano-USD."""

    tokens: int = 0
    cost_nanousd: int = 0

    def __add__(self, other: Spend) -> Spend:
        return Spend(tokens=self.tokens + other.tokens, cost_nanousd=self.cost_nanousd + other.cost_nanousd)

    def __sub__(self, other: Spend) -> Spend:
        return Spend(tokens=self.tokens - other.tokens, cost_nanousd=self.cost_nanousd - other.cost_nanousd)


class Exceeded(msgspec.Struct, frozen=True, kw_only=True):
    """A reached limit: `limit` names it ("chat.max_tokens", "app_day.max_cost_usd" ...)."""

    kind: str
    limit: str
    spend: float
    max: float
    # Daily limits: when the UTC day ends (the limit resets), ISO 8601.
    resets_at: str | None = None

    def data(self) -> dict[str, Any]:
        """As stored in `run.stopped.budget`."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    def retry_after_s(self, at: datetime | None = None) -> int | None:
        """Whole seconds until a daily limit resets (None for a chat's limit: it never resets)."""
        if self.resets_at is None:
            return None
        left = datetime.fromisoformat(self.resets_at) - (at or datetime.now(UTC))
        return max(1, math.ceil(left.total_seconds()))

    def describe(self) -> str:
        """One sentence for people."""
        what = f"{self.limit} budget reached: spent {self.spend:g} of {self.max:g}"
        return what + (f"; resets at {self.resets_at}" if self.resets_at else "")


def usd_nano(usd: float) -> int:
    """US dollars as whole nano-USD (exact for the decimal the file gave)."""
    return int(Decimal(str(usd)) * NANO_PER_USD)


def reached(kind: str, budget: Budget | None, spend: Spend, resets_at: str | None = None) -> Exceeded | None:
    """The first limit of `budget` that `spend` is at or over, or None."""
    if budget is None:
        return None
    if budget.max_tokens is not None and spend.tokens >= budget.max_tokens:
        return Exceeded(
            kind=kind,
            limit=f"{kind}.max_tokens",
            spend=spend.tokens,
            max=budget.max_tokens,
            resets_at=resets_at,
        )
    if budget.max_cost_usd is not None and spend.cost_nanousd >= usd_nano(budget.max_cost_usd):
        return Exceeded(
            kind=kind,
            limit=f"{kind}.max_cost_usd",
            spend=spend.cost_nanousd / NANO_PER_USD,
            max=budget.max_cost_usd,
            resets_at=resets_at,
        )
    return None


def utc_day(at: datetime) -> str:
    """The UTC day of `at` as YYYY-MM-DD (the key daily spend is kept under)."""
    return at.astimezone(UTC).date().isoformat()


def day_end(day: str) -> datetime:
    """When the UTC day `day` ends (its daily limits reset)."""
    return datetime.combine(date.fromisoformat(day) + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


class AppBudgets(Manifest, frozen=True, kw_only=True):
    """One app's daily limits: for the whole app, for each user, and for named users."""

    daily: Budget | None = None
    user_daily: Budget | None = None
    users: dict[str, Budget] = msgspec.field(default_factory=dict)


class BudgetsFile(Manifest, frozen=True, kw_only=True):
    """MOZAIKS_BUDGETS_FILE: `{"default": {...}, "apps": {"<app_id>": {...}}}` (an app's entry replaces the default)."""

    default: AppBudgets | None = None
    apps: dict[str, AppBudgets] = msgspec.field(default_factory=dict)

    def daily(self, app_id: str, user_id: str) -> tuple[Budget | None, Budget | None]:
        """(the app's daily limits, this user's daily limits) that apply."""
        entry = self.apps.get(app_id, self.default)
        if entry is None:
            return None, None
        return entry.daily, entry.users.get(user_id, entry.user_daily)


class BudgetsFileError(MozaiksError):
    """The budgets file is unreadable or invalid; names the file and the JSON path."""


def decode_budgets(raw: bytes, source: str) -> BudgetsFile:
    """Decode a budgets file; raises BudgetsFileError naming `source` and the JSON path."""
    try:
        return msgspec.json.decode(raw, type=BudgetsFile)
    except msgspec.ValidationError as exc:
        detail, path = split_error_path(str(exc))
        raise BudgetsFileError(f"budgets file {source} at {path}: {detail}") from None
    except msgspec.DecodeError as exc:
        raise BudgetsFileError(f"budgets file {source}: invalid JSON: {exc}") from None
