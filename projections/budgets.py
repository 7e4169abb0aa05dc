"""The `chat_spend` projection: what each chat spent, in all and per UTC day, from its `llm.call` records.

    {"_id": chat_id, "chat_id", "app_id", "user_id", "workflow", "created_at", "updated_at", "last_seq",
     "tokens", "cost_nanousd", "days": {"YYYY-MM-DD": {"tokens", "cost_nanousd"}}}

Tokens are prompt + completion; cost is priced like the metrics (`PricedProjector.call_cost`, the
versioned price table; offline calls cost 0). An app's or a user's spend on a day is the sum of its
chats' `days.<day>` (`day_spend`). Like every projection it is exact and rebuilt from the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Final

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

from domain.budgets import Spend, utc_day
from domain.events import AnyEvent, LlmCall, Record
from projections.metrics import PricedProjector
from projections.update import Update

COLLECTION: Final = "chat_spend"


class ChatSpendProjector(PricedProjector):
    """Projects each chat's model spend (tokens, nano-USD), in all and per UTC day, into `chat_spend`."""

    name: ClassVar[str] = "budgets"
    collection: ClassVar[str] = COLLECTION
    handles: ClassVar[frozenset[str]] = frozenset({"llm.call"})
    indexes: ClassVar[tuple[IndexModel, ...]] = (
        IndexModel([("app_id", ASCENDING), ("updated_at", ASCENDING)], name="app_updated"),
        IndexModel(
            [("app_id", ASCENDING), ("user_id", ASCENDING), ("updated_at", ASCENDING)], name="user_updated"
        ),
    )

    def empty(self) -> dict[str, Any]:
        """Nothing spent."""
        return {"tokens": 0, "cost_nanousd": 0, "days": {}}

    def update(self, state: Mapping[str, Any], record: Record, event: AnyEvent) -> Update:
        """One call's tokens and cost, for the chat and for the call's UTC day."""
        change = Update()
        change.set["updated_at"] = record.ts
        assert isinstance(event, LlmCall)
        spend = call_spend(self, record, event)
        day = utc_day(record.ts)
        for path, value in (("tokens", spend.tokens), ("cost_nanousd", spend.cost_nanousd)):
            change.inc[path] = value
            change.inc[f"days.{day}.{path}"] = value
        return change


def call_spend(projector: PricedProjector, record: Record, call: LlmCall) -> Spend:
    """What one recorded call spent (an unpriced model costs 0, as in the metrics)."""
    return Spend(
        tokens=call.prompt_tokens + call.completion_tokens,
        cost_nanousd=projector.call_cost(record, call) or 0,
    )


def spend_of(doc: Mapping[str, Any] | None) -> Spend:
    """A `chat_spend` document's spend in all (a day's comes from `day_spend`)."""
    if doc is None:
        return Spend()
    return Spend(tokens=int(doc.get("tokens") or 0), cost_nanousd=int(doc.get("cost_nanousd") or 0))


async def day_spend(
    db: AsyncDatabase[Any], app_id: str, user_id: str | None, day: str, chat_ids: Iterable[str] = ()
) -> tuple[Spend, dict[str, Spend]]:
    """An app's (or one of its users') spend on a UTC day (the sum of its chats' spend that day), and
    the share of it of each of `chat_ids` (absent: nothing projected that day).

    One aggregate: the total and the shares come from the same read, so a projection that moves
    between two reads cannot make the total older than a share (a budget would then undercount).
    """
    match: dict[str, Any] = {"app_id": app_id, f"days.{day}": {"$exists": True}}
    if user_id is not None:
        match["user_id"] = user_id
    tracked = sorted(set(chat_ids))
    pipeline = [
        {"$match": match},
        {
            "$group": {
                # One row per tracked chat, one for all the others.
                "_id": {"$cond": [{"$in": ["$_id", tracked]}, "$_id", None]},
                "tokens": {"$sum": f"$days.{day}.tokens"},
                "cost_nanousd": {"$sum": f"$days.{day}.cost_nanousd"},
            }
        },
    ]
    total, shares = Spend(), {}
    async for row in await db[COLLECTION].aggregate(pipeline):
        spend = Spend(tokens=int(row["tokens"]), cost_nanousd=int(row["cost_nanousd"]))
        total = total + spend
        if row["_id"] is not None:
            shares[str(row["_id"])] = spend
    return total, shares


async def chat_docs(db: AsyncDatabase[Any], chat_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The `chat_spend` documents of these chats (absent: nothing projected yet)."""
    ids = list(chat_ids)
    if not ids:
        return {}
    return {doc["_id"]: doc async for doc in db[COLLECTION].find({"_id": {"$in": ids}})}
