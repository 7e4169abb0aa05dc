"""REST API, auth and run supervision over a real socket: who may do what, bad input, leases."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.http.auth import issue_token
from app.runs.supervisor import NodeBusy, RunActive
from domain.events import (
    ChatCreated,
    InputRequested,
    MessageAgent,
    MessageUser,
    Pending,
    RunCompleted,
    RunStarted,
    StreamRef,
)
from tests.faults.checks import drive_to_end

SECRET = "test-secret-of-at-least-thirty-two-bytes!"


def bearer(user: str, app: str = "P", roles: tuple[str, ...] = ("user",)) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, user, app, list(roles))}"}


async def wait_for_terminal(
    http: httpx.AsyncClient, chat_id: str, headers: dict[str, str] | None = None
) -> str:
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(60):
            while True:
                events = (await http.get(f"/api/chats/{chat_id}/events", headers=headers)).json()["events"]
                terminal = [
                    e["type"] for e in events if e["type"] in ("run.completed", "run.failed", "run.stopped")
                ]
                if terminal:
                    return terminal[-1]
                await asyncio.sleep(0.1)
    except TimeoutError:
        last = [e["type"] for e in events[-5:]]
        raise AssertionError(f"chat {chat_id}: no run ended within 60 s; its last events {last}") from None


@pytest.fixture
async def secured(start_node: Any) -> Any:
    return await start_node(auth_secret=SECRET, chat_starts_per_minute=1000)


async def test_users_see_only_their_own_chats(secured: Any) -> None:
    async with httpx.AsyncClient(base_url=secured.url) as http:
        x, y = bearer("x"), bearer("y")
        started = await http.post("/api/chats", json={"workflow": "Analyzer", "message": "hi"}, headers=x)
        assert started.status_code == 201
        chat_id = started.json()["chat_id"]
        assert await wait_for_terminal(http, chat_id, x) == "run.completed"
        assert (await http.get(f"/api/chats/{chat_id}/events", headers=x)).status_code == 200
        for method, path, body in [
            ("GET", f"/api/chats/{chat_id}", None),
            ("GET", f"/api/chats/{chat_id}/events", None),
            ("GET", f"/api/chats/{chat_id}/verify", None),
            ("POST", f"/api/chats/{chat_id}/messages", {"message": "let me in"}),
            ("POST", f"/api/chats/{chat_id}/stop", None),
        ]:
            response = await http.request(method, path, json=body, headers=y)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["detail"] == f"chat {chat_id} is not yours to read", (method, path)
        async with asyncio.timeout(30):
            while not (await http.get("/api/chats", headers=x)).json()["chats"]:
                await asyncio.sleep(0.1)
        assert [c["chat_id"] for c in (await http.get("/api/chats", headers=x)).json()["chats"]] == [chat_id]
        assert (await http.get("/api/chats", headers=y)).json()["chats"] == []
        # Nothing of Y's attempts reached the log.
        events = (await http.get(f"/api/chats/{chat_id}/events", headers=x)).json()["events"]
        assert "let me in" not in json.dumps(events)
    token_y = issue_token(SECRET, "y", "P", ["user"])
    async with connect(
        f"{secured.ws_url}/ws/chats/{chat_id}?after=0", subprotocols=[f"bearer.{token_y}"]
    ) as ws:
        assert json.loads(await ws.recv())["code"] == "forbidden"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    async with connect(f"{secured.ws_url}/ws/chats/{chat_id}?after=0") as ws:  # no token at all
        missing = "missing bearer token (bearer.<token> subprotocol or Authorization header)"
        assert json.loads(await ws.recv()) == {"type": "error", "code": "unauthorized", "message": missing}
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        4401,
        missing,
    )
    token_x = issue_token(SECRET, "x", "P", ["user"])
    async with connect(
        f"{secured.ws_url}/ws/chats/{chat_id}?after=0", subprotocols=[f"bearer.{token_x}"]
    ) as ws:
        assert ws.subprotocol == f"bearer.{token_x}"
        assert json.loads(await ws.recv())["type"] == "event"


async def test_auditors_read_every_chat_of_their_app_only(secured: Any) -> None:
    async with httpx.AsyncClient(base_url=secured.url) as http:
        in_p = (
            await http.post(
                "/api/chats", json={"workflow": "Analyzer", "message": "p"}, headers=bearer("x", "P")
            )
        ).json()
        in_q = (
            await http.post(
                "/api/chats", json={"workflow": "Analyzer", "message": "q"}, headers=bearer("z", "Q")
            )
        ).json()
        auditor = bearer("audit", "P", ("auditor",))
        await wait_for_terminal(http, in_p["chat_id"], auditor)
        events = (await http.get(f"/api/chats/{in_p['chat_id']}/events", headers=auditor)).json()["events"]
        assert events[0]["type"] == "chat.created" and all("hash" in e for e in events)
        assert any(not e["visible"] for e in events), "auditors see hidden agents' records too"
        own = (await http.get(f"/api/chats/{in_p['chat_id']}/events", headers=bearer("x", "P"))).json()[
            "events"
        ]
        assert own and all(e["visible"] for e in own), "a user sees what the ChatUI may show, no hidden agent"
        assert "Collector" not in {e["agent"] for e in own}
        assert (await http.get(f"/api/chats/{in_q['chat_id']}/events", headers=auditor)).status_code == 403
        # An auditor reads but does not steer.
        refused = await http.post(f"/api/chats/{in_p['chat_id']}/stop", headers=auditor)
        assert refused.status_code == 403
        assert refused.json()["detail"] == f"only the chat's own user may change chat {in_p['chat_id']}"


async def test_an_auditor_cannot_stop_or_steer_a_chat_over_the_websocket(secured: Any, store: Any) -> None:
    # A run waiting for input, per its log: each of these frames would change the chat if allowed.
    stream = StreamRef(chat_id="steer", app_id="P", user_id="x", workflow="Assistant")
    await store.append(
        stream,
        [
            Pending(event=ChatCreated()),
            Pending(event=MessageUser(content="bees")),
            Pending(event=RunStarted(pattern="Default", max_turns=12), run_id="r1"),
            Pending(event=InputRequested(request_id="q1", prompt="more?"), run_id="r1"),
        ],
        0,
    )
    token = issue_token(SECRET, "audit", "P", ["auditor"])
    frames = [
        {"type": "chat.stop"},
        {"type": "user.message", "text": "exit"},
        {"type": "input.response", "request_id": "q1", "text": "exit"},
    ]
    async with connect(f"{secured.ws_url}/ws/chats/steer?after=0", subprotocols=[f"bearer.{token}"]) as ws:
        async with asyncio.timeout(30):
            while json.loads(await ws.recv())["type"] != "replay.done":
                pass  # the auditor may read the chat
            for frame in frames:
                await ws.send(json.dumps(frame))
                reply = json.loads(await ws.recv())
                while reply["type"] == "heartbeat":
                    reply = json.loads(await ws.recv())
                assert reply == {
                    "type": "error",
                    "code": "forbidden",
                    "message": "only the chat's own user may do that",
                }
    # Frames are handled one at a time: after the last refusal nothing more can land.
    assert [r.seq async for r in store.read("steer")] == [1, 2, 3, 4]


async def test_metrics_need_the_analyst_role(secured: Any) -> None:
    async with httpx.AsyncClient(base_url=secured.url) as http:
        assert (await http.get("/metrics/perf/aggregate", headers=bearer("x"))).status_code == 403
        assert (await http.get("/metrics/perf/chats", headers=bearer("x"))).status_code == 403
        assert (
            await http.get("/metrics/perf/aggregate", headers=bearer("a", roles=("analyst",)))
        ).status_code == 200
        missing = await http.get("/api/chats")
        assert missing.status_code == 401
        assert (
            missing.json()["detail"]
            == "missing bearer token (Authorization header or bearer.<token> subprotocol)"
        )
        assert (
            await http.get("/api/chats", headers={"Authorization": "Bearer not.a.token"})
        ).status_code == 401
        forged = issue_token("another-secret-of-at-least-thirty-two-b", "x", "P", ["user"])
        assert (
            await http.get("/api/chats", headers={"Authorization": f"Bearer {forged}"})
        ).status_code == 401


async def test_bad_input_gets_clear_errors_and_the_server_keeps_serving(start_node: Any, store: Any) -> None:
    node = await start_node(max_body_bytes=2048, chat_starts_per_minute=6)
    await store.append(
        StreamRef(chat_id="c", app_id="local", user_id="local", workflow="Analyzer"),
        [Pending(event=MessageAgent(content="hello"), agent="Analyst")],
        0,
    )
    async with httpx.AsyncClient(base_url=node.url) as http:
        too_big = await http.post("/api/chats", json={"workflow": "Analyzer", "message": "x" * 5000})
        assert too_big.status_code == 413
        unknown = await http.post("/api/chats", json={"workflow": "Nope", "message": "hi"})
        assert unknown.status_code == 404 and "Nope" in unknown.json()["detail"]
        typo = await http.post("/api/chats", json={"workflow": "Analyzer", "mesage": "hi"})
        assert typo.status_code == 400
        missing = await http.get("/api/chats/missing/events")
        assert missing.status_code == 404 and missing.json() == {
            "error": "unknown_chat",
            "detail": "chat missing does not exist",
        }
        bad_type = await http.get("/api/chats/c/events", params={"type": "message.nope"})
        assert bad_type.status_code == 400 and "message.nope" in bad_type.text
        assert (await http.get("/api/chats/c/events", params={"after": "-1"})).status_code == 400
        # Operator-looking filter values are plain strings, never Mongo operators.
        injected = await http.get("/api/chats/c/events", params={"agent": '{"$ne": null}'})
        assert injected.status_code == 200 and injected.json()["events"] == []
        assert len((await http.get("/api/chats/c/events", params={"agent": "Analyst"})).json()["events"]) == 1
        # The three refused starts above count too: 6 per minute leaves 3.
        statuses = [
            (await http.post("/api/chats", json={"workflow": "Analyzer", "message": f"m{i}"})).status_code
            for i in range(5)
        ]
        assert statuses[:3] == [201, 201, 201] and statuses[3:] == [429, 429]
        assert (await http.get("/api/chats/c/events")).status_code == 200
        ndjson = await http.get("/api/chats/c/events", headers={"Accept": "application/x-ndjson"})
        assert ndjson.headers["content-type"].startswith("application/x-ndjson")
        assert [json.loads(line)["seq"] for line in ndjson.text.splitlines()] == [1]
        assert (await http.get("/api/chats/c/verify")).json()["ok"] is True
        assert (await http.get("/schema/openapi.json")).status_code == 200
        metrics = await http.get("/metrics")
        assert "mozaiks_events_appended_total" in metrics.text and "mozaiks_ws_clients" in metrics.text


async def test_continue_a_finished_chat_and_answer_input_over_rest(start_node: Any) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=node.url) as http:
        chat_id = (await http.post("/api/chats", json={"workflow": "Assistant", "message": "bees"})).json()[
            "chat_id"
        ]
        async with asyncio.timeout(60):
            while True:
                events = (await http.get(f"/api/chats/{chat_id}/events")).json()["events"]
                if any(e["type"] == "input.requested" for e in events):
                    break
                await asyncio.sleep(0.1)
        busy = await http.post(f"/api/chats/{chat_id}/messages", json={"message": "exit", "request_id": None})
        assert busy.status_code == 202 and busy.json()["recorded"] == "input.received"
        assert await wait_for_terminal(http, chat_id) == "run.completed"
        again = await http.post(f"/api/chats/{chat_id}/messages", json={"message": "and wasps?"})
        assert again.status_code == 202 and again.json()["recorded"] == "message.user"
        async with asyncio.timeout(60):
            while True:
                types = [e["type"] for e in (await http.get(f"/api/chats/{chat_id}/events")).json()["events"]]
                if types.count("run.started") == 2 and types[-1] in (
                    "run.completed",
                    "run.failed",
                    "input.requested",
                ):
                    break
                await asyncio.sleep(0.1)
        # The second run's researcher checks back too: the run waits for input, so it can be stopped.
        assert types[-1] == "input.requested"
        stopped = await http.post(f"/api/chats/{chat_id}/stop")
        assert stopped.status_code == 202 and stopped.json()["recorded"] == "run.stopped"
        assert await wait_for_terminal(http, chat_id) == "run.stopped"
        events = (await http.get(f"/api/chats/{chat_id}/events")).json()["events"]
        runs = [e["run_id"] for e in events if e["type"] == "run.started"]
        assert (
            [e["run_id"] for e in events if e["type"] == "run.stopped"]
            == [runs[1]]
            == [stopped.json()["run_id"]]
        )
        assert events[-1]["type"] == "run.stopped" and events[-1]["data"]["by"] == "local", events[-1]
        again = await http.post(f"/api/chats/{chat_id}/stop")
        assert again.status_code == 409 and again.json()["error"] == "no_active_run"
        assert chat_id in again.json()["detail"], again.json()


async def test_a_run_whose_node_died_is_recorded_as_interrupted_and_can_continue(
    start_node: Any, store: Any, db: Any
) -> None:
    stream = StreamRef(chat_id="orphan", app_id="local", user_id="local", workflow="Analyzer")
    await store.append(
        stream, [Pending(event=RunStarted(pattern="RoundRobin", max_turns=8), run_id="r-dead")], 0
    )
    # The dead node's lease, already expired.
    await db["chat_leases"].insert_one(
        {
            "_id": "orphan",
            "owner": "dead-node",
            "run_id": "r-dead",
            "expires_at": datetime.now(UTC) - timedelta(seconds=1),
        }
    )
    node = await start_node(lease_ttl_s=0.6)
    async with asyncio.timeout(30):
        while True:
            types = [r.type async for r in store.read("orphan")]
            if "run.failed" in types:
                break
            await asyncio.sleep(0.05)
    failed = [r async for r in store.read("orphan")][-1]
    assert (
        failed.type == "run.failed" and failed.data["reason"] == "interrupted" and failed.run_id == "r-dead"
    )
    assert await db["chat_leases"].count_documents({}) == 0
    async with httpx.AsyncClient(base_url=node.url) as http:
        resumed = await http.post("/api/chats/orphan/messages", json={"message": "go on"})
        assert resumed.status_code == 202 and resumed.json()["recorded"] == "message.user"
        async with asyncio.timeout(60):
            while True:
                types = [r.type async for r in store.read("orphan")]
                if types.count("run.started") == 2 and types[-1] in ("run.completed", "run.failed"):
                    break
                await asyncio.sleep(0.05)
    assert types[-1] == "run.completed" and types.count("run.started") == 2


@pytest.mark.usefixtures("local_clock_far_from_utc")  # a live lease is live in any zone
async def test_only_one_node_runs_a_chat(start_node: Any) -> None:
    node_a = await start_node(max_active_runs=1)
    node_b = await start_node()
    async with httpx.AsyncClient(base_url=node_a.url) as a, httpx.AsyncClient(base_url=node_b.url) as b:
        chat_id = (await a.post("/api/chats", json={"workflow": "Assistant", "message": "bees"})).json()[
            "chat_id"
        ]
        async with asyncio.timeout(60):
            while not any(
                e["type"] == "input.requested"
                for e in (await a.get(f"/api/chats/{chat_id}/events")).json()["events"]
            ):
                await asyncio.sleep(0.1)
        # A's lease is live: B's supervisor does not start a second run of the chat.
        first = (await a.get(f"/api/chats/{chat_id}/events")).json()["events"][0]
        stream = StreamRef(
            chat_id=chat_id, app_id=first["app_id"], user_id=first["user_id"], workflow=first["workflow"]
        )
        with pytest.raises(RunActive):
            await node_b.runtime.supervisor.start(stream)
        assert chat_id not in node_b.runtime.supervisor.tasks
        # A runs as many runs as it may (one): it starts no run of another chat either.
        with pytest.raises(NodeBusy):
            await node_a.runtime.supervisor.start(msgspec.structs.replace(stream, chat_id="other"))
        assert list(node_a.runtime.supervisor.tasks) == [chat_id]
        # Words sent to B while A's run waits for input are that input's answer, recorded for A's run.
        answered = await b.post(f"/api/chats/{chat_id}/messages", json={"message": "exit"})
        assert answered.status_code == 202 and answered.json()["recorded"] == "input.received"
        assert await wait_for_terminal(a, chat_id) == "run.completed"
        assert chat_id not in node_b.runtime.supervisor.tasks
        events = (await a.get(f"/api/chats/{chat_id}/events")).json()["events"]
        started = [e for e in events if e["type"] == "run.started"]
        assert len(started) == 1 and started[0]["data"]["node"] == node_a.settings.node_id
        answer = next(e for e in events if e["type"] == "input.received")
        asked = next(e for e in events if e["type"] == "input.requested")
        assert answer["run_id"] == started[0]["run_id"] and answer["data"] == {
            "request_id": asked["data"]["request_id"],
            "text": "exit",
        }
        stopped = await b.post(f"/api/chats/{chat_id}/stop")
        assert stopped.status_code == 409


async def test_a_live_lease_of_another_node_refuses_a_new_run_and_an_expired_one_is_taken_over(
    start_node: Any, store: Any, db: Any
) -> None:
    # The log shows no run going (the other node has its lease but has not recorded run.started yet).
    stream = StreamRef(chat_id="leased", app_id="local", user_id="local", workflow="Analyzer")
    await store.append(stream, [Pending(event=ChatCreated()), Pending(event=MessageUser(content="count"))], 0)
    live = datetime.now(UTC) + timedelta(minutes=5)
    await db["chat_leases"].insert_one(
        {"_id": "leased", "owner": "node-a", "run_id": "r-a", "expires_at": live}
    )
    node = await start_node()
    async with httpx.AsyncClient(base_url=node.url) as http:
        refused = await http.post("/api/chats/leased/messages", json={"message": "again"})
        assert refused.status_code == 409 and refused.json() == {
            "error": "run_active",
            "detail": "chat leased has a run in progress (r-a); wait for it or stop it first",
        }
        with pytest.raises(RunActive) as active:
            await node.runtime.supervisor.start(stream)
        assert active.value.run_id == "r-a"
        assert [r.type async for r in store.read("leased")] == ["chat.created", "message.user"]
        assert await db["chat_leases"].find_one({"_id": "leased"}) == {
            "_id": "leased", "owner": "node-a", "run_id": "r-a", "expires_at": live.replace(microsecond=live.microsecond // 1000 * 1000)
        }  # fmt: skip
        # Once node-a's lease has expired, this node takes it over and runs the chat.
        await db["chat_leases"].update_one(
            {"_id": "leased"}, {"$set": {"expires_at": datetime.now(UTC) - timedelta(seconds=1)}}
        )
        run_id = await node.runtime.supervisor.start(stream)
        lease = await db["chat_leases"].find_one({"_id": "leased"})
        assert lease is None or (lease["owner"], lease["run_id"]) == (node.settings.node_id, run_id)
        assert await wait_for_terminal(http, "leased") == "run.completed"
    started = [r async for r in store.read("leased") if r.type == "run.started"]
    assert [(r.run_id, r.data["node"]) for r in started] == [(run_id, node.settings.node_id)]


async def test_words_to_a_busy_run_are_refused_naming_it_and_words_to_another_chat_stay_there(
    start_node: Any, store: Any, db: Any
) -> None:
    # "busy": another node's run is live and not waiting for input. "done": node-a recorded its
    # run's end (and was asked to stop it) but has not released the lease yet; the lease of a run
    # that is over is free to take, and the stop mark is not the new run's.
    busy = StreamRef(chat_id="busy", app_id="local", user_id="local", workflow="Analyzer")
    done = StreamRef(chat_id="done", app_id="local", user_id="local", workflow="Assistant")
    run = RunStarted(pattern="RoundRobin", max_turns=8)
    await store.append(
        busy, [Pending(event=MessageUser(content="count")), Pending(event=run, run_id="r-b")], 0
    )
    await store.append(
        done,
        [
            Pending(event=MessageUser(content="bees")),
            Pending(event=run, run_id="r-d"),
            Pending(event=RunCompleted(), run_id="r-d"),
        ],
        0,
    )
    live = datetime.now(UTC) + timedelta(minutes=5)
    await db["chat_leases"].insert_many(
        [
            {"_id": "done", "owner": "node-a", "run_id": "r-d", "expires_at": live, "stop": {"by": "u"}},
            {"_id": "busy", "owner": "node-a", "run_id": "r-b", "expires_at": live},
        ]
    )
    node = await start_node(max_active_runs=1)  # the turn's own admission fills the node, not more
    async with httpx.AsyncClient(base_url=node.url) as http:
        refused = await http.post("/api/chats/busy/messages", json={"message": "more"})
        assert refused.status_code == 409 and refused.json() == {
            "error": "run_active",
            "detail": "chat busy has a run in progress (r-b); wait for it or stop it first",
        }
        with pytest.raises(RunActive) as active:
            await node.runtime.supervisor.start(busy)
        assert (active.value.chat_id, active.value.run_id) == ("busy", "r-b")
        sent = await http.post("/api/chats/done/messages", json={"message": "wasps"})
        assert sent.status_code == 202 and sent.json()["recorded"] == "message.user", sent.text
        async with asyncio.timeout(60):
            while "input.requested" not in [r.type async for r in store.find("done", after=3)]:
                await asyncio.sleep(0.05)
        new_run = [r async for r in store.read("done")][4]
        assert (new_run.type, new_run.data["node"]) == ("run.started", node.settings.node_id)
        lease = await db["chat_leases"].find_one({"_id": "done"}, {"_id": 0, "expires_at": 0})
        assert lease == {"owner": node.settings.node_id, "run_id": new_run.run_id}
        answered = await http.post("/api/chats/done/messages", json={"message": "exit"})
        assert answered.status_code == 202 and answered.json()["recorded"] == "input.received"
        async with asyncio.timeout(60):
            while [r.type async for r in store.read("done")][-1] != "run.completed":
                await asyncio.sleep(0.05)
        async with asyncio.timeout(10):  # released once the run's end is recorded
            while await db["chat_leases"].find_one({"_id": "done"}) is not None:
                await asyncio.sleep(0.05)
        # With no lease of its own, the chat takes another turn (busy's lease is not its).
        again = await http.post("/api/chats/done/messages", json={"message": "exit"})
        assert again.status_code == 202 and again.json()["recorded"] == "message.user", again.text
        assert await drive_to_end(http, store, "done", runs=3) == "run.completed"
    assert [r.type async for r in store.read("busy")] == ["message.user", "run.started"]
    log = [r async for r in store.read("done")]
    assert [r.type for r in log][:5] == [
        "message.user", "run.started", "run.completed", "message.user", "run.started"
    ]  # fmt: skip
    assert log[3].data["content"] == "wasps" and log[4].run_id != "r-d"
