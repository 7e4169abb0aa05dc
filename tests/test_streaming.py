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
from tests.llm_server import Gate, Reply, StreamingModel, ToolCall, solo_workflow, text_reply

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
    return await start_node(
        openai_base_url=model.base_url,
        openai_api_key="sk-test",
        workflows_path=workflows,
        stream_flush_ms=flush_ms,
    )


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
    # Coalesced over the 50 ms flush window: windows never overlap and each opens at a chunk, so
    # there is at most one window per 50 ms of the time the node was reading the stream (its first
    # to last token, recorded as `stream_ms`) plus one; the gate makes it two or more.
    call = next(r for r in records if r.type == "llm.call")
    assert 2 <= len(deltas) <= math.floor(call.data["stream_ms"] / 50.0) + 2, (
        len(deltas),
        call.data["stream_ms"],
    )
    assert len(deltas) < 300
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
                await resuming.read_until(
                    live_ws, lambda c, n=so_far: sum(map(len, c.streamed.values())) == n
                )
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
    await store.append(
        stream,
        [
            Pending(event=MessageDelta(message_id="m1", index=i, text=t), agent="Analyst", run_id="r1")
            for i, t in enumerate(pieces)
        ]
        + [
            Pending(
                event=MessageDelta(message_id="h1", index=0, text="hidden"),
                agent="Collector",
                visible=False,
                run_id="r1",
            )
        ],
        None,
    )
    await store.append(
        stream,
        [
            Pending(event=MessageAgent(content="done", message_id="m0"), agent="Analyst", run_id="r1"),
            Pending(event=RunFailed(error="node died", reason="interrupted"), run_id="r1"),
        ],
        None,
    )
    node = await start_node()
    replay = Client()
    async with connect(f"{node.ws_url}/ws/chats/cut?after=0") as ws:
        await replay.read_until(ws, lambda c: any(f["type"] == "replay.done" for f in c.frames))
    assert replay.streamed == {"m1": "The partial answer so far"}
    assert replay.types() == [
        "run.started",
        "message.delta",
        "message.delta",
        "message.delta",
        "message.agent",
        "run.failed",
    ]


# ---- the recorder, without a node -----------------------------------------------------------------


def orchestrator_on(
    store: MongoEventStore, workflows: Path, model: StreamingModel | None = None, **settings: Any
) -> Any:
    from app.runs.orchestrator import Orchestrator
    from app.runs.workflows import WorkflowManager
    from app.settings import Settings

    online = {"openai_api_key": "sk-test", "openai_base_url": model.base_url} if model is not None else {}
    return Orchestrator(
        store, WorkflowManager(workflows), Settings(workflows_path=workflows, **online, **settings)
    )


def assert_messages_are_their_deltas(records: list[Any]) -> None:
    """Every streamed message's deltas come before it, indexed 0, 1, 2, … and concatenate to its text."""
    for message in (r for r in records if r.type == "message.agent"):
        deltas = [
            r
            for r in records
            if r.type == "message.delta" and r.data["message_id"] == message.data["message_id"]
        ]
        assert all(
            d.seq < message.seq and d.agent == message.agent and d.visible == message.visible for d in deltas
        )
        assert [d.data["index"] for d in deltas] == list(range(len(deltas)))
        if deltas:
            assert "".join(d.data["text"] for d in deltas) == message.data["content"]


async def test_a_stream_cut_off_mid_answer_fails_the_run_and_keeps_what_was_said(
    store: MongoEventStore, solo: Path
) -> None:
    model = StreamingModel([text_reply("Half of an answer that never gets to its end", 10, cut_after=3)])
    try:
        # One try only: the cut is not retried, so the run fails on it (retries are the next test's).
        orchestrator = orchestrator_on(store, solo, model, llm_attempts=1)
        stream = await orchestrator.create_chat(workflow="Solo", user_id="u", app_id="a", message="hi")
        assert await orchestrator.run(stream) == "run.failed"
    finally:
        model.close()
    records = await records_of(store, stream.chat_id)
    deltas = [r for r in records if r.type == "message.delta"]
    assert "".join(d.data["text"] for d in deltas) == "".join(model.replies[0].chunks[:4])
    assert not [r for r in records if r.type == "message.agent"]  # incomplete: no message.agent
    call = next(r for r in records if r.type == "llm.call")
    assert "ended before its finish reason" in call.data["error"] and call.data["ttft_ms"] is not None
    assert call.data["status"] == "connection"
    assert records[-1].type == "run.failed" and records[-1].data["reason"] == "model"
    assert max(d.seq for d in deltas) < call.seq


async def test_a_stream_cut_off_mid_answer_is_retried_as_a_new_message(
    store: MongoEventStore, solo: Path
) -> None:
    cut = text_reply("Half of an answer that never gets to its end", 10, cut_after=3)
    whole = text_reply("A whole answer this time", 5)
    model = StreamingModel([cut, whole])
    try:
        orchestrator = orchestrator_on(store, solo, model, llm_backoff_s=0.05)
        stream = await orchestrator.create_chat(workflow="Solo", user_id="u", app_id="a", message="hi")
        assert await orchestrator.run(stream) == "run.completed"
    finally:
        model.close()
    records = await records_of(store, stream.chat_id)
    calls = [r for r in records if r.type == "llm.call"]
    assert [(c.data["status"], c.data["attempt"]) for c in calls[:2]] == [("connection", 1), ("ok", 2)]
    [message] = [r for r in records if r.type == "message.agent"]
    assert message.data["content"] == "".join(whole.chunks)
    first_try = [
        r for r in records if r.type == "message.delta" and r.data["message_id"] != message.data["message_id"]
    ]
    # The cut try keeps what it said, as a message of its own that never finishes.
    assert "".join(d.data["text"] for d in first_try) == "".join(cut.chunks[:4])
    assert_messages_are_their_deltas(records)


async def test_text_streamed_with_a_tool_call_becomes_a_message_before_the_call(
    store: MongoEventStore, tmp_path: Path
) -> None:
    workflows = solo_workflow(tmp_path, tool="text_statistics:tools.text_stats:text_statistics")
    model = StreamingModel(
        [
            Reply(
                chunks=["Let me ", "count them."],
                tool_calls=[ToolCall("call_1", "text_statistics", '{"text":"a b c"}')],
            ),
            Reply(chunks=["Three ", "words."]),
        ]
    )
    try:
        orchestrator = orchestrator_on(store, workflows, model)
        stream = await orchestrator.create_chat(
            workflow="Solo", user_id="u", app_id="a", message="Count: a b c"
        )
        assert await orchestrator.run(stream) == "run.completed"
    finally:
        model.close()
    records = await records_of(store, stream.chat_id)
    said = [(r.type, r.data.get("content")) for r in records if r.type in ("message.agent", "tool.called")]
    assert said == [
        ("message.agent", "Let me count them."),
        ("tool.called", None),
        ("message.agent", "Three words."),
    ]
    # The text goes to whom the call goes; the call is recorded once as AG2 sent it, its arguments
    # exactly as the model wrote them.
    before_call = next(r for r in records if r.type == "message.agent")
    assert before_call.data["recipient"] == "chat_manager"
    [call] = [r for r in records if r.type == "tool.called"]
    assert call.data["arguments"] == '{"text":"a b c"}'
    assert [r.data["name"] for r in records if r.type == "ag2.event" and r.seq < call.seq][-1] == "tool_call"
    # A streamed reply's record keeps AG2's own event of it.
    answer = [r for r in records if r.type == "message.agent"][-1]
    assert answer.ag2 is not None and json.loads(answer.ag2)["type"] == "text", answer
    assert_messages_are_their_deltas(records)


@pytest.mark.parametrize("name", ["Generator", "Analyzer"])
async def test_offline_fixtures_stream_word_by_word_at_the_configured_pace(
    store: MongoEventStore, name: str
) -> None:
    examples = Path(__file__).resolve().parent.parent / "workflows"
    # A 30 ms pace with a 0 ms flush window: each word that arrives on its own is a delta of its own.
    orchestrator = orchestrator_on(store, examples, offline_chunk_ms=30.0, stream_flush_ms=0.0)
    stream = await orchestrator.create_chat(
        workflow=name, user_id="u", app_id="a", message="Write about bees"
    )
    assert await asyncio.wait_for(orchestrator.run(stream), 120) == "run.completed"
    records = await records_of(store, stream.chat_id)
    assert_messages_are_their_deltas(records)
    messages = [r for r in records if r.type == "message.agent" and len(r.data["content"].split()) > 3]
    assert messages
    for message in messages:
        deltas = [
            r
            for r in records
            if r.type == "message.delta" and r.data["message_id"] == message.data["message_id"]
        ]
        assert len(deltas) > 1, f"{message.agent}'s message arrived in one piece"


def test_a_retried_call_starts_a_new_message_and_leaves_the_first_attempt_incomplete() -> None:
    from app.runs.clients import TextChunk
    from app.runs.recorder import RunMapper

    mapper = RunMapper(
        run_id="r", group_agents={"Writer"}, visual_agents=frozenset({"Writer"}), user_agent=None
    )
    assert mapper.map_chunk(TextChunk(agent="Writer", message_id="a1", text="Hel")) == []
    cut = mapper.map_chunk(TextChunk(agent="Writer", message_id="a2", text="Hello"))
    assert [(p.event.message_id, p.event.index, p.event.text) for p in cut] == [("a1", 0, "Hel")]  # type: ignore[union-attr]
    mapper.map_chunk(TextChunk(agent="Writer", message_id="a2", text=" world"))
    [delta] = mapper.flush()
    later = []  # each later flush is the message's next delta, numbered on
    for text in ("!", "?"):
        mapper.map_chunk(TextChunk(agent="Writer", message_id="a2", text=text))
        later += mapper.flush()
    final = mapper.complete("Writer", "what AG2 says", None, None)
    assert (delta.event.message_id, delta.event.index, delta.event.text) == ("a2", 0, "Hello world")  # type: ignore[union-attr]
    assert [(p.event.index, p.event.text) for p in later] == [(1, "!"), (2, "?")]  # type: ignore[union-attr]
    assert (final.event.message_id, final.event.content) == ("a2", "Hello world!?")  # type: ignore[union-attr]
    assert mapper.flush() == [] and not mapper.unflushed


def test_streaming_settings_come_from_the_environment_and_bad_values_name_the_variable() -> None:
    from app.settings import Settings, SettingsError

    assert (Settings.from_env({}).stream_flush_ms, Settings.from_env({}).offline_chunk_ms) == (50.0, 20.0)
    tuned = Settings.from_env({"MOZAIKS_STREAM_FLUSH_MS": "0", "MOZAIKS_OFFLINE_CHUNK_MS": "5"})
    assert (tuned.stream_flush_ms, tuned.offline_chunk_ms) == (0.0, 5.0)
    with pytest.raises(SettingsError, match="MOZAIKS_STREAM_FLUSH_MS='-1' must be zero or positive"):
        Settings.from_env({"MOZAIKS_STREAM_FLUSH_MS": "-1"})
    with pytest.raises(SettingsError, match="MOZAIKS_OFFLINE_CHUNK_MS='fast' is not a number"):
        Settings.from_env({"MOZAIKS_OFFLINE_CHUNK_MS": "fast"})


def streamed_messages(records: list[Any]) -> list[tuple[str, str]]:
    """Each `message.agent` as (its id, its text), after checking it is exactly its own deltas."""
    assert_messages_are_their_deltas(records)
    messages = [r for r in records if r.type == "message.agent"]
    ids = [m.data["message_id"] for m in messages]
    assert len(set(ids)) == len(ids), f"a message id is used twice: {ids}"
    deltas = {r.data["message_id"] for r in records if r.type == "message.delta"}
    assert deltas == set(ids), "every streamed message, and nothing else, has deltas"
    return [(m.data["message_id"], m.data["content"]) for m in messages]


async def test_one_agents_replies_in_a_row_each_get_a_new_message_id_and_only_their_own_text(
    store: MongoEventStore, tmp_path: Path
) -> None:
    # The agent keeps the floor (after_work "stay") for ten turns: replies with text and a call, a
    # call alone, text alone, each after the other, the last two text alone in a row.
    workflows = solo_workflow(tmp_path, tool="text_statistics:tools.text_stats:text_statistics")
    agents = json.loads((workflows / "Solo" / "agents.json").read_text())
    agents["agents"][0]["handoffs"] = {"after_work": "stay"}
    (workflows / "Solo" / "agents.json").write_text(json.dumps(agents))
    spec = json.loads((workflows / "Solo" / "workflow.json").read_text())
    (workflows / "Solo" / "workflow.json").write_text(json.dumps({**spec, "max_turns": 10}))
    count = '{"text": "a b c"}'
    model = StreamingModel(
        [
            Reply(chunks=["Let me ", "count."], tool_calls=[ToolCall("call_1", "text_statistics", count)]),
            Reply(tool_calls=[ToolCall("call_2", "text_statistics", count)]),
            text_reply("Counted.", 3),
            Reply(tool_calls=[ToolCall("call_3", "text_statistics", count)]),
            text_reply("Three words.", 3),
            text_reply("Still three.", 3),
        ]
    )
    try:
        orchestrator = orchestrator_on(store, workflows, model)
        stream = await orchestrator.create_chat(workflow="Solo", user_id="u", app_id="a", message="Count")
        assert await orchestrator.run(stream) == "run.completed"
    finally:
        model.close()
    records = await records_of(store, stream.chat_id)
    said = [text for _, text in streamed_messages(records)]
    assert said == ["Let me count.", "Counted.", "Three words.", "Still three."]
    assert [r.type for r in records].count("tool.called") == 3
