"""Streaming end to end: a local OpenAI-compatible server streams SSE through the real `openai` SDK into
a real runtime node; WebSocket clients watch `message.delta` records arrive, reconnect mid-message,
and replay finished chats. The server's pace is held by the test (events, never sleeps)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from domain.events import MessageAgent, MessageDelta, Pending, RunFailed, RunStarted, StreamRef
from domain.store import MongoEventStore
from tests.llm_server import Gate, StreamingModel, solo_workflow, text_reply

WAIT_S = 60.0


@pytest.fixture
def solo(tmp_path: Path) -> Path:
    """One visible agent that answers once and ends the run (Default pattern, no tools)."""
    return solo_workflow(tmp_path)


@pytest.fixture
def gate() -> Iterator[Gate]:
    held = Gate()
    yield held
    held.close()


class Client:
    """A ChatUI-like reader of one chat: builds each message from its deltas, final text from `message.agent`."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.streamed: dict[str, str] = {}
        self.final: dict[str, str] = {}
        self.frames: list[dict[str, Any]] = []

    def take(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        if frame["type"] != "event":
            return
        assert frame["seq"] > self.last_seq, f"seq {frame['seq']} after {self.last_seq}"
        self.last_seq = frame["seq"]
        event = frame["event"]
        data = event["data"]
        if event["type"] == "message.delta":
            self.streamed[data["message_id"]] = self.streamed.get(data["message_id"], "") + data["text"]
        elif event["type"] == "message.agent":
            self.final[data["message_id"]] = data["content"]

    async def read_until(self, ws: ClientConnection, done: Any) -> None:
        async with asyncio.timeout(WAIT_S):
            while not done(self):
                frame = json.loads(await ws.recv())
                if frame["type"] == "heartbeat":
                    await ws.send(json.dumps({"type": "pong"}))
                    continue
                self.take(frame)

    def types(self) -> list[str]:
        return [f["event"]["type"] for f in self.frames if f["type"] == "event"]


def got_type(kind: str) -> Any:
    return lambda client: kind in client.types()


async def node_on(start_node: Any, model: StreamingModel, workflows: Path, flush_ms: float) -> Any:
    """A runtime node whose model is `model`, with the given flush window."""
    return await start_node(openai_base_url=model.base_url, openai_api_key="sk-test", workflows_path=workflows,
                            stream_flush_ms=flush_ms)


async def start_chat(node: Any, message: str = "Write at length") -> str:
    async with httpx.AsyncClient(base_url=node.url) as http:
        response = await http.post("/api/chats", json={"workflow": "Solo", "message": message})
        assert response.status_code in (200, 201), response.text
        return str(response.json()["chat_id"])


async def records_of(store: MongoEventStore, chat_id: str) -> list[Any]:
    return [r async for r in store.read(chat_id)]


async def test_a_300_chunk_answer_reaches_a_live_client_while_the_model_still_writes(
    store: MongoEventStore, start_node: Any, solo: Path, gate: Gate
) -> None:
    text = " ".join(f"w{i}" for i in range(1500))
    reply = text_reply(text, 300)
    assert len(reply.chunks) == 300
    last = len(reply.chunks) - 1
    gate.allow_through(last - 1)  # everything but the last chunk, as fast as the server can
    model = StreamingModel([reply], before_chunk=gate.wait)
    try:
        node = await node_on(start_node, model, solo, 50.0)
        chat_id = await start_chat(node)
        client = Client()
        async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0") as ws:
            await client.read_until(ws, got_type("message.delta"))
            # The last chunk is still held back by the server: the client is watching the model write.
            assert (0, last) not in model.sent_at
            gate.open()
            await client.read_until(ws, got_type("run.completed"))
    finally:
        model.close()

    [(message_id, final)] = client.final.items()
    assert final == text
    assert client.streamed[message_id] == text  # the live deltas concatenate to exactly the final text
    records = await records_of(store, chat_id)
    deltas = [r for r in records if r.type == "message.delta"]
    message = next(r for r in records if r.type == "message.agent")
    assert message.data["message_id"] == message_id and max(d.seq for d in deltas) < message.seq
    assert [d.data["index"] for d in deltas] == list(range(len(deltas)))
    # Coalesced over the 50 ms flush window: the windows never overlap and each is recorded at
    # least 50 ms after it opened, so the records are at most one per 50 ms of the span they were
    # appended over, plus the first and the one the `llm.call` flushes. The gate makes it two or more.
    span_s = (deltas[-1].ts - deltas[0].ts).total_seconds() + 0.002  # ts is stored to the millisecond
    assert 2 <= len(deltas) <= math.floor(span_s / 0.05) + 2, (len(deltas), span_s)
    assert len(deltas) < 300
    call = next(r for r in records if r.type == "llm.call")
    assert call.data["ttft_ms"] is not None and call.data["stream_ms"] is not None
    assert call.data["ttft_ms"] + call.data["stream_ms"] <= call.data["latency_ms"]


async def test_reconnecting_at_five_random_points_of_a_streamed_message_loses_and_repeats_nothing(
    store: MongoEventStore, start_node: Any, solo: Path, gate: Gate
) -> None:
    text = "".join(f"part {i}; " for i in range(120))
    reply = text_reply(text, 120)
    count = len(reply.chunks)
    sent = threading.Semaphore(0)
    model = StreamingModel([reply], before_chunk=gate.wait, on_chunk=lambda _r, _i: sent.release())
    rng = random.Random(11)
    points = sorted(rng.sample(range(5, count - 5), 5))
    try:
        node = await node_on(start_node, model, solo, 10.0)
        chat_id = await start_chat(node)
        resuming = Client()  # keeps its state and reconnects with the last seq it received
        newcomers: list[tuple[Client, ClientConnection]] = []  # each connects once, from seq 0, mid-message
        live_ws = await connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0")
        try:
            released = -1
            for point in points:
                gate.allow_through(point)
                for _ in range(point - released):
                    await asyncio.wait_for(asyncio.to_thread(sent.acquire), WAIT_S)
                released = point
                so_far = len("".join(reply.chunks[: point + 1]))
                # Once the client has everything the model wrote so far, drop it mid-message.
                await resuming.read_until(live_ws, lambda c, n=so_far: sum(map(len, c.streamed.values())) == n)
                await live_ws.close()
                live_ws = await connect(f"{node.ws_url}/ws/chats/{chat_id}?after={resuming.last_seq}")
                newcomer = Client()
                ws = await connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0")
                newcomers.append((newcomer, ws))
                await newcomer.read_until(ws, lambda c: any(f["type"] == "replay.done" for f in c.frames))
                assert not newcomer.final and text.startswith(next(iter(newcomer.streamed.values())))
            gate.open()
            await resuming.read_until(live_ws, got_type("run.completed"))
            for newcomer, ws in newcomers:
                await newcomer.read_until(ws, got_type("run.completed"))
        finally:
            await live_ws.close()
            for _, ws in newcomers:
                await ws.close()
    finally:
        model.close()

    records = await records_of(store, chat_id)
    message = next(r for r in records if r.type == "message.agent")
    assert message.data["content"] == text
    for client in [resuming, *(newcomer for newcomer, _ in newcomers)]:
        # Built from deltas only (no replacement by the final text): nothing twice, nothing missing.
        assert client.streamed == {message.data["message_id"]: text}
        assert client.final == {message.data["message_id"]: text}


async def test_a_replay_of_a_finished_chat_sends_no_deltas(
    store: MongoEventStore, start_node: Any, solo: Path
) -> None:
    model = StreamingModel([text_reply("A finished answer, streamed in many small pieces.", 12)])
    try:
        node = await node_on(start_node, model, solo, 0.0)
        chat_id = await start_chat(node)
        live = Client()
        async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0") as ws:
            await live.read_until(ws, got_type("run.completed"))
        assert "message.delta" in live.types()

        records = await records_of(store, chat_id)
        first_delta = next(r.seq for r in records if r.type == "message.delta")
        # From the start, and from a cursor in the middle of the message: its message.agent only.
        for after in (0, first_delta):
            replay = Client()
            replay.last_seq = after
            async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after={after}") as ws:
                await replay.read_until(ws, lambda c: any(f["type"] == "replay.done" for f in c.frames))
            assert "message.delta" not in replay.types()
            assert "message.agent" in replay.types() and "run.completed" in replay.types()
            assert replay.final == live.final
            done = replay.frames[-1]
            assert done["type"] == "replay.done" and done["last_seq"] == records[-1].seq
    finally:
        model.close()


async def test_an_interrupted_message_keeps_its_deltas_and_is_replayed_as_text_so_far(
    store: MongoEventStore, start_node: Any
) -> None:
    """A run that failed mid-stream: no `message.agent`, and the replay still brings the partial text."""
    stream = StreamRef(chat_id="cut", app_id="local", user_id="local", workflow="Analyzer")
    await store.append(stream, [Pending(event=RunStarted(pattern="Default", max_turns=3), run_id="r1")], 0)
    pieces = ["The partial ", "answer ", "so far"]
    await store.append(stream, [
        Pending(event=MessageDelta(message_id="m1", index=i, text=t), agent="Analyst", run_id="r1")
        for i, t in enumerate(pieces)
    ] + [Pending(event=MessageDelta(message_id="h1", index=0, text="hidden"), agent="Collector", visible=False, run_id="r1")], None)
    await store.append(stream, [
        Pending(event=MessageAgent(content="done", message_id="m0"), agent="Analyst", run_id="r1"),
        Pending(event=RunFailed(error="node died", reason="interrupted"), run_id="r1"),
    ], None)
    node = await start_node()
    replay = Client()
    async with connect(f"{node.ws_url}/ws/chats/cut?after=0") as ws:
        await replay.read_until(ws, lambda c: any(f["type"] == "replay.done" for f in c.frames))
    assert replay.streamed == {"m1": "The partial answer so far"}
    assert replay.types() == ["run.started", "message.delta", "message.delta", "message.delta", "message.agent", "run.failed"]
