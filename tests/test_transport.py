"""WebSocket transport over real sockets: replay + live with no gap or duplicate, fan-out, multi-node,
heartbeats, slow clients and bad frames."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from app.observability import WS_CLIENTS, WS_CLOSED
from app.runs.supervisor import chat_state
from domain.events import InputRequested, MessageAgent, Pending, RunStarted, StreamRef
from domain.store import MongoEventStore

LOCAL = StreamRef(chat_id="", app_id="local", user_id="local", workflow="Analyzer")


def stream_of(chat_id: str) -> StreamRef:
    return StreamRef(chat_id=chat_id, app_id="local", user_id="local", workflow="Analyzer")


async def seed_chat(store: MongoEventStore, chat_id: str, count: int, hidden_every: int = 0) -> None:
    """A chat whose log holds `count` agent messages (every `hidden_every`-th one hidden)."""
    pendings = [
        Pending(
            event=MessageAgent(content=f"m{i}"),
            agent="Analyst",
            visible=not (hidden_every and i % hidden_every == 0),
        )
        for i in range(1, count + 1)
    ]
    await store.append(stream_of(chat_id), pendings, None)


async def frames_until(ws: ClientConnection, last_seq: int, timeout: float = 30) -> list[dict[str, Any]]:
    """Frames received (heartbeats answered and dropped) until the event with `last_seq`."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "heartbeat":
                await ws.send(json.dumps({"type": "pong"}))
                continue
            got.append(frame)
            if frame["type"] == "event" and frame["seq"] >= last_seq:
                return got


async def answer_heartbeats(ws: ClientConnection, beats: int, timeout: float) -> None:
    """Read frames, answering each heartbeat with a pong, until `beats` heartbeats were answered."""
    async with asyncio.timeout(timeout):
        while beats:
            if json.loads(await ws.recv())["type"] == "heartbeat":
                beats -= 1
                await ws.send(json.dumps({"type": "pong"}))


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames if f["type"] == "event"]


async def test_replay_then_replay_done_then_live_without_gap_or_duplicate(store, start_node) -> None:
    node = await start_node()
    await seed_chat(store, "c1", 30, hidden_every=5)
    async with connect(f"{node.ws_url}/ws/chats/c1?after=10") as ws:
        replay = await frames_until(ws, 29)
        assert replay[-1]["seq"] == 29
        done = json.loads(await ws.recv())
        assert done == {"type": "replay.done", "last_seq": 30}
        await seed_chat(store, "c1", 5)
        live = await frames_until(ws, 35)
    visible_after_10 = [s for s in range(11, 31) if s % 5 != 0]
    assert seqs(replay) == visible_after_10
    assert seqs(live) == [31, 32, 33, 34, 35]
    event = live[0]["event"]
    assert (
        event["type"] == "message.agent" and event["data"]["content"] == "m1" and event["agent"] == "Analyst"
    )
    assert "hash" not in event and "ag2" not in event


async def test_reconnecting_at_twenty_random_points_of_a_running_chat_sees_every_event_once(
    store, start_node
) -> None:
    node = await start_node()
    total = 400
    await seed_chat(store, "run", 1)

    async def producer() -> None:
        # Batches of 1 to 8 records, as a run's recorder commits them: fewer round trips, and a
        # reconnect point may fall inside a batch as well as between two.
        sizes = random.Random(4)
        written = 1
        while written < total:
            size = min(sizes.randint(1, 8), total - written)
            await store.append(
                stream_of("run"),
                [Pending(event=MessageAgent(content="x"), agent="Analyst") for _ in range(size)],
                None,
            )
            written += size
            await asyncio.sleep(0.002)

    producing = asyncio.create_task(producer())
    rng = random.Random(3)
    seen: list[int] = []
    last = 0
    for _ in range(20):
        # max_queue=None: the client keeps reading while it closes. With its default (16 frames), a
        # client that stops reading with more unread waits out its 10 s close timeout each time.
        async with connect(f"{node.ws_url}/ws/chats/run?after={last}", max_queue=None) as ws:
            # Up to 25 frames, unless the client already has every record (a slow machine may see the
            # producer finish first: then a heartbeat would be the only frame left to wait for).
            for _ in range(rng.randint(1, 25)):
                if last == total:
                    break
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame["type"] == "event":
                    seen.append(frame["seq"])
                    last = frame["seq"]
        # The socket is closed mid-stream here; the producer (the "run") goes on meanwhile.
    async with connect(f"{node.ws_url}/ws/chats/run?after={last}", max_queue=None) as ws:
        await producing
        if last < total:
            seen += seqs(await frames_until(ws, total))
    assert seen == list(range(1, total + 1))


async def test_a_real_run_streams_to_a_client_that_connects_before_it_starts(start_node) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=node.url) as http:
        started = (
            await http.post("/api/chats", json={"workflow": "Analyzer", "message": "Count words"})
        ).json()
        chat_id = started["chat_id"]
        async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0") as ws:
            got: list[dict[str, Any]] = []
            async with asyncio.timeout(60):
                while not got or got[-1].get("event", {}).get("type") not in ("run.completed", "run.failed"):
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "event":
                        got.append(frame)
        log = (await http.get(f"/api/chats/{chat_id}/events")).json()["events"]
    assert got[-1]["event"]["type"] == "run.completed"
    assert seqs(got) == [e["seq"] for e in log if e["visible"]]
    assert all(f["event"]["visible"] for f in got)
    assert {f["event"]["agent"] for f in got} - {None} <= {"Analyst", "Summarizer"}  # Collector is hidden


async def test_two_hundred_clients_on_one_chat_receive_the_identical_sequence(store, start_node) -> None:
    node = await start_node()
    await seed_chat(store, "fan", 5)
    sockets = [await connect(f"{node.ws_url}/ws/chats/fan?after=0") for _ in range(200)]
    try:
        await seed_chat(store, "fan", 45, hidden_every=7)
        results = await asyncio.gather(*(frames_until(ws, 50, timeout=120) for ws in sockets))
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
    expected = [s for s in range(1, 51) if s <= 5 or (s - 5) % 7 != 0]
    for frames in results:
        assert seqs(frames) == expected
    assert len(
        {json.dumps(f, sort_keys=True) for frames in results for f in frames if f["type"] == "event"}
    ) == len(expected)


async def test_a_client_on_node_b_sees_node_a_live_and_a_reconnect_to_a_misses_nothing(
    store, start_node
) -> None:
    node_a = await start_node()
    node_b = await start_node()
    async with httpx.AsyncClient(base_url=node_a.url) as http:
        chat_id = (
            await http.post("/api/chats", json={"workflow": "Assistant", "message": "Find bees"})
        ).json()["chat_id"]
    ws_b = await connect(f"{node_b.ws_url}/ws/chats/{chat_id}?after=0")
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while True:  # the run on A asks for input; B streams everything up to that point live
            frame = json.loads(await ws_b.recv())
            if frame["type"] == "event":
                seen.append(frame)
                if frame["event"]["type"] == "input.requested":
                    break
    await node_b.kill()
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(10):
            while True:
                await ws_b.recv()
    # Answer on node A; the run there goes on to completion; reconnect to A from the last seq seen on B.
    request_id = seen[-1]["event"]["data"]["request_id"]
    async with connect(f"{node_a.ws_url}/ws/chats/{chat_id}?after={seen[-1]['seq']}") as ws_a:
        await ws_a.send(
            json.dumps({"type": "input.response", "request_id": request_id, "text": "yes, go on"})
        )
        async with asyncio.timeout(60):
            while seen[-1]["event"]["type"] not in ("run.completed", "run.failed"):
                frame = json.loads(await ws_a.recv())
                if frame["type"] == "event":
                    seen.append(frame)
                    if frame["event"]["type"] == "input.requested":  # it checks back: we are done
                        await ws_a.send(json.dumps({"type": "user.message", "text": "exit"}))
    visible = [r.seq async for r in store.read(chat_id) if r.visible]
    assert seqs(seen) == visible
    assert seen[-1]["event"]["type"] == "run.completed"
    assert seen[-1]["event"]["data"] is not None


async def test_a_stop_sent_over_the_socket_does_not_hold_up_its_reading(store, db, start_node) -> None:
    # The run is held by another node's live lease and will not end soon: the stop is a mark on that
    # lease. Waiting for the run's end would leave the client's heartbeat answers unread.
    await store.append(
        stream_of("held"),
        [Pending(event=RunStarted(pattern="RoundRobin", max_turns=4), run_id="rh")],
        0,
    )
    expires = datetime.now(UTC) + timedelta(hours=1)
    await db["chat_leases"].insert_one(
        {"_id": "held", "owner": "elsewhere", "run_id": "rh", "expires_at": expires}
    )
    node = await start_node(ws_heartbeat_s=0.5)
    async with connect(f"{node.ws_url}/ws/chats/held?after=1") as ws:
        await ws.send(json.dumps({"type": "chat.stop"}))
        # 5 beats = 2.5 s, well past the 1 s silence limit (the stop would wait up to 10 s)
        await answer_heartbeats(ws, 5, timeout=20)
    lease = await db["chat_leases"].find_one({"_id": "held"})
    assert lease is not None and lease["stop"] == {"by": "local"}


async def test_silent_client_is_closed_after_two_heartbeats(store, start_node) -> None:
    node = await start_node(ws_heartbeat_s=0.3)
    await seed_chat(store, "hb", 1)
    async with connect(f"{node.ws_url}/ws/chats/hb?after=0") as ws:
        types = []
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    types.append(json.loads(await ws.recv())["type"])  # never answers heartbeats
    assert "heartbeat" in types
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000


async def test_answering_heartbeats_keeps_the_socket_open(store, start_node) -> None:
    node = await start_node(ws_heartbeat_s=0.5)
    await seed_chat(store, "hb2", 1)
    async with connect(f"{node.ws_url}/ws/chats/hb2?after=0") as ws:
        await answer_heartbeats(ws, 5, timeout=10)  # 5 beats = 2.5 s, well past the 1 s silence limit
        await seed_chat(store, "hb2", 1)
        assert seqs(await frames_until(ws, 2)) == [2]


async def test_slow_client_is_closed_with_a_resume_hint_and_others_are_unaffected(store, start_node) -> None:
    node = await start_node(ws_queue_max=50, ws_heartbeat_s=30.0)
    await seed_chat(store, "slow", 1)
    # The slow client: a raw socket that completes the handshake and then stops reading, its WebSocket
    # side kept by the websockets library's sans-I/O protocol so it can read frames later.
    protocol = ClientProtocol(parse_uri(f"{node.ws_url}/ws/chats/slow?after=0"), max_size=None)
    protocol.send_request(protocol.connect())
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    # A small receive buffer (far below the 24 MB the run sends) fills soon, yet drains fast later.
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
    writer.write(b"".join(protocol.data_to_send()))
    await writer.drain()
    reader._transport.pause_reading()  # type: ignore[attr-defined]  # stop reading: the kernel buffer fills
    fast = await connect(f"{node.ws_url}/ws/chats/slow?after=0")
    slow_closes_before = WS_CLOSED.labels("4408")._value.get()
    batches, per_batch = 60, 20
    last = 1 + batches * per_batch
    try:
        big, small = "x" * 20_000, "x" * 200

        def slow_closed() -> bool:
            return bool(WS_CLOSED.labels("4408")._value.get() > slow_closes_before)

        async def produce() -> None:
            for _ in range(batches):
                # Big messages until the slow client is let go (they fill its buffers), small ones
                # after it: the rest of the run only has to reach the fast client, whole and in order.
                content = small if slow_closed() else big
                batch = [
                    Pending(event=MessageAgent(content=content), agent="Analyst") for _ in range(per_batch)
                ]
                await store.append(stream_of("slow"), batch, None)
                await asyncio.sleep(0.03)  # a steady run, not one burst

        async def read_once_let_go() -> list[int]:
            # The moment the server gives up on it, the slow client reads on: what reached it, then the
            # close frame (which waits behind that backlog for a few seconds only).
            async with asyncio.timeout(90):
                while not slow_closed():
                    await asyncio.sleep(0.01)
            reader._transport.resume_reading()  # type: ignore[attr-defined]
            received: list[int] = []
            async with asyncio.timeout(30):
                while protocol.close_rcvd is None:
                    data = await reader.read(1 << 16)
                    if not data:
                        break
                    protocol.receive_data(data)
                    for item in protocol.events_received():
                        if isinstance(item, Frame) and item.opcode is Opcode.TEXT:
                            frame = json.loads(item.data)
                            if frame["type"] == "event":
                                received.append(frame["seq"])
            return received

        fast_frames, received, _ = await asyncio.gather(
            frames_until(fast, last, timeout=90), read_once_let_go(), produce()
        )
        assert seqs(fast_frames) == list(range(1, last + 1))
        assert WS_CLOSED.labels("4408")._value.get() == slow_closes_before + 1
        # The server no longer follows the chat for the slow client: its backlog is not buffered.
        async with asyncio.timeout(30):
            while node.runtime.hub.subscriber_count != 1:
                await asyncio.sleep(0.05)
        assert protocol.close_rcvd is not None and protocol.close_rcvd.code == 4408
        hint = re.fullmatch(r"too slow; resume from seq (\d+)", protocol.close_rcvd.reason)
        assert hint is not None, protocol.close_rcvd.reason
        resume = int(hint.group(1))
        # It has every event up to the hint (perhaps a few more, sent before the close), and no more
        # than the chat had; resuming from the hint gives the rest with no gap.
        assert 1 <= resume < last and received[:resume] == list(range(1, resume + 1))
        assert received == list(range(1, len(received) + 1)) and len(received) <= last
    finally:
        writer.close()
        await fast.close()
    async with connect(f"{node.ws_url}/ws/chats/slow?after={resume}") as again:
        assert seqs(await frames_until(again, last)) == list(range(resume + 1, last + 1))


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(store, start_node) -> None:
    node = await start_node()
    await seed_chat(store, "bad", 1)
    async with connect(f"{node.ws_url}/ws/chats/bad?after=0") as ws:
        await frames_until(ws, 1)
        assert json.loads(await ws.recv())["type"] == "replay.done"
        for bad in [
            "not json",
            '{"type": "no.such"}',
            '{"type": "user.message"}',
            '{"type":"pong","x":1}',
            "[]",
        ]:
            await ws.send(bad)
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["type"] == "error" and frame["code"] == "bad_frame", bad
        await seed_chat(store, "bad", 1)
        assert seqs(await frames_until(ws, 2)) == [2]


async def test_oversized_frame_closes_with_1009(store, start_node) -> None:
    node = await start_node(max_frame_bytes=4096)
    await seed_chat(store, "big", 1)
    async with connect(f"{node.ws_url}/ws/chats/big?after=0") as ws:
        await frames_until(ws, 1)
        await ws.send(json.dumps({"type": "user.message", "text": "y" * 10_000}))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


@pytest.mark.parametrize(
    ("path", "code"),
    [("/ws/chats/nope?after=0", 4404), ("/ws/chats/c?after=-1", 4400), ("/ws/chats/c?after=abc", 4400)],
)
async def test_unknown_chat_and_bad_after_close_with_their_codes(
    store, start_node, path: str, code: int
) -> None:
    node = await start_node()
    await seed_chat(store, "c", 1)
    async with connect(f"{node.ws_url}{path}") as ws:
        error = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert error["type"] == "error"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code


async def test_disconnect_never_stops_a_run_and_chat_stop_does(start_node) -> None:
    node = await start_node()
    clients_before = WS_CLIENTS._value.get()
    async with httpx.AsyncClient(base_url=node.url) as http:
        chat_id = (
            await http.post("/api/chats", json={"workflow": "Assistant", "message": "Find bees"})
        ).json()["chat_id"]
        async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0") as ws:
            async with asyncio.timeout(60):
                while json.loads(await ws.recv()).get("event", {}).get("type") != "input.requested":
                    pass
        # Gone (the server has let the socket go): the run still waits for its input, alive.
        async with asyncio.timeout(30):
            while WS_CLIENTS._value.get() != clients_before:
                await asyncio.sleep(0.02)
        assert chat_id in node.runtime.supervisor.tasks
        async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0") as ws:
            await ws.send(json.dumps({"type": "chat.stop"}))
            async with asyncio.timeout(60):
                while True:
                    frame = json.loads(await ws.recv())
                    if frame.get("event", {}).get("type") == "run.stopped":
                        break
        async with asyncio.timeout(30):
            while chat_id in node.runtime.supervisor.tasks:
                await asyncio.sleep(0.05)
        types = [e["type"] for e in (await http.get(f"/api/chats/{chat_id}/events")).json()["events"]]
    assert types.count("run.stopped") == 1
    assert "run.completed" not in types and "run.failed" not in types


async def test_control_frames_act_on_the_socket_s_own_chat_only(store, db, start_node) -> None:
    # Two chats whose runs both wait for input, each run held by another node's live lease; the client
    # controls "b-mine", and "a-other" (first in the log's order) must not be touched.
    expires = datetime.now(UTC) + timedelta(hours=1)
    for chat_id, run_id in (("a-other", "ra"), ("b-mine", "rb")):
        await store.append(
            stream_of(chat_id),
            [
                Pending(event=RunStarted(pattern="RoundRobin", max_turns=4), run_id=run_id),
                Pending(event=InputRequested(request_id="q1", prompt="go on?"), run_id=run_id),
            ],
            0,
        )
        await db["chat_leases"].insert_one(
            {"_id": chat_id, "owner": "elsewhere", "run_id": run_id, "expires_at": expires}
        )
    node = await start_node()

    async def reply(ws: ClientConnection) -> dict[str, Any]:
        while (frame := json.loads(await ws.recv()))["type"] in ("heartbeat", "replay.done"):
            pass
        return frame

    async def stop_mark(chat_id: str) -> Any:
        return ((await db["chat_leases"].find_one({"_id": chat_id})) or {}).get("stop")

    async with connect(f"{node.ws_url}/ws/chats/b-mine?after=2") as ws:
        async with asyncio.timeout(30):
            # An answer naming a request that is not the open one is recorded as said, and answers nothing.
            await ws.send(json.dumps({"type": "input.response", "request_id": "q0", "text": "too late"}))
            stale = await reply(ws)
            assert (stale["seq"], stale["event"]["data"]["request_id"]) == (3, "q0")
            assert (await chat_state(store, "b-mine")).open_request == "q1"
            await ws.send(json.dumps({"type": "input.response", "request_id": "q1", "text": "yes"}))
            answered = await reply(ws)
            await ws.send(json.dumps({"type": "user.message", "text": "and more"}))
            busy = await reply(ws)
            # The run's node is another one: the stop reaches it as a mark on the run's lease.
            await ws.send(json.dumps({"type": "chat.stop"}))
            while await stop_mark("b-mine") is None:
                await asyncio.sleep(0.05)
    assert answered["seq"] == 4
    assert (answered["event"]["type"], answered["event"]["data"]) == (
        "input.received",
        {"request_id": "q1", "text": "yes"},
    )
    assert (await chat_state(store, "b-mine")).open_request is None
    assert busy == {
        "type": "error",
        "code": "run_active",
        "message": "chat b-mine has a run in progress (rb); wait for it or stop it first",
    }
    assert await stop_mark("b-mine") == {"by": "local"}
    assert await stop_mark("a-other") is None
    assert [r.type async for r in store.read("a-other")] == ["run.started", "input.requested"]
