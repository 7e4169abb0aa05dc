"""A record is decoded once per process: every change-stream reader of a store gets the same object."""

from __future__ import annotations

import asyncio
from typing import Any

from domain.events import MessageAgent, Pending, Record, StreamRef
from domain.store import MongoEventStore


async def test_every_tail_of_a_process_shares_one_decoded_record(store: MongoEventStore) -> None:
    stream = StreamRef(chat_id="decoded-once", app_id="a", user_id="u", workflow="W")
    opened = [asyncio.Event(), asyncio.Event()]

    async def first_of_chat(tail: Any) -> Record:
        async for change in tail:
            if change.record.chat_id == stream.chat_id:
                return change.record  # type: ignore[no-any-return]
        raise AssertionError("the tail ended")

    hub_like = asyncio.create_task(first_of_chat(store.tail(on_open=opened[0].set)))
    runner_like = asyncio.create_task(first_of_chat(store.tail(on_open=opened[1].set)))

    async def subscriber() -> Record:
        async for record in store.subscribe(stream.chat_id):
            return record
        raise AssertionError("the subscription ended")

    async with asyncio.timeout(30):
        await asyncio.gather(opened[0].wait(), opened[1].wait())
        await store.append(stream, [Pending(event=MessageAgent(content="once"), agent="A")], 0)
        a, b = await asyncio.gather(hub_like, runner_like)
        c = await subscriber()
    assert a.data["content"] == "once"
    assert a is b, "the two tails decoded the same insert twice"
    # A read of the collection decodes what is stored now (audit must see tampering): a new object.
    assert c == a and c is not a
