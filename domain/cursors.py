"""Reading a cursor ahead: the server reads the next batch while this process works on the current one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any


async def prefetched(cursor: Any, size: int, *, ahead: int) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The cursor's documents in batches of `size`; up to `ahead` batches are requested while the
    caller works on the current one (the server reads while this process decodes). Closes the cursor."""
    batches: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue(maxsize=ahead)

    async def read() -> None:
        while batch := await cursor.to_list(size):
            await batches.put(batch)
        await batches.put([])

    reader = asyncio.create_task(read())
    getter: asyncio.Future[list[dict[str, Any]]] | None = None
    try:
        while True:
            getter = asyncio.ensure_future(batches.get())
            await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                reader.result()  # the reader failed: raise its error
            batch = getter.result()
            if not batch:
                return
            yield batch
    finally:
        if getter is not None:
            getter.cancel()  # closed or cancelled mid-wait: no get left pending
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await cursor.close()
