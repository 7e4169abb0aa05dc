"""Fixtures of the fault tests: their own wire server with test commands, nodes on it, the report."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from domain.store import MongoEventStore
from tests.faults.report import Report
from tests.faults.server import FaultServer
from tests.nodes import Node, stop_nodes

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@pytest.fixture(scope="session")
def report() -> Iterator[Report]:
    """This session's reliability results, written to test-artifacts/ at the end."""
    results = Report()
    yield results
    results.write()


@pytest.fixture
async def fault_store(fault_server: FaultServer) -> AsyncIterator[MongoEventStore]:
    """The test's own database on the fault server (a fresh name), read by the test's own client."""
    client: AsyncMongoClient[Any] = AsyncMongoClient(fault_server.server.uri, tz_aware=True)
    store = MongoEventStore(client[f"faults_{uuid.uuid4().hex[:8]}"])
    await store.ensure_indexes()
    try:
        yield store
    finally:
        await client.close()


@pytest.fixture
async def fault_node(
    fault_server: FaultServer, fault_store: MongoEventStore
) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """Start runtime nodes on the fault server: `await fault_node("a", lease_ttl_s=2)`; appName mz-<name>."""
    from app.settings import Settings

    nodes: list[Node] = []

    async def start(name: str = "a", **overrides: Any) -> Node:
        fields: dict[str, Any] = {
            "database_uri": fault_server.uri_for(f"mz-{name}"),
            "db_name": fault_store.db.name,
            "workflows_path": WORKFLOWS,
            "node_id": f"fault-node-{name}",
            "chat_starts_per_minute": 1000,
            **overrides,
        }
        node = await Node(Settings(**fields)).start()
        nodes.append(node)
        return node

    yield start
    await stop_nodes(nodes)
