"""LLM prices versioned by effective date: the table metrics cost `llm.call` records with.

The table is a JSON file (`MOZAIKS_PRICES`, else `prices.json` beside this module):

    {"currency": "USD", "per_tokens": 1000000,
     "models": {"gpt-4o": [{"effective": "2024-05-13", "input": 5.0, "output": 15.0},
                           {"effective": "2024-10-02", "input": 2.5, "output": 10.0}]}}

A call is priced by the version in force on the call's (UTC) date; a date before a model's first
version uses that first version. A model name matches its own entry or, for dated snapshots such
as `gpt-4o-mini-2024-07-18`, the longest entry it starts with followed by `-`. Costs are integers
in nano-USD (1e-9 USD), so sums are exact; a changed table reaches history through a rebuild.
"""

from __future__ import annotations

import bisect
import logging
import os
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Final

import msgspec

from domain.errors import MozaiksError

DEFAULT_PRICES: Final = Path(__file__).with_name("prices.json")
NANO_PER_UNIT: Final = Decimal(10**9)

log = logging.getLogger(__name__)


class PriceTableError(MozaiksError):
    """The price table file is unreadable or malformed; names the file and the problem."""


class PriceVersion(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model's prices from `effective` on, per `per_tokens` tokens."""

    effective: date
    input: Decimal
    output: Decimal


class PriceFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The file's shape."""

    models: dict[str, list[PriceVersion]]
    currency: str = "USD"
    per_tokens: int = 1_000_000


class PriceTable:
    """Looks up the price in force for a model on a date and costs a call in nano-USD."""

    def __init__(self, prices: PriceFile, source: str = "") -> None:
        self.currency = prices.currency
        self.source = source
        scale = NANO_PER_UNIT / Decimal(prices.per_tokens)
        self._versions: dict[str, tuple[list[date], list[tuple[Decimal, Decimal]]]] = {}
        for model, versions in prices.models.items():
            ordered = sorted(versions, key=lambda v: v.effective)
            self._versions[model] = (
                [v.effective for v in ordered],
                [(v.input * scale, v.output * scale) for v in ordered],
            )
        self._resolved: dict[str, str | None] = {}

    @classmethod
    def load(cls, path: Path | str | None = None) -> PriceTable:
        """The table in `path`, or the shipped default when `path` is None."""
        file = Path(path) if path is not None else DEFAULT_PRICES
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise PriceTableError(
                f"price table {file}: cannot read it ({exc.strerror}); check MOZAIKS_PRICES"
            ) from None
        try:
            prices = msgspec.json.decode(raw, type=PriceFile)
        except msgspec.DecodeError as exc:
            raise PriceTableError(f"price table {file}: {exc}") from None
        for model, versions in prices.models.items():
            if not versions:
                raise PriceTableError(f"price table {file}: model {model!r} has no price versions")
            if any(v.input < 0 or v.output < 0 for v in versions):
                raise PriceTableError(f"price table {file}: model {model!r} has a negative price")
        if prices.per_tokens <= 0:
            raise PriceTableError(f"price table {file}: per_tokens must be positive")
        return cls(prices, str(file))

    def model_entry(self, model: str) -> str | None:
        """The table's entry for `model` (exact name, else the longest `entry-` prefix), or None."""
        if model in self._resolved:
            return self._resolved[model]
        found: str | None = model if model in self._versions else None
        if found is None:
            prefixes = [name for name in self._versions if model.startswith(name + "-")]
            found = max(prefixes, key=len) if prefixes else None
        self._resolved[model] = found
        return found

    def cost_nanousd(
        self, model: str, prompt_tokens: int, completion_tokens: int, on: date | datetime
    ) -> int | None:
        """The call's cost in nano-USD by the prices in force on `on`; None when the model has no price."""
        entry = self.model_entry(model)
        if entry is None:
            return None
        day = on.date() if isinstance(on, datetime) else on
        dates, prices = self._versions[entry]
        index = max(bisect.bisect_right(dates, day) - 1, 0)
        per_input, per_output = prices[index]
        cost = Decimal(prompt_tokens) * per_input + Decimal(completion_tokens) * per_output
        return int(cost.to_integral_value(rounding=ROUND_HALF_EVEN))


class WatchedPrices:
    """A price table re-read when its file changes, so a live runner follows an edited MOZAIKS_PRICES."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else DEFAULT_PRICES
        self._stamp = self._file_stamp()
        self.table = PriceTable.load(self.path)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; a broken new file keeps the old table."""
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp is None:
            return False
        self._stamp = stamp
        try:
            self.table = PriceTable.load(self.path)
        except PriceTableError as exc:
            log.warning("price table not reloaded, keeping the previous one: %s", exc)
            return False
        log.info("price table reloaded from %s", self.path)
        return True
