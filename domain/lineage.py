"""Lineage: the rules of a fork, a new chat continuing another chat's conversation from one of its messages.

A fork's `chat.created` has `forked_from` (the parent's chat id, the seq forked at and that record's
hash); the messages of the parent up to that seq are copied into the fork's log right after it
(messages with `data.origin: "fork"`; all with no run), and its `context` is the parent's context variables as of that seq.
The parent is never written to. The fork's chain is anchored in the parent's: `check_anchor`
recomputes the parent's chain up to the seq and compares the hash with the one the fork holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from domain.chain import ChainCheck, Verification
from domain.errors import MozaiksError
from domain.events import (
    TERMINAL_TYPES,
    ForkedFrom,
    InputReceived,
    MessageAgent,
    MessageUser,
    Pending,
    Record,
)

# The records a fork may start from: the end of a message (a user's, an agent's, an answer).
MESSAGE_TYPES: Final = frozenset({"message.user", "message.agent", "input.received"})
FORK: Final = "fork"


class ForkRefused(MozaiksError):
    """The chat cannot be forked at that seq; `reason` says why (`past_end`, `not_a_message`, `run_active`)."""

    def __init__(self, chat_id: str, at_seq: int, reason: str, detail: str) -> None:
        self.chat_id = chat_id
        self.at_seq = at_seq
        self.reason = reason
        super().__init__(f"chat {chat_id} cannot be forked at seq {at_seq}: {detail}")


def fork_point(chat_id: str, records: list[Record], at_seq: int) -> Record:
    """The parent's record at `at_seq` if a fork may start there; raises ForkRefused naming why not.

    `records` is the parent's whole log in seq order. A fork starts at a message (`message.user`,
    `message.agent` or `input.received`) of no run, or of a run that has ended.
    """
    last = records[-1].seq if records else 0
    if at_seq < 1 or at_seq > last:
        raise ForkRefused(chat_id, at_seq, "past_end", f"the chat's log has seqs 1 to {last}")
    record = records[at_seq - 1]
    if record.type not in MESSAGE_TYPES:
        raise ForkRefused(
            chat_id,
            at_seq,
            "not_a_message",
            f"seq {at_seq} is a {record.type} record, not a message (fork at {sorted(MESSAGE_TYPES)})",
        )
    if record.run_id is not None:
        ended = any(r.type in TERMINAL_TYPES and r.run_id == record.run_id for r in records[at_seq:])
        if not ended:
            raise ForkRefused(
                chat_id,
                at_seq,
                "run_active",
                f"seq {at_seq} is inside run {record.run_id}, which is still going",
            )
    return record


def apply_context(data: dict[str, Any], history: Iterable[Record]) -> dict[str, Any]:
    """`data` updated by the context variables of `history`: the chat's own, then every recorded update."""
    for record in history:
        if record.type == "chat.created":
            data.update(record.data.get("context") or {})
        elif record.type == "context.updated":
            for key, value in (record.data.get("variables") or {}).items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
    return data


def copied_messages(history: Iterable[Record]) -> list[Pending]:
    """The messages of `history` as the fork's own records: same text, agent and visibility, no run."""
    copies: list[Pending] = []
    for record in history:
        event: MessageUser | MessageAgent | InputReceived
        match record.event:
            case MessageUser() as user:
                event = MessageUser(
                    content=user.content, message_id=user.message_id, origin=user.origin or FORK
                )
            case MessageAgent() as agent:
                event = MessageAgent(
                    content=agent.content,
                    role=agent.role,
                    recipient=agent.recipient,
                    message_id=agent.message_id,
                    structured=agent.structured,
                    origin=FORK,
                )
            case InputReceived() as answer:
                event = InputReceived(request_id=answer.request_id, text=answer.text)  # no run: a copy
            case _:
                continue
        copies.append(Pending(event=event, agent=record.agent, visible=record.visible))
    return copies


def anchor_of(record: Record) -> ForkedFrom:
    """The anchor a fork at `record` holds."""
    return ForkedFrom(chat_id=record.chat_id, seq=record.seq, hash=record.hash)


def forked_from(first: Mapping[str, Any]) -> ForkedFrom | None:
    """The anchor of a chat whose first stored document is `first` (None: not a fork)."""
    if first.get("type") != "chat.created":
        return None
    anchor = (first.get("data") or {}).get("forked_from")
    if not isinstance(anchor, Mapping):
        return None
    return ForkedFrom(
        chat_id=str(anchor.get("chat_id")), seq=int(anchor.get("seq") or 0), hash=str(anchor.get("hash"))
    )


async def check_anchor(events: AsyncCollection[Any], anchor: ForkedFrom) -> str | None:
    """What is wrong with a fork's anchor in its parent's log (None: it holds).

    The parent's chain is recomputed from its first record up to the anchored seq, and the hash
    there must be the one the fork recorded.
    """
    where = f"forked_from chat {anchor.chat_id} seq {anchor.seq}"
    check = ChainCheck(anchor.chat_id, watch_seq=anchor.seq)
    cursor = events.find({"chat_id": anchor.chat_id, "seq": {"$lte": anchor.seq}}, sort=[("seq", ASCENDING)])
    async for doc in cursor:
        if not check.add(doc):
            break
    if not check.ok:
        return f"{where}: the parent's record seq {check.broken_seq} is broken ({check.detail})"
    if check.last_seq < anchor.seq:
        return f"{where}: the parent's log ends at seq {check.last_seq}"
    if check.watch_hash != anchor.hash:
        return f"{where}: the parent's record there is not the one the fork was made from (hash differs)"
    return None


async def with_anchor(events: AsyncCollection[Any], result: Verification) -> Verification:
    """A chat's verification with its fork anchor checked too (`anchored`); the chat's first record is
    read to find the anchor (none: `result` as it is)."""
    first = await events.find_one({"chat_id": result.chat_id, "seq": 1})
    anchor = forked_from(first or {})
    return result if anchor is None else await anchored(events, result, anchor)


async def anchored(events: AsyncCollection[Any], result: Verification, anchor: ForkedFrom) -> Verification:
    """A fork's verification with its anchor checked (`check_anchor`): a broken anchor fails it at seq 1
    (the `chat.created` that holds the anchor), the detail naming the parent's chat and seq. The one
    check of the per-chat verify (`with_anchor`) and the log-wide one (`domain.audit.verify_log`)."""
    result = msgspec.structs.replace(result, forked_from=anchor)
    problem = await check_anchor(events, anchor)
    if problem is None:
        return result
    detail = f"seq 1 (chat.created) holds a broken anchor: {problem}"
    return msgspec.structs.replace(
        result,
        ok=False,
        broken_seq=result.broken_seq if result.broken_seq is not None else 1,
        detail=f"{result.detail}; {detail}" if result.detail else detail,
    )
