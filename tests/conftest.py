"""Session-wide fixtures: one real MongoDB wire server for the whole suite, never a fake.

The server is `MOZAIKS_TEST_MONGO_URI` if set, else a testcontainers MongoDB single-node replica
set when a Docker engine answers, else the embedded SecantusDB child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from app.embedded import EmbeddedMongo
from domain.store import MongoEventStore
from tests.faults.server import FaultServer
from tests.nodes import Node, stop_nodes

# Tasks every node runs (app/http/server.py's lifespans): left at the session's end, a node was not stopped.
NODE_TASKS = frozenset({"lease-watch", "live-hub", "projection-runner", "anchor-writer"})


def _docker_answers() -> bool:
    try:
        import docker  # testcontainers' own dependency

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - no engine, no socket, no docker package: all mean "no Docker"
        return False


def _mongo_container() -> Iterator[str]:
    from testcontainers.mongodb import MongoDbContainer

    container = MongoDbContainer("mongo:7.0").with_command("--replSet rs0 --bind_ip_all")
    with container:
        host, port = container.get_container_host_ip(), container.get_exposed_port(27017)
        container.exec(
            "mongosh --quiet --eval \"rs.initiate({_id:'rs0',members:[{_id:0,host:'localhost:27017'}]})\""
        )
        yield f"mongodb://test:test@{host}:{port}/?directConnection=true&authSource=admin"


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of the suite's MongoDB wire server (see module docstring for how it is chosen)."""
    given = os.environ.get("MOZAIKS_TEST_MONGO_URI")
    if given:
        yield given
    elif os.environ.get("MOZAIKS_TEST_DOCKER", "auto") != "never" and _docker_answers():
        yield from _mongo_container()
    else:
        with EmbeddedMongo(":memory:", test_commands=True) as server:
            yield server.uri


@pytest.fixture(scope="session")
async def mongo_client(mongo_uri: str, db_name: str) -> AsyncIterator[AsyncMongoClient[Any]]:
    """One async client for the whole suite, on the session's event loop; drops the session's database at the end."""
    client: AsyncMongoClient[Any] = AsyncMongoClient(mongo_uri, tz_aware=True)
    try:
        yield client
    finally:
        with contextlib.suppress(
            Exception
        ):  # a server shared by many runs (scripts/mutation) keeps no leftovers
            await client.drop_database(db_name)
        await client.close()


@pytest.fixture(scope="session", autouse=True)
async def no_node_outlives_the_suite() -> AsyncIterator[None]:
    """End the session's event loop in bounded time, and fail if a test left a node's tasks running.

    Closing the loop cancels what is left and waits for it; a node that never shut down leaves runs,
    streams and sweeps whose cancellation, once the database is gone, can wait inside the driver
    forever (it hung a whole suite run once). What is left is cancelled here, given 10 s, and what
    still will not end is taken off the loop's books so the close cannot wait on it.
    """
    yield
    me = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not me and not task.done()]
    for task in left:
        task.cancel()
    if left:
        _, stuck = await asyncio.wait(left, timeout=10)
        for task in stuck:
            asyncio.tasks._unregister_task(task)  # the one way to keep the close from waiting on it
    ours = sorted(
        {t.get_name() for t in left if t.get_name() in NODE_TASKS or t.get_name().startswith("run:")}
    )
    if ours:
        pytest.fail(f"a test left a node running: its tasks {ours} outlived the suite")


@pytest.fixture(scope="session")
def db_name() -> str:
    """A database name of this session's own, so runs sharing a server never meet."""
    return f"mozaiks_test_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def db(mongo_client: AsyncMongoClient[Any], db_name: str) -> AsyncDatabase[Any]:
    """The session database with every collection emptied (not dropped) before the test."""
    database = mongo_client[db_name]
    for name in await database.list_collection_names():
        await database[name].delete_many({})
    return database


@pytest.fixture
async def store(db: AsyncDatabase[Any]) -> MongoEventStore:
    """An event store on the test database, indexes in place."""
    event_store = MongoEventStore(db)
    await event_store.ensure_indexes()
    return event_store


@pytest.fixture
async def start_node(
    mongo_uri: str, db: AsyncDatabase[Any], db_name: str
) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """Start runtime nodes on the test database: `await start_node(ws_heartbeat_s=0.5, ...)`."""
    from app.settings import Settings

    nodes: list[Node] = []

    async def start(**overrides: Any) -> Node:
        fields = {
            "database_uri": mongo_uri,
            "db_name": db_name,
            "workflows_path": Path(__file__).parent.parent / "workflows",
            "node_id": f"test-node-{len(nodes) + 1}",
            **overrides,
        }
        node = await Node(Settings(**fields)).start()
        nodes.append(node)
        return node

    yield start
    await stop_nodes(nodes)


@pytest.fixture
def local_clock_far_from_utc() -> Iterator[None]:
    """The host's local time 14 hours ahead of UTC, for this test's process (a POSIX zone, no tz
    database needed): a lease or an expiry read off local time where UTC is meant is half a day off."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "XST-14"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.fixture
async def fault_db(fault_server: FaultServer) -> AsyncIterator[AsyncDatabase[Any]]:
    """A database of its own on the module's fault server, for a test that arms its fail points."""
    client: AsyncMongoClient[Any] = AsyncMongoClient(fault_server.server.uri, tz_aware=True)
    try:
        yield client[f"fault_{uuid.uuid4().hex[:8]}"]
    finally:
        await client.close()


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultServer]:
    """A durable embedded server started with --enable-test-commands, for this module's tests only."""
    server = FaultServer(tmp_path_factory.mktemp("fault-db")).start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.off()
        server.stop()
