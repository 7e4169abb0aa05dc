"""Database faults against a real wire server: fail points, slow replies, a killed and restarted server."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.server_type import SERVER_TYPE
from websockets.asyncio.client import connect

from app.runs.supervisor import RunSupervisor
from app.settings import Settings
from domain.events import MessageUser, Pending, StreamRef
from domain.files import FileStore
from domain.model_io import PartStore
from domain.store import MongoEventStore
from projections.sessions import ChatSessionsProjector
from projections.writer import ProjectionWriter
from tests.faults.checks import (
    assert_chat_sound,
    assert_client_saw_the_log,
    drive_to_end,
    records_of,
    run_end,
    wait_for,
    waiting_for_input,
)
from tests.faults.report import Report
from tests.faults.server import COUNTER, FaultServer

# Each armed after the run asked for input, skipping the insert of the answer: the run's own appends fail.
FAIL_POINTS = {
    "insert: closeConnection x2": {"closeConnection": True},
    "insert: writeConcernError x2": {
        "writeConcernError": {"code": 64, "errmsg": "waiting for replication timed out"}
    },
    "insert: errorCode 11600 + RetryableWriteError x2": {
        "errorCode": 11600,
        "errorLabels": ["RetryableWriteError"],
    },
}


async def start_chat(http: httpx.AsyncClient, store: MongoEventStore) -> str:
    """A chat whose run is waiting for the user's input (mid-run)."""
    created = await http.post("/api/chats", json={"workflow": "Assistant", "message": "Find bees"})
    assert created.status_code == 201, created.text
    chat_id = str(created.json()["chat_id"])
    await wait_for(store, chat_id, waiting_for_input)
    return chat_id


def lost_its_server(node: Any) -> bool:
    """Whether the node's database client has marked its server unreachable (its monitor saw the outage).

    Commands in flight at the kill fail (and are counted), but one started after the monitor's check
    waits in server selection and fails nowhere, so the count alone can miss the outage.
    """
    servers = node.runtime.db.client.topology_description.server_descriptions().values()
    return all(server.server_type == SERVER_TYPE.Unknown for server in servers)


def faults(server: FaultServer) -> int:
    seen = server.faults_seen("insert")
    return seen["failed"] + seen["write_concern"]


@pytest.mark.parametrize("name", list(FAIL_POINTS))
async def test_transient_insert_errors_mid_run_are_retried_and_the_run_completes(
    name: str, fault_server: FaultServer, fault_store: MongoEventStore, fault_node: Any, report: Report
) -> None:
    node = await fault_node("a")
    async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
        chat_id = await start_chat(http, fault_store)
        before = faults(fault_server)
        data = {"failCommands": ["insert"], "appName": "mz-a", **FAIL_POINTS[name]}
        with fault_server.failing(data, {"skip": 1, "times": 2}):
            answered = await http.post(f"/api/chats/{chat_id}/messages", json={"message": "yes, go on"})
            assert answered.status_code == 202
            assert await drive_to_end(http, fault_store, chat_id) == "run.completed"
        injected = faults(fault_server) - before
        assert injected == 2, "both armed faults reached the runtime"
        sound = await assert_chat_sound(http, fault_store, chat_id, node.runtime.orchestrator.reports)
    report.record(name, injected, sound)


async def test_retry_budget_spent_fails_the_run_for_storage_once_the_database_takes_the_record(
    fault_server: FaultServer, fault_store: MongoEventStore, fault_node: Any, report: Report
) -> None:
    name = "insert: closeConnection until the retry budget is spent"
    node = await fault_node("a", db_retry_s=1.0, lease_ttl_s=1.5)
    other = await fault_node("b")
    leases = fault_store.db["chat_leases"]
    async with (
        httpx.AsyncClient(base_url=node.url, timeout=60) as http,
        httpx.AsyncClient(base_url=other.url) as http_b,
    ):
        chat_id = await start_chat(http, fault_store)
        before = faults(fault_server)
        held = await leases.find_one({"_id": chat_id})
        assert held is not None and held["owner"] == "fault-node-a"
        data = {"failCommands": ["insert"], "appName": "mz-a", "closeConnection": True}
        with fault_server.failing(data, "alwaysOn"):
            # The answer goes in through node B; node A's run then cannot record anything.
            answered = await http_b.post(f"/api/chats/{chat_id}/messages", json={"message": "yes, go on"})
            assert answered.status_code == 202, answered.text
            async with asyncio.timeout(60):
                # Past the budget, node A keeps the lease and renews it while it keeps trying.
                while True:
                    lease = await leases.find_one({"_id": chat_id})
                    assert (
                        lease is not None
                        and lease["owner"] == "fault-node-a"
                        and lease["run_id"] == held["run_id"]
                    )
                    if faults(fault_server) - before >= 8 and lease["expires_at"] > held["expires_at"]:
                        break
                    await asyncio.sleep(0.1)
            assert run_end(await records_of(fault_store, chat_id)) is None
            busy = await http_b.post(f"/api/chats/{chat_id}/messages", json={"message": "hello?"})
            assert busy.status_code == 409  # a live run (its node is still trying) is behind the answer
        records = await wait_for(fault_store, chat_id, lambda rs: run_end(rs) is not None)
        injected = faults(fault_server) - before
        failed = records[-1]
        assert failed.type == "run.failed" and failed.data["reason"] == "storage", failed
        assert "closed" in failed.data["error"] or "AutoReconnect" in failed.data["error"]
        # The batch that could not be recorded went in before the run's end.
        assert records[-2].run_id == failed.run_id and records[-2].type != "input.received"
        sound = await assert_chat_sound(http, fault_store, chat_id, node.runtime.orchestrator.reports)
    report.record(name, injected, sound, {"retry budget s": 1.0})


async def test_slow_inserts_finds_and_change_stream_get_mores_delay_but_lose_nothing(
    fault_server: FaultServer, fault_store: MongoEventStore, fault_node: Any, report: Report
) -> None:
    name = "blockConnection: insert, find, getMore"
    node = await fault_node("a")
    COUNTER.slow_ms = 350
    async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
        chat_id = await start_chat(http, fault_store)
        seen: list[int] = []
        async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0") as ws:
            before = fault_server.faults_seen()["slow"]
            data = {
                "failCommands": ["insert", "find", "getMore"],
                "appName": "mz-a",
                "blockConnection": True,
                "blockTimeMS": 400,
            }
            with fault_server.failing(data, {"times": 8}):
                answered = await http.post(f"/api/chats/{chat_id}/messages", json={"message": "yes, go on"})
                assert answered.status_code == 202
                assert await drive_to_end(http, fault_store, chat_id) == "run.completed"
            visible = [r.seq for r in await records_of(fault_store, chat_id) if r.visible]
            async with asyncio.timeout(60):
                while not seen or seen[-1] < visible[-1]:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "event":
                        seen.append(frame["seq"])
        assert_client_saw_the_log(seen, await records_of(fault_store, chat_id))
        injected = fault_server.faults_seen()["slow"] - before
        assert injected >= 3
        sound = await assert_chat_sound(http, fault_store, chat_id, node.runtime.orchestrator.reports)
    report.record(name, injected, sound, {"block ms": 400})


async def test_database_killed_and_restarted_mid_run(
    fault_server: FaultServer, fault_store: MongoEventStore, fault_node: Any, report: Report
) -> None:
    name = "database kill -9 and restart"
    node = await fault_node("a")
    async with httpx.AsyncClient(base_url=node.url, timeout=90) as http:
        chat_id = await start_chat(http, fault_store)
        stored = len(await records_of(fault_store, chat_id))
        before = fault_server.faults_seen()["failed"]
        fault_server.kill9()
        # Answer while the database is down: the node waits for it (and re-sends) until it is back.
        answering = asyncio.create_task(
            http.post(f"/api/chats/{chat_id}/messages", json={"message": "yes, go on"})
        )
        async with asyncio.timeout(60):  # the node has met the outage
            while fault_server.faults_seen()["failed"] == before and not lost_its_server(node):
                await asyncio.sleep(0.05)
        # On this thread (blocking the loop for a moment): the server dies with the thread that starts it.
        fault_server.restart()
        assert (await answering).status_code == 202
        assert await drive_to_end(http, fault_store, chat_id) == "run.completed"
        records = await records_of(fault_store, chat_id)
        assert len(records) > stored
        injected = fault_server.faults_seen()["failed"] - before
        sound = await assert_chat_sound(http, fault_store, chat_id, node.runtime.orchestrator.reports)
    report.record(name, 1, sound, {"failed commands during the outage": injected})


class WriteConcerns(monitoring.CommandListener):
    """Each write command's write concern, by (command, collection), in the order sent."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list[Any]] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        if name in ("insert", "update", "delete", "findAndModify"):
            self.seen.setdefault((name, str(event.command.get(name))), []).append(
                event.command.get("writeConcern")
            )

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_what_a_crash_must_not_lose_is_sent_journaled_and_a_projection_is_not(
    mongo_uri: str, db: AsyncDatabase[Any]
) -> None:
    # The embedded server runs without a server-wide sync: it journals exactly the writes that ask
    # (`j: true`), which is what the kill above leaves on disk. Model I/O parts, uploads and run
    # leases must ask, like the log (test_store.py) and the anchors (test_audit.py); a projection,
    # which the log rebuilds, must not pay for it.
    listener = WriteConcerns()
    client: AsyncMongoClient[Any] = AsyncMongoClient(mongo_uri, event_listeners=[listener])
    try:
        database = client[db.name]
        store = MongoEventStore(database)
        ref = StreamRef(chat_id="journaled", app_id="app", user_id="u1", workflow="Generator")
        records = await store.append(ref, [Pending(event=MessageUser(content="hi"))], 0)
        await PartStore(database).put({"journaled-part": b"body"})
        content = [b"uploaded bytes", b""]
        await FileStore(database).put(lambda _n: asyncio.sleep(0, content.pop(0)), max_bytes=1_000)
        # The orchestrator is not used by a lease's take and release.
        supervisor = RunSupervisor(database, store, SimpleNamespace(), Settings())  # type: ignore[arg-type]
        assert await supervisor._acquire("journaled", "r1")
        await supervisor._release("journaled", "r1")
        await ProjectionWriter(database, store, ChatSessionsProjector()).apply({"journaled": records})

        written = dict(listener.seen)
        assert written.pop(("insert", "chat_sessions")) == [None]
        assert {collection for _, collection in written} == {
            "events",
            "model_io_parts",
            "uploads.files",
            "uploads.chunks",
            "chat_leases",
        }
        journaled = {"w": "majority", "j": True}
        assert {
            key: concerns for key, concerns in written.items() if any(c != journaled for c in concerns)
        } == {}
    finally:
        await client.close()


async def test_a_read_while_the_database_is_down_is_a_503_that_says_so_and_reads_again_after(
    fault_server: FaultServer, fault_store: MongoEventStore, fault_node: Any
) -> None:
    # A short server selection timeout and retry budget, so that the read gives up within the test's patience.
    uri = fault_server.uri_for("mz-a") + "&serverSelectionTimeoutMS=1500"
    node = await fault_node("a", database_uri=uri, db_retry_s=1.0)
    async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
        chat_id = await start_chat(http, fault_store)
        fault_server.kill9()
        try:
            down = await http.get(f"/api/chats/{chat_id}/events")
        finally:
            # On this thread (blocking the loop for a moment): the server dies with the thread that starts it.
            fault_server.restart()
        assert down.status_code == 503, down.text
        assert down.json()["error"] == "storage_unavailable" and down.headers["Retry-After"] == "5"
        async with asyncio.timeout(60):  # the node's client finds the server again
            while (back := await http.get(f"/api/chats/{chat_id}/events")).status_code != 200:
                await asyncio.sleep(0.2)
        assert [e["seq"] for e in back.json()["events"]] == [
            r.seq for r in await records_of(fault_store, chat_id)
        ]


# REST routes that read the projections, the leases or the audit indexes with the driver itself (a
# dropped connection reaches them as the driver's raw ConnectionFailure), and one that appends through
# the store (its retries spent: StorageUnavailable). Reads of one chat's log go through the store's
# retries too: `test_a_read_while_the_database_is_down_is_a_503_...` covers them.
DATABASE_ROUTES = [
    ("GET", "/api/chats"),
    ("POST", "/api/chats"),
    ("GET", "/api/events"),
    ("GET", "/metrics/perf/aggregate"),
    ("GET", "/metrics/perf/chats"),
    ("GET", "/metrics/perf/chat/{chat}"),
    ("GET", "/metrics/perf/series"),
]


async def test_a_raw_connection_failure_under_any_rest_route_answers_503_storage_unavailable_with_retry_after(
    fault_server: FaultServer, fault_store: MongoEventStore, fault_node: Any
) -> None:
    # A short retry budget: reads through the store give up quickly (StorageUnavailable); reads of
    # the projections and leases meet the driver's own ConnectionFailure. Both are the database's.
    # A short server selection: after a dropped connection, finding the server again fails quickly too.
    uri = fault_server.uri_for("mz-a") + "&serverSelectionTimeoutMS=300"
    node = await fault_node("a", database_uri=uri, db_retry_s=0.2)
    async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
        chat_id = await start_chat(http, fault_store)
        bodies = {"/api/chats": {"workflow": "Assistant", "message": "more bees"}}
        every_command = {
            "failCommands": ["find", "aggregate", "count", "insert", "update", "delete", "findAndModify"],
            "closeConnection": True,
            "appName": "mz-a",  # the node's client only: the test's own reads still answer
        }
        answers = {}
        with fault_server.failing(every_command, "alwaysOn"):
            for method, route in DATABASE_ROUTES:
                path = route.format(chat=chat_id)
                body = bodies.get(route, {"message": "yes"}) if method == "POST" else None
                answer = await http.request(method, path, json=body)
                answers[f"{method} {route}"] = (
                    answer.status_code,
                    answer.json().get("error"),
                    answer.headers.get("Retry-After"),
                )
    assert answers == {f"{m} {r}": (503, "storage_unavailable", "5") for m, r in DATABASE_ROUTES}
