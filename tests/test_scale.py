"""Scale on one node: model calls in flight bounded by a setting (not by the CPU count), the API
answering under that load, bounded run admission, and run control riding the process's one
change stream. Real sockets, the real `openai` SDK over real HTTP, a real wire server."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import monitoring
from pymongo.asynchronous.database import AsyncDatabase

from app.embedded import free_port
from app.runs.pool import RoutingExecutor, model_calls
from domain.events import MessageAgent, Pending, StreamRef
from domain.store import MongoEventStore
from projections.rebuild import rebuild
from tests.llm_server import StreamingModel, text_reply
from tests.test_projections import append_chats, assert_same, snapshot
from tests.test_serve import ROOT, serve, wait_ready


class HeldServer:
    """An OpenAI-compatible model server that holds every request until released.

    It counts the requests it holds (`in_flight`, `peak`) and calls `on_load` once `load` of them
    are held at the same moment.
    """

    def __init__(self, load: int, on_load: Callable[[], object]) -> None:
        self.load = load
        self.on_load = on_load
        self.in_flight = 0
        self.peak = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.model = StreamingModel([text_reply("Done.", 1)], before_chunk=self._hold)
        self.base_url = self.model.base_url

    @property
    def served(self) -> int:
        return len(self.model.requests)

    def _hold(self, _reply: int, index: int) -> None:
        if index != 0:
            return
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            loaded = self.in_flight == self.load
        if loaded:
            self.on_load()
        self.release.wait(120)
        with self._lock:
            self.in_flight -= 1

    def close(self) -> None:
        self.release.set()
        self.model.close()


@pytest.fixture
def solo_workflows(tmp_path: Path) -> Path:
    """One agent, one model call per run (Default pattern, terminate after its turn)."""
    folder = tmp_path / "workflows" / "Solo"
    folder.mkdir(parents=True)
    (folder / "workflow.json").write_text(
        json.dumps(
            {
                "name": "Solo",
                "orchestration_pattern": "Default",
                "max_turns": 4,
                "visual_agents": ["Writer"],
                "entry_agent": "Writer",
            }
        )
    )
    (folder / "agents.json").write_text(
        json.dumps({"agents": [{"name": "Writer", "handoffs": {"after_work": "terminate"}}]})
    )
    return folder.parent


class ChangeStreamOpens(monitoring.CommandListener):
    """Counts the change streams opened on one database: real commands, seen by PyMongo's command monitoring.

    Registered globally (PyMongo has no other way into a client the app creates itself), so it
    counts only while `on` and only on `db_name`.
    """

    def __init__(self, db_name: str) -> None:
        self.db_name = db_name
        self.on = True
        self.opened = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if not self.on or event.command_name != "aggregate" or event.database_name != self.db_name:
            return
        pipeline = event.command.get("pipeline") or [{}]
        if "$changeStream" in pipeline[0]:
            self.opened += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def events_of(http: httpx.AsyncClient, chat_id: str) -> list[dict[str, Any]]:
    return list((await http.get(f"/api/chats/{chat_id}/events")).json()["events"])


async def wait_for_type(http: httpx.AsyncClient, chat_id: str, event_type: str) -> None:
    async with asyncio.timeout(60):
        while not any(e["type"] == event_type for e in await events_of(http, chat_id)):
            await asyncio.sleep(0.05)


async def test_fifty_chats_have_forty_model_calls_in_flight_and_the_api_answers_meanwhile(
    start_node: Any, solo_workflows: Path
) -> None:
    loop = asyncio.get_running_loop()
    loaded = asyncio.Event()
    server = HeldServer(40, lambda: loop.call_soon_threadsafe(loaded.set))
    try:
        node = await start_node(
            openai_api_key="sk-test",
            openai_base_url=server.base_url,
            workflows_path=solo_workflows,
            chat_starts_per_minute=1000,
        )
        await node.runtime.projections.wait_caught_up(60)  # ready before the load
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
            started = await asyncio.gather(
                *(
                    http.post("/api/chats", json={"workflow": "Solo", "message": f"chat {i}"})
                    for i in range(50)
                )
            )
            assert [r.status_code for r in started] == [201] * 50
            await asyncio.wait_for(loaded.wait(), 60)
            # Issued while at least 40 model calls are held in flight at the model server.
            assert server.in_flight >= 40
            new_chat = await http.post("/api/chats", json={"workflow": "Solo", "message": "one more"})
            ready = await http.get("/health/ready")
            metrics = (await http.get("/metrics")).text
            # Answered while the calls are still held: the API does not wait on model calls (how fast
            # it answers under load is bench_scale's figure, not a test's).
            assert server.in_flight >= 40
            server.release.set()
            assert new_chat.status_code == 201 and ready.status_code == 200, ready.text
            assert "mozaiks_llm_calls_in_flight" in metrics and "mozaiks_llm_calls_queued" in metrics
            runs = list(node.runtime.supervisor.tasks.values())
            assert set(await asyncio.wait_for(asyncio.gather(*runs), 120)) == {"run.completed"}
    finally:
        server.close()
    assert server.peak >= 40 and server.served == 51


def test_model_calls_beyond_the_bound_wait_in_arrival_order_and_are_counted() -> None:
    executor = RoutingExecutor(max_model_calls=2, runtime_threads=1)
    gate = threading.Event()
    started: list[int] = []

    def call(i: int) -> int:
        started.append(i)
        gate.wait(30)
        return i

    try:
        with model_calls():
            futures = [executor.submit(call, i) for i in range(5)]
        runtime_work = executor.submit(lambda: "runtime")  # not a model call: never queued behind them
        assert runtime_work.result(10) == "runtime"
        deadline = time.monotonic() + 10
        while len(started) < 2 and time.monotonic() < deadline:
            gate.wait(0.01)
        assert (executor.in_flight, executor.queued) == (2, 3)
        gate.set()
        assert [f.result(10) for f in futures] == [0, 1, 2, 3, 4]
        assert started[2:] == [2, 3, 4] and executor.peak_in_flight == 2
        assert (executor.in_flight, executor.queued) == (0, 0)
    finally:
        gate.set()
        executor.shutdown()


async def test_runs_answer_input_and_obey_stop_without_a_change_stream_of_their_own(
    start_node: Any, db_name: str
) -> None:
    streams = ChangeStreamOpens(db_name)
    monitoring.register(streams)  # before the node's client exists, so it sees the node's commands
    node = await start_node(chat_starts_per_minute=1000)
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        await node.runtime.projections.wait_caught_up(60)
        # A first chat runs to its end: by then every stream of the process (hub, projections) is open.
        first = (await http.post("/api/chats", json={"workflow": "Analyzer", "message": "warm up"})).json()
        if (warming := node.runtime.supervisor.tasks.get(first["chat_id"])) is not None:
            await asyncio.wait_for(warming, 60)
        assert streams.opened >= 2  # the hub's and the projection runner's: the counter sees them
        before = streams.opened
        chats = [
            (await http.post("/api/chats", json={"workflow": "Assistant", "message": f"bees {i}"})).json()[
                "chat_id"
            ]
            for i in range(4)
        ]
        for chat_id in chats:
            await wait_for_type(http, chat_id, "input.requested")
        # Four runs wait for input; none of them opened a change stream of its own.
        assert streams.opened == before
        tasks = node.runtime.supervisor.tasks
        answered, stopped = tasks[chats[0]], tasks[chats[1]]
        reply = await http.post(f"/api/chats/{chats[0]}/messages", json={"message": "exit"})
        assert reply.json()["recorded"] == "input.received"
        assert (await http.post(f"/api/chats/{chats[1]}/stop")).status_code == 202
        assert await asyncio.wait_for(answered, 60) == "run.completed"
        assert await asyncio.wait_for(stopped, 60) == "run.stopped"
        for chat_id in chats[2:]:
            await http.post(f"/api/chats/{chat_id}/stop")
        assert set(
            await asyncio.wait_for(asyncio.gather(*(tasks[c] for c in chats[2:] if c in tasks)), 60)
        ) <= {"run.stopped"}
        assert streams.opened == before  # answered and stopped through the hub
    streams.on = False


async def test_a_full_node_refuses_new_runs_with_503_and_retry_after_and_records_nothing(
    start_node: Any, db: AsyncDatabase[Any]
) -> None:
    node = await start_node(chat_starts_per_minute=1000, max_active_runs=2)
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        chats = [
            (await http.post("/api/chats", json={"workflow": "Assistant", "message": f"bees {i}"})).json()[
                "chat_id"
            ]
            for i in range(2)
        ]
        for chat_id in chats:
            await wait_for_type(http, chat_id, "input.requested")
        chats_before = await db["events"].distinct("chat_id")
        refused = await http.post("/api/chats", json={"workflow": "Assistant", "message": "one too many"})
        assert refused.status_code == 503 and refused.json()["error"] == "node_busy"
        assert (
            int(refused.headers["Retry-After"]) > 0 and "MOZAIKS_MAX_ACTIVE_RUNS" in refused.json()["detail"]
        )
        assert await db["events"].distinct("chat_id") == chats_before  # nothing recorded for it
        # A slot frees when a run ends; then the node admits again.
        stopped = node.runtime.supervisor.tasks[chats[0]]
        await http.post(f"/api/chats/{chats[0]}/stop")
        await asyncio.wait_for(stopped, 60)
        admitted = await http.post(
            "/api/chats", json={"workflow": "Assistant", "message": "now there is room"}
        )
        assert admitted.status_code == 201
        # A new turn on a finished chat needs a slot too, and is refused without being recorded.
        await wait_for_type(http, admitted.json()["chat_id"], "input.requested")
        turn = await http.post(f"/api/chats/{chats[0]}/messages", json={"message": "again"})
        assert turn.status_code == 503 and "Retry-After" in turn.headers
        assert not any(
            e["type"] == "message.user" and e["data"]["content"] == "again"
            for e in await events_of(http, chats[0])
        )


async def test_one_replica_writes_the_projections_and_another_takes_over_when_it_dies(
    start_node: Any,
    mongo_uri: str,
    db_name: str,
    db: AsyncDatabase[Any],
    store: MongoEventStore,
    tmp_path: Path,
) -> None:
    port = free_port()
    writer = serve(
        tmp_path,
        "--port",
        str(port),
        DATABASE_URI=mongo_uri,
        MOZAIKS_DB=db_name,
        MOZAIKS_LEASE_TTL_S="1.5",
        MOZAIKS_WORKFLOWS_PATH=str(ROOT / "workflows"),
    )
    try:
        await asyncio.to_thread(wait_ready, port, writer, 60)
        lease = await db["projection_leases"].find_one({"_id": "projections"})
        assert lease is not None and lease["owner"].endswith(f":{writer.pid}")
        standby = await start_node(lease_ttl_s=1.5)
        runner = standby.runtime.projections
        async with asyncio.timeout(30):
            while runner.role != "standby":
                await asyncio.sleep(0.05)
        await append_chats(store, 6, seed=21, prefix="before")
        await runner.wait_caught_up(60)  # written by the other replica
        assert runner.applied == 0 and runner.role == "standby"
    finally:
        writer.kill()  # SIGKILL: the lease is left to expire
        writer.wait(30)
    await append_chats(store, 6, seed=22, prefix="after")
    async with asyncio.timeout(30):
        while runner.role != "writer":
            await asyncio.sleep(0.05)
    await runner.wait_caught_up(60)
    assert runner.applied > 0
    lease = await db["projection_leases"].find_one({"_id": "projections"})
    assert lease is not None and lease["owner"] == standby.settings.node_id
    live = await snapshot(db)
    assert len(live["chat_sessions"]) == 12
    summary = await rebuild(db, store)
    assert summary.chats == 12
    assert_same(live, await snapshot(db))


async def test_store_read_ahead_returns_the_log_in_order_across_batches(store: MongoEventStore) -> None:
    ref = StreamRef(chat_id="long", app_id="a", user_id="u", workflow="W")
    await store.append(ref, [Pending(event=MessageAgent(content=f"m{i}"), agent="A") for i in range(2500)], 0)
    records = [r async for r in store.read_ahead("long", after=7, batch=300)]
    assert [r.seq for r in records] == list(range(8, 2501))
    assert records[0].data["content"] == "m7"
    early = store.read_ahead("long", batch=100)
    assert [(await anext(early)).seq for _ in range(3)] == [1, 2, 3]
    await early.aclose()  # a reader that stops early leaves no fetch behind


async def test_sockets_are_not_compressed_per_client(start_node: Any, store: MongoEventStore) -> None:
    """Every client of a chat gets the same bytes: per-connection deflate would redo the work per client."""
    from websockets.asyncio.client import connect

    node = await start_node()
    await store.append(
        StreamRef(chat_id="plain", app_id="local", user_id="local", workflow="Analyzer"),
        [Pending(event=MessageAgent(content="hi"), agent="Analyst")],
        0,
    )
    async with connect(f"{node.ws_url}/ws/chats/plain?after=0") as ws:  # the client offers permessage-deflate
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
        assert json.loads(await ws.recv())["seq"] == 1
