"""The process's MongoDB connection: `DATABASE_URI`, else the embedded server under the data folder."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from app.embedded import EmbeddedMongo
from app.settings import Settings
from domain.store import MongoEventStore, RetryPolicy


@contextlib.asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[AsyncDatabase[Any]]:
    """One client per process on the configured database; starts and stops the embedded server if needed."""
    async with contextlib.AsyncExitStack() as stack:
        uri = settings.database_uri
        if uri is None:
            uri = (await stack.enter_async_context(EmbeddedMongo(settings.data_dir / "data"))).uri
        client: AsyncMongoClient[Any] = AsyncMongoClient(uri, tz_aware=True)
        stack.push_async_callback(client.close)
        await client.admin.command("ping")
        yield client[settings.db_name]


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[MongoEventStore]:
    """The configured event store, indexes in place."""
    async with open_database(settings) as db:
        store = MongoEventStore(db, RetryPolicy(budget_s=settings.db_retry_s))
        await store.ensure_indexes()
        yield store
