"""AG-UI endpoint over real HTTP: runs of the example workflows, continuing threads, interrupts and
resume, reconnects with Last-Event-ID, errors, auth and CORS. Every SSE event any test here reads is
parsed back through the official `ag-ui-protocol` models (unknown fields rejected)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import httpx
import msgspec
import pytest
from ag_ui.core import PROTOCOL_VERSION, Event, ResumeEntry, RunAgentInput
from pydantic import BaseModel, TypeAdapter

from app.http.agui import RunTranslator, _answer_text, _new_turn
from app.http.auth import issue_token
from app.http.errors import Refused
from app.settings import Settings, SettingsError
from domain.events import (
    ChatCreated,
    ContextUpdated,
    Handoff,
    MessageAgent,
    MessageUser,
    Pending,
    Record,
    RunCompleted,
    RunFailed,
    RunStarted,
    RunStopped,
    SpeakerSelected,
    StreamRef,
    ToolCalled,
    ToolResult,
)
from domain.store import MongoEventStore

EVENT: TypeAdapter[Any] = TypeAdapter(Event)


def assert_no_unknown_fields(model: Any, where: str = "event") -> None:
    """The package's models keep unknown fields instead of rejecting them: check none were sent."""
    if isinstance(model, BaseModel):
        assert not model.model_extra, f"{where}: fields outside AG-UI: {sorted(model.model_extra)}"
        for name in type(model).model_fields:
            assert_no_unknown_fields(getattr(model, name), f"{where}.{name}")
    elif isinstance(model, list):
        for i, item in enumerate(model):
            assert_no_unknown_fields(item, f"{where}[{i}]")


def validated(data: str) -> dict[str, Any]:
    """One SSE event's JSON, after it parsed as an AG-UI event of the official package."""
    model = EVENT.validate_json(data)
    assert_no_unknown_fields(model, str(model.type.value))
    event: dict[str, Any] = json.loads(data)
    return event


class Sse(NamedTuple):
    id: str
    event: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.event["type"])


async def read_sse(response: httpx.Response, limit: int | None = None) -> list[Sse]:
    """The SSE events of a response (comments skipped), each validated; stops after `limit`."""
    got: list[Sse] = []
    event_id, data = "", []
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            got.append(Sse(event_id, validated("\n".join(data))))
            event_id, data = "", []
            if limit is not None and len(got) >= limit:
                break
    return got


def body(thread: str, *messages: tuple[str, str], run: str = "r", **extra: Any) -> dict[str, Any]:
    """A RunAgentInput (checked against the package's model) with user messages (id, text)."""
    payload = {
        "threadId": thread,
        "runId": run,
        "messages": [{"id": mid, "role": "user", "content": text} for mid, text in messages],
        **extra,
    }
    RunAgentInput.model_validate(payload)
    return payload


async def run(
    http: httpx.AsyncClient,
    workflow: str,
    payload: dict[str, Any],
    *,
    last_event_id: str | None = None,
    limit: int | None = None,
) -> list[Sse]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with asyncio.timeout(90):
        async with http.stream("POST", f"/ag-ui/{workflow}", json=payload, headers=headers) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            assert response.headers["content-type"].startswith("text/event-stream")
            return await read_sse(response, limit)


def types(events: list[Sse]) -> list[str]:
    return [e.type for e in events]


def position(event_id: str) -> tuple[int, float]:
    seq, _, index = event_id.partition(".")
    return int(seq), int(index) if index else float("inf")


def assert_well_formed(events: list[Sse]) -> None:
    """AG-UI's order rules as a test sees them, and strictly increasing SSE ids."""
    assert events[0].type == "RUN_STARTED"
    assert events[-1].type in ("RUN_FINISHED", "RUN_ERROR")
    positions = [position(e.id) for e in events]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    step = None
    open_messages: set[str] = set()
    for e in events:
        match e.type:
            case "STEP_STARTED":
                assert step is None, f"step {e.event['stepName']} started inside {step}"
                step = e.event["stepName"]
            case "STEP_FINISHED":
                assert step == e.event["stepName"]
                step = None
            case "TEXT_MESSAGE_START":
                open_messages.add(e.event["messageId"])
            case "TEXT_MESSAGE_END":
                open_messages.remove(e.event["messageId"])
    assert step is None and not open_messages


def texts(events: list[Sse]) -> list[tuple[str | None, str, str]]:
    """The text messages a client assembles from the events: (name, role, text)."""
    started: dict[str, list[Any]] = {}
    order: list[str] = []
    for e in events:
        if e.type == "TEXT_MESSAGE_START":
            started[e.event["messageId"]] = [e.event.get("name"), e.event.get("role", "assistant"), ""]
            order.append(e.event["messageId"])
        elif e.type == "TEXT_MESSAGE_CONTENT":
            started[e.event["messageId"]][2] += e.event["delta"]
    return [tuple(started[m]) for m in order]  # type: ignore[misc]


async def test_a_new_thread_starts_a_chat_and_streams_its_visible_log(
    start_node, store: MongoEventStore
) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=node.url) as http:
        events = await run(
            http, "Analyzer", body("t-new", ("m1", "Count these words"), state={"topic": "bees"})
        )
    assert_well_formed(events)
    assert types(events)[:2] == ["RUN_STARTED", "STATE_SNAPSHOT"]
    assert "MESSAGES_SNAPSHOT" not in types(events)  # a new chat: the client already holds its message
    assert events[0].event["threadId"] == "t-new" and events[0].event["runId"] == "r"
    assert events[1].event["snapshot"] == {"topic": "bees", "last_word_count": None}
    assert events[-1].type == "RUN_FINISHED" and events[-1].event["outcome"] == {"type": "success"}
    log = [r async for r in store.read("t-new")]
    assert [r.type for r in log[:2]] == ["chat.created", "message.user"]
    assert log[1].data["message_id"] == "m1" and log[0].data["context"]["topic"] == "bees"
    visible = [r for r in log if r.visible]
    assert texts(events) == [
        (r.agent, "assistant", r.data["content"]) for r in visible if r.type == "message.agent"
    ]
    assert {e.event["stepName"] for e in events if e.type == "STEP_STARTED"} == {"Analyst", "Summarizer"}
    assert "Collector" not in json.dumps([e.event for e in events])  # hidden agent: recorded, never sent
    calls = [e.event["toolCallId"] for e in events if e.type == "TOOL_CALL_START"]
    assert calls == [r.data["call_id"] for r in visible if r.type == "tool.called"]
    results = [e.event["content"] for e in events if e.type == "TOOL_CALL_RESULT"]
    assert results == [r.data["content"] for r in visible if r.type == "tool.result"]
    deltas = [op for e in events if e.type == "STATE_DELTA" for op in e.event["delta"]]
    updated = [r.data["variables"] for r in visible if r.type == "context.updated"]
    assert deltas and [{op["path"][1:]: op["value"]} for op in deltas] == updated
    assert all(int(position(e.id)[0]) in {r.seq for r in visible} for e in events)


async def test_a_known_thread_continues_the_chat_and_a_repeated_request_records_nothing(
    start_node, store: MongoEventStore
) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=node.url) as http:
        # Another thread before it in the log: a snapshot holds this thread's history only.
        await run(http, "Analyzer", body("t-one", ("m0", "Some other words")))
        first = await run(http, "Analyzer", body("t-two", ("m1", "Count these words")))
        second_body = body("t-two", ("m1", "Count these words"), ("m2", "And these"), run="r2")
        second = await run(http, "Analyzer", second_body)
        log_before = [r.id async for r in store.read("t-two")]
        again = await run(http, "Analyzer", second_body)
    assert_well_formed(second)
    assert types(second)[:3] == ["RUN_STARTED", "STATE_SNAPSHOT", "MESSAGES_SNAPSHOT"]
    snapshot = second[2].event["messages"]
    assert snapshot[0] == {"id": "m1", "role": "user", "content": "Count these words"}
    assert [m.get("content") for m in snapshot if m["role"] == "assistant" and m.get("content")] == [
        text for _, _, text in texts(first)
    ]
    assert texts(second)[0] == (None, "user", "And these")
    assert next(e.event["messageId"] for e in second if e.type == "TEXT_MESSAGE_START") == "m2"
    assert second[-1].type == "RUN_FINISHED"
    assert [r.data.get("message_id") async for r in store.find("t-two", types=["message.user"])] == [
        "m1",
        "m2",
    ]
    assert again == second  # the same run again, from the log
    assert [r.id async for r in store.read("t-two")] == log_before


async def test_an_input_request_ends_the_run_with_an_interrupt_that_resume_answers(
    start_node, store: MongoEventStore
) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=node.url) as http:
        first = await run(http, "Assistant", body("t-ask", ("m1", "Find bees")))
        assert_well_formed(first)
        outcome = first[-1].event["outcome"]
        assert first[-1].type == "RUN_FINISHED" and outcome["type"] == "interrupt"
        [interrupt] = outcome["interrupts"]
        asked = [r async for r in store.find("t-ask", types=["input.requested"])]
        assert interrupt["id"] == asked[-1].data["request_id"] and interrupt["reason"] == "input_required"
        unknown = await http.post(
            "/ag-ui/Assistant",
            json=body("t-ask", ("m1", "Find bees"), resume=[{"interruptId": "nope", "status": "resolved"}]),
        )
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_interrupt"
        not_an_answer = await http.post(
            "/ag-ui/Assistant", json=body("t-ask", ("m1", "Find bees"), ("m2", "hello?"))
        )
        assert not_an_answer.status_code == 409 and not_an_answer.json()["error"] == "interrupt_pending"
        assert interrupt["id"] in not_an_answer.json()["detail"]
        answers = iter(["yes, go on", "exit", "exit", "exit"])
        runs = [first]
        while runs[-1][-1].event.get("outcome", {}).get("type") == "interrupt":
            [pending] = runs[-1][-1].event["outcome"]["interrupts"]
            resume = [{"interruptId": pending["id"], "status": "resolved", "payload": next(answers)}]
            runs.append(
                await run(
                    http, "Assistant", body("t-ask", ("m1", "Find bees"), run=f"r{len(runs)}", resume=resume)
                )
            )
            assert_well_formed(runs[-1])
            assert types(runs[-1])[:3] == ["RUN_STARTED", "STATE_SNAPSHOT", "MESSAGES_SNAPSHOT"]
    assert runs[-1][-1].event["outcome"] == {"type": "success"}
    async with httpx.AsyncClient(base_url=node.url) as http:
        asking = await run(
            http, "Assistant", body("t-ask", ("m1", "Find bees"), ("m9", "More bees"), run="again")
        )
        [pending] = asking[-1].event["outcome"]["interrupts"]
        cancel = [{"interruptId": pending["id"], "status": "cancelled"}]
        cancelled = await run(
            http, "Assistant", body("t-ask", ("m1", "Find bees"), ("m9", "More bees"), resume=cancel)
        )
    assert_well_formed(cancelled)
    assert cancelled[-1].event["outcome"] == {"type": "cancelled"}
    assert [r.type async for r in store.find("t-ask", types=["run.stopped"])] == ["run.stopped"]
    received = [r async for r in store.find("t-ask", types=["input.received"])]
    assert [r.data["text"] for r in received] == ["yes, go on", "exit", "exit", "exit"][: len(received)]
    assert received[0].data["request_id"] == interrupt["id"]


def stream_of(chat_id: str) -> StreamRef:
    return StreamRef(chat_id=chat_id, app_id="local", user_id="local", workflow="Analyzer")


def a_turn_of(agent: str, n: int) -> list[Pending]:
    """One agent's turn: chosen, a tool call and its result, a context change, two messages, a handoff."""
    call = f"call-{agent}-{n}"
    return [
        Pending(event=SpeakerSelected(speaker=agent), agent=agent),
        Pending(event=ToolCalled(tool="lookup", call_id=call, arguments=json.dumps({"n": n})), agent=agent),
        Pending(event=ToolResult(tool="lookup", call_id=call, content=f"found {n}"), agent=agent),
        Pending(event=ContextUpdated(variables={"n": n, "a/b": [n]})),
        Pending(event=MessageAgent(content=f"{agent} says {n}"), agent=agent),
        Pending(event=MessageAgent(content=f"hidden {n}"), agent="Collector", visible=False),
        Pending(event=MessageAgent(content=f"{agent} adds {n}"), agent=agent),
        Pending(event=Handoff(source=agent, target="Summarizer"), agent=agent),
    ]


async def test_reconnecting_with_last_event_id_mid_run_ends_with_the_same_events_as_an_unbroken_stream(
    start_node, store: MongoEventStore, db: Any
) -> None:
    # The run below is written by the test, standing in for a node that holds the chat's live lease
    # (without one, the nodes' sweep would rightly record the run as interrupted).
    expires = datetime.now(UTC) + timedelta(hours=1)
    await db["chat_leases"].insert_one(
        {"_id": "t-re", "owner": "elsewhere", "run_id": "run1", "expires_at": expires}
    )
    node = await start_node()
    chat = stream_of("t-re")
    await store.append(
        chat,
        [
            Pending(event=ChatCreated(context={"n": 0})),
            Pending(event=MessageUser(content="go", message_id="m1")),
            Pending(event=RunStarted(pattern="RoundRobin", max_turns=8), run_id="run1"),
            *a_turn_of("Analyst", 1),
        ],
        0,
    )
    other_node = await start_node()  # any node serves any thread's stream
    payload = body("t-re", ("m1", "go"))
    async with (
        httpx.AsyncClient(base_url=node.url) as http,
        httpx.AsyncClient(base_url=other_node.url) as other,
    ):
        unbroken = asyncio.create_task(run(http, "Analyzer", payload))
        pieces = [
            await run(http, "Analyzer", payload, limit=6)
        ]  # disconnects in the middle of a record's events
        assert "." in pieces[0][-1].id
        await store.append(chat, a_turn_of("Summarizer", 2), None)  # the run goes on while the client is away
        pieces.append(await run(other, "Analyzer", payload, last_event_id=pieces[-1][-1].id, limit=12))
        await store.append(
            chat, [*a_turn_of("Analyst", 3), Pending(event=RunCompleted(summary="done"))], None
        )
        pieces.append(await run(http, "Analyzer", payload, last_event_id=pieces[-1][-1].id))
        whole = await unbroken
    joined = [e for piece in pieces for e in piece]
    assert joined == whole
    assert_well_formed(whole)
    assert whole[-1].event["result"] == "done"
    assert [t for _, _, t in texts(whole)] == [
        f"{a} {v} {n}"
        for a, n in (("Analyst", 1), ("Summarizer", 2), ("Analyst", 3))
        for v in ("says", "adds")
    ]
    assert [e.event["stepName"] for e in whole if e.type == "STEP_STARTED"] == [
        "Analyst",
        "Summarizer",
        "Analyst",
    ]
    customs = [e.event["name"] for e in whole if e.type == "CUSTOM"]
    assert customs == ["speaker.selected", "handoff"] * 3
    assert {"op": "add", "path": "/a~1b", "value": [2]} in [
        op for e in whole if e.type == "STATE_DELTA" for op in e.event["delta"]
    ]


@pytest.mark.parametrize(
    ("terminal", "last"),
    [
        (
            RunFailed(error="model unreachable", reason="model"),
            {"type": "RUN_ERROR", "message": "model unreachable", "code": "model"},
        ),
        (
            RunStopped(by="local"),
            {"type": "RUN_FINISHED", "threadId": "t-end", "runId": "r", "outcome": {"type": "cancelled"}},
        ),
    ],
)
async def test_a_failed_run_is_a_run_error_and_a_stopped_one_is_cancelled(
    start_node, store: MongoEventStore, terminal: Any, last: dict[str, Any]
) -> None:
    node = await start_node()
    await store.append(
        stream_of("t-end"),
        [
            Pending(event=ChatCreated()),
            Pending(event=MessageUser(content="go", message_id="m1")),
            Pending(event=MessageAgent(content="working"), agent="Analyst"),
            Pending(event=terminal),
        ],
        0,
    )
    async with httpx.AsyncClient(base_url=node.url) as http:
        events = await run(http, "Analyzer", body("t-end", ("m1", "go")))
    assert_well_formed(events)
    assert types(events)[-2] == "STEP_FINISHED"
    assert {k: v for k, v in events[-1].event.items() if k != "timestamp"} == last


def record(seq: int, type_: str, data: dict[str, Any], agent: str | None = "Analyst") -> Record:
    return Record(
        id=f"id{seq}",
        chat_id="c",
        seq=seq,
        type=type_,
        ts=datetime(2026, 1, 1, tzinfo=UTC),
        app_id="a",
        user_id="u",
        workflow="Analyzer",
        run_id="run",
        agent=agent,
        visible=True,
        data=data,
        prev_hash="",
        hash="",
    )


def test_streamed_deltas_become_content_events_and_the_final_message_only_closes_them() -> None:
    translator = RunTranslator("c", "r")
    events = translator.start([record(1, "message.user", {"content": "hi", "message_id": "u1"}, agent=None)])
    for seq, text in ((2, "Hel"), (3, "lo "), (4, "world")):
        events += translator.translate(
            record(seq, "message.delta", {"message_id": "m", "index": seq - 2, "text": text})
        )
    events += translator.translate(record(5, "message.agent", {"content": "Hello world", "message_id": "m"}))
    events += translator.translate(record(6, "message.agent", {"content": "not streamed"}))
    events += translator.translate(
        record(7, "message.delta", {"message_id": "m2", "index": 0, "text": "cut sh"})
    )
    events += translator.translate(record(8, "run.stopped", {"by": "u"}, agent=None))
    wire = [validated(e.model_dump_json(by_alias=True)) for e in events]
    at = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    assert all(e.get("timestamp") == at for e in wire), [e for e in wire if e.get("timestamp") != at]
    assert [e["type"] for e in wire] == [
        "RUN_STARTED", "STATE_SNAPSHOT", "STEP_STARTED",
        "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END",
        "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END", "STEP_FINISHED", "RUN_FINISHED",
    ]  # fmt: skip
    assert [e["delta"] for e in wire if e["type"] == "TEXT_MESSAGE_CONTENT"] == [
        "Hel",
        "lo ",
        "world",
        "not streamed",
        "cut sh",
    ]
    assert wire[7]["messageId"] == "m" and wire[8]["messageId"] == "id6" and wire[-3]["messageId"] == "m2"
    assert translator.translate(record(9, "message.agent", {"content": "after the end"})) == []


def test_each_message_event_names_its_role_agent_and_time_and_a_final_text_sends_only_what_was_not_streamed() -> (
    None
):
    translator = RunTranslator("c", "r")
    events = translator.start([record(1, "message.user", {"content": "hi", "message_id": "u1"}, agent=None)])
    events += translator.translate(
        record(2, "message.user", {"content": "more", "message_id": "u2"}, agent=None)
    )
    for seq, message_id, text in ((3, "m", "Hel"), (4, "m", "lo"), (6, "n", "abc")):
        events += translator.translate(
            record(seq, "message.delta", {"message_id": message_id, "index": 0, "text": text})
        )
        if seq == 4:  # the final text goes on past what was streamed: only the rest is sent
            events += translator.translate(
                record(5, "message.agent", {"content": "Hello world", "message_id": "m"})
            )
    # A final text that is not the streamed one's continuation adds nothing to what the client shows.
    events += translator.translate(record(7, "message.agent", {"content": "xyzw", "message_id": "n"}))
    events += translator.translate(record(8, "message.agent", {"content": "plain", "message_id": "p"}))
    wire = [validated(e.model_dump_json(by_alias=True)) for e in events]
    at = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    assert all(e.get("timestamp") == at for e in wire), [e for e in wire if e.get("timestamp") != at]
    messages = [
        (
            e["type"].removeprefix("TEXT_MESSAGE_"),
            e["messageId"],
            e.get("role"),
            e.get("name"),
            e.get("delta"),
        )
        for e in wire
        if e["type"].startswith("TEXT_MESSAGE_")
    ]
    assert messages == [
        ("START", "u2", "user", None, None),
        ("CONTENT", "u2", None, None, "more"),
        ("END", "u2", None, None, None),
        ("START", "m", "assistant", "Analyst", None),
        ("CONTENT", "m", None, None, "Hel"),
        ("CONTENT", "m", None, None, "lo"),
        ("CONTENT", "m", None, None, " world"),
        ("END", "m", None, None, None),
        ("START", "n", "assistant", "Analyst", None),
        ("CONTENT", "n", None, None, "abc"),
        ("END", "n", None, None, None),
        ("START", "p", "assistant", "Analyst", None),
        ("CONTENT", "p", None, None, "plain"),
        ("END", "p", None, None, None),
    ]


def test_tool_calls_context_custom_records_ui_requests_and_each_run_end_become_their_agui_events() -> None:
    at = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    translator = RunTranslator("c", "r")
    form = {
        "request_id": "q1", "tool_call_id": "c8", "tool": "ask", "component": "form", "mode": "inline",
        "props": {"title": "Your details", "schema": {"type": "object"}}, "expires_at": "2026-01-01T00:05:00Z",
    }  # fmt: skip
    confirm = {
        "request_id": "q2",
        "tool_call_id": "",
        "tool": "ok",
        "component": "confirm",
        "props": {"question": "Go?"},
    }
    choice = {
        "request_id": "q3", "tool_call_id": "c9", "tool": "pick", "component": "choice", "props": {"options": ["a", "b"]},
    }  # fmt: skip
    answered = {"request_id": "q4", "tool_call_id": "c10", "tool": "ok", "component": "confirm", "props": {}}
    artifact = {
        "request_id": "q0",
        "tool_call_id": "c7",
        "tool": "show",
        "component": "artifact",
        "props": {},
    }
    records = [
        record(1, "tool.called", {"tool": "lookup", "call_id": "c1", "arguments": '{"n": 1}'}),
        record(2, "tool.called", {"tool": "ping", "call_id": "", "arguments": ""}),  # no id: the record's
        record(3, "tool.result", {"tool": "lookup", "call_id": "c1", "content": "found"}),
        record(4, "context.updated", {"variables": {"a/b": 1, "t~": 2}}, agent=None),
        record(5, "context.updated", {"variables": {}}, agent=None),
        record(6, "handoff", {"source": "Analyst", "target": "Summarizer"}),
        record(7, "ui.requested", artifact, agent="Summarizer"),
        *(
            record(8 + i, "ui.requested", data, agent="Summarizer")
            for i, data in enumerate((form, confirm, choice, answered))
        ),
        # The run waits on three of them (the last was answered meanwhile).
        record(12, "run.suspended", {"request_ids": ["q1", "q2", "q3"]}, agent=None),
        record(13, "message.agent", {"content": "after the end"}),
    ]
    wire = [validated(e.model_dump_json(by_alias=True)) for r in records for e in translator.translate(r)]
    call = {"timestamp": at, "toolCallId": "c1"}
    assert wire == [
        {"type": "STEP_STARTED", "timestamp": at, "stepName": "Analyst"},
        {"type": "TOOL_CALL_START", **call, "toolCallName": "lookup", "parentMessageId": "id1"},
        {"type": "TOOL_CALL_ARGS", **call, "delta": '{"n": 1}'},
        {"type": "TOOL_CALL_END", **call},
        {"type": "TOOL_CALL_START", "timestamp": at, "toolCallId": "id2", "toolCallName": "ping", "parentMessageId": "id2"},
        {"type": "TOOL_CALL_END", "timestamp": at, "toolCallId": "id2"},
        {"type": "TOOL_CALL_RESULT", **call, "messageId": "id3", "content": "found", "role": "tool"},
        {"type": "STATE_DELTA", "timestamp": at, "delta": [
            {"op": "add", "path": "/a~1b", "value": 1}, {"op": "add", "path": "/t~0", "value": 2}
        ]},
        {"type": "CUSTOM", "timestamp": at, "name": "handoff", "value": {"source": "Analyst", "target": "Summarizer", "agent": "Analyst"}},
        {"type": "CUSTOM", "timestamp": at, "name": "ui.requested", "value": {**artifact, "agent": "Summarizer"}},
        {"type": "STEP_FINISHED", "timestamp": at, "stepName": "Analyst"},
        {"type": "RUN_FINISHED", "timestamp": at, "threadId": "c", "runId": "r", "outcome": {"type": "interrupt", "interrupts": [
            {"id": "q1", "reason": "ui_required", "message": "Your details", "toolCallId": "c8", "responseSchema": {"type": "object"},
             "expiresAt": "2026-01-01T00:05:00Z", "metadata": {"component": "form", "mode": "inline", "tool": "ask"}},
            {"id": "q2", "reason": "ui_required", "message": "Go?", "responseSchema": {"type": "boolean"},
             "metadata": {"component": "confirm", "mode": None, "tool": "ok"}},
            {"id": "q3", "reason": "ui_required", "toolCallId": "c9", "responseSchema": {"type": "string", "enum": ["a", "b"]},
             "metadata": {"component": "choice", "mode": None, "tool": "pick"}},
        ]}},
    ]  # fmt: skip
    # Each other end of a run, after a step: the step closes, then the run's last event.
    ends = {
        "input.requested": ({"request_id": "i1", "prompt": "Your name?"}, {"type": "RUN_FINISHED", "threadId": "c", "runId": "r", "outcome": {
            "type": "interrupt", "interrupts": [{"id": "i1", "reason": "input_required", "message": "Your name?", "responseSchema": {"type": "string"}}]}}),
        "run.completed": ({"summary": "done"}, {"type": "RUN_FINISHED", "threadId": "c", "runId": "r", "result": "done", "outcome": {"type": "success"}}),
        "run.stopped": ({"by": "u"}, {"type": "RUN_FINISHED", "threadId": "c", "runId": "r", "outcome": {"type": "cancelled"}}),
        "run.failed": ({"error": "model down", "reason": "model"}, {"type": "RUN_ERROR", "message": "model down", "code": "model"}),
    }  # fmt: skip
    for type_, (data, last) in ends.items():
        translator = RunTranslator("c", "r")
        translator.translate(record(1, "tool.result", {"tool": "x", "call_id": "c", "content": ""}))
        wire = [
            validated(e.model_dump_json(by_alias=True))
            for e in translator.translate(record(2, type_, data, agent=None))
        ]
        assert wire == [
            {"type": "STEP_FINISHED", "timestamp": at, "stepName": "Analyst"},
            {**last, "timestamp": at},
        ], type_


def test_a_continuing_turn_starts_with_the_chats_state_and_a_snapshot_of_each_agent_message_and_tool_call_with_its_results() -> (
    None
):
    history = [
        record(1, "chat.created", {"context": {"topic": "bees", "n": 1}}, agent=None),
        record(2, "message.user", {"content": "hi", "message_id": "u1"}, agent=None),
        record(3, "tool.called", {"tool": "lookup", "call_id": "c1", "arguments": '{"n": 1}'}),
        record(4, "tool.called", {"tool": "ping", "call_id": "c2", "arguments": ""}),
        record(5, "message.agent", {"content": "Looking", "message_id": "m1"}),
        record(6, "tool.result", {"tool": "lookup", "call_id": "c1", "content": "found"}),
        record(7, "tool.result", {"tool": "ping", "call_id": "c2", "content": "pong"}),
        record(8, "context.updated", {"variables": {"n": 2}}, agent=None),
        msgspec.structs.replace(
            record(8, "context.updated", {"variables": {"n": 3}}, agent=None), visible=False
        ),
        record(9, "message.agent", {"content": "Bees", "message_id": "m2"}, agent="Summarizer"),
        # A result whose call the history does not show: the snapshot files it last.
        record(10, "tool.result", {"tool": "fetch", "call_id": "c9", "content": "late"}),
        record(11, "tool.result", {"tool": "lookup", "call_id": "c1", "content": "again"}),  # after the first
        record(12, "message.user", {"content": "more", "message_id": "u2"}, agent=None),
    ]
    wire = [validated(e.model_dump_json(by_alias=True)) for e in RunTranslator("c", "r").start(history)]
    assert [e["type"] for e in wire][:3] == ["RUN_STARTED", "STATE_SNAPSHOT", "MESSAGES_SNAPSHOT"]
    assert wire[0]["protocolVersion"] == PROTOCOL_VERSION
    at = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    assert all(e.get("timestamp") == at for e in wire), [e for e in wire if e.get("timestamp") != at]
    assert wire[1]["snapshot"] == {"topic": "bees", "n": 2}
    # Each tool result right after the message holding its call (or last); each agent message with its agent.
    assert wire[2]["messages"] == [
        {"id": "u1", "role": "user", "content": "hi"},
        {"id": "id3", "role": "assistant", "toolCalls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"n": 1}'}}]},
        {"id": "id6", "role": "tool", "content": "found", "toolCallId": "c1"},
        {"id": "id11", "role": "tool", "content": "again", "toolCallId": "c1"},
        {"id": "id4", "role": "assistant", "toolCalls": [
            {"id": "c2", "type": "function", "function": {"name": "ping", "arguments": ""}}]},
        {"id": "id7", "role": "tool", "content": "pong", "toolCallId": "c2"},
        {"id": "m1", "role": "assistant", "name": "Analyst", "content": "Looking"},
        {"id": "m2", "role": "assistant", "name": "Summarizer", "content": "Bees"},
        {"id": "id10", "role": "tool", "content": "late", "toolCallId": "c9"},
    ]  # fmt: skip
    assert [e["messageId"] for e in wire[3:]] == ["u2"] * 3  # then the new turn, as its own message
    # A run that starts at the input request a resume answers: the whole history as the snapshot.
    asked = record(13, "input.requested", {"request_id": "i1", "prompt": "Name?"})
    resumed = [
        validated(e.model_dump_json(by_alias=True))
        for e in RunTranslator("c", "r").start([*history[:-1], asked])
    ]
    assert [e["type"] for e in resumed] == ["RUN_STARTED", "STATE_SNAPSHOT", "MESSAGES_SNAPSHOT"]
    assert all(e["timestamp"] == at for e in resumed) and resumed[2]["messages"] == wire[2]["messages"]


def test_the_new_turn_is_the_last_user_messages_text_parts_joined_and_one_with_no_text_is_refused() -> None:
    def turn(*messages: dict[str, Any]) -> tuple[str, str]:
        return _new_turn(RunAgentInput.model_validate(body("t", messages=list(messages))))

    image = {"type": "image", "source": {"type": "url", "value": "https://example.com/a.png"}}
    parts = [{"type": "text", "text": "h"}, image, {"type": "text", "text": "i"}]
    assert turn(
        {"id": "m1", "role": "user", "content": "old"},
        {"id": "m2", "role": "user", "content": parts},
        {"id": "a1", "role": "assistant", "content": "ok"},
    ) == ("m2", "hi")
    for last in ("  ", [image]):
        with pytest.raises(Refused) as refused:
            turn({"id": "m1", "role": "user", "content": "hi"}, {"id": "m3", "role": "user", "content": last})
        assert (refused.value.status, refused.value.code) == (400, "bad_request")
        assert "m3" in refused.value.detail


def test_a_resume_payload_answers_with_its_text_its_text_field_or_else_its_json() -> None:
    def answer(payload: Any) -> str:
        return _answer_text(ResumeEntry(interrupt_id="i1", status="resolved", payload=payload))

    assert [answer("yes"), answer({"text": "go on"}), answer({"ok": True}), answer({"text": 3})] == [
        "yes",
        "go on",
        '{"ok": true}',
        '{"text": 3}',
    ]


async def test_errors_have_one_shape_and_users_reach_only_their_own_threads(
    start_node, store: MongoEventStore
) -> None:
    secret = "s" * 32
    node = await start_node(auth_secret=secret)
    alice = {"Authorization": f"Bearer {issue_token(secret, 'alice', 'app1', ['user'])}"}
    bob = {"Authorization": f"Bearer {issue_token(secret, 'bob', 'app1', ['user'])}"}
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        anonymous = await http.post("/ag-ui/Analyzer", json=body("t-auth", ("m1", "hi")))
        assert anonymous.status_code == 401, anonymous.text
        assert anonymous.json()["error"] == "unauthorized"
        async with http.stream(
            "POST", "/ag-ui/Analyzer", json=body("t-auth", ("m1", "hi")), headers=alice
        ) as response:
            assert response.status_code == 200
            assert (await read_sse(response))[-1].type == "RUN_FINISHED"
        refusals = {
            "bob on alice's thread": (
                await http.post("/ag-ui/Analyzer", json=body("t-auth", ("m2", "mine?")), headers=bob),
                403,
                "forbidden",
            ),
            "other workflow": (
                await http.post("/ag-ui/Generator", json=body("t-auth", ("m3", "x")), headers=alice),
                409,
                "wrong_workflow",
            ),
            "unknown workflow": (
                await http.post("/ag-ui/Nope", json=body("t-x", ("m1", "x")), headers=alice),
                404,
                "unknown_workflow",
            ),
            "resume on a thread that does not exist": (
                await http.post(
                    "/ag-ui/Analyzer",
                    json=body("t-z", resume=[{"interruptId": "i1", "status": "resolved", "payload": "x"}]),
                    headers=alice,
                ),
                404,
                "unknown_chat",
            ),
            "a new thread's state not an object": (
                await http.post("/ag-ui/Analyzer", json=body("t-s", ("m1", "hi"), state=[1]), headers=alice),
                400,
                "bad_request",
            ),
            "no user message": (
                await http.post("/ag-ui/Analyzer", json=body("t-y"), headers=alice),
                400,
                "bad_request",
            ),
            "not RunAgentInput": (
                await http.post("/ag-ui/Analyzer", json={"threadId": 3}, headers=alice),
                400,
                "bad_request",
            ),
            "not JSON": (
                await http.post("/ag-ui/Analyzer", content=b"{nope", headers=alice),
                400,
                "bad_request",
            ),
            "bad Last-Event-ID": (
                await http.post(
                    "/ag-ui/Analyzer",
                    json=body("t-auth", ("m1", "hi")),
                    headers={**alice, "Last-Event-ID": "x"},
                ),
                400,
                "bad_request",
            ),
        }
    for what, (response, status, code) in refusals.items():
        assert response.status_code == status, what
        assert response.json()["error"] == code and response.json()["detail"], what
    fields = refusals["not RunAgentInput"][0].json()["fields"]
    assert {f["name"] for f in fields} >= {"threadId", "runId", "messages"}
    assert [r.user_id async for r in store.read("t-auth", limit=1)] == ["alice"]
    assert [r async for r in store.read("t-x")] == []


async def test_cors_is_closed_by_default_and_opened_by_the_allow_list(start_node) -> None:
    closed = await start_node()
    opened = await start_node(cors_origins=("http://app.example",))
    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,last-event-id",
    }
    async with httpx.AsyncClient() as http:
        for path in ("/ag-ui/Analyzer", "/api/chats"):
            allowed = await http.options(opened.url + path, headers=preflight)
            assert allowed.status_code in (200, 204), path
            assert allowed.headers["access-control-allow-origin"] == "http://app.example"
            assert "POST" in allowed.headers["access-control-allow-methods"]
            other = await http.options(
                opened.url + path, headers={**preflight, "Origin": "http://evil.example"}
            )
            assert other.headers.get("access-control-allow-origin") is None
            shut = await http.options(closed.url + path, headers=preflight)
            assert shut.headers.get("access-control-allow-origin") is None
        listed = await http.get(opened.url + "/api/workflows", headers={"Origin": "http://app.example"})
        assert listed.headers["access-control-allow-origin"] == "http://app.example"


async def test_an_idle_stream_gets_keepalives_and_a_client_that_leaves_frees_its_subscription(
    start_node, store: MongoEventStore
) -> None:
    node = await start_node(ws_heartbeat_s=0.2)
    await store.append(
        stream_of("t-idle"),
        [
            Pending(event=ChatCreated()),
            Pending(event=MessageUser(content="go", message_id="m1")),
            Pending(event=RunStarted(pattern="RoundRobin", max_turns=8), run_id="run1"),
        ],
        0,
    )
    seen: list[str] = []
    async with httpx.AsyncClient(base_url=node.url) as http, asyncio.timeout(30):
        async with http.stream("POST", "/ag-ui/Analyzer", json=body("t-idle", ("m1", "go"))) as response:
            async for line in response.aiter_lines():
                seen.append(line)
                if seen.count(": keepalive") == 2:
                    break  # and leave while the run goes on
        assert any(line.startswith("data: ") and "RUN_STARTED" in line for line in seen)
        assert seen.count(": keepalive") == 2, seen  # the stream goes on after a keepalive
        while node.runtime.hub.subscriber_count:
            await asyncio.sleep(0.05)


async def test_agui_runs_count_against_the_chat_start_rate_limit(start_node) -> None:
    node = await start_node(chat_starts_per_minute=2)
    async with httpx.AsyncClient(base_url=node.url) as http:
        await run(http, "Analyzer", body("t-rl1", ("m1", "one")))
        await run(http, "Analyzer", body("t-rl2", ("m1", "two")))
        third = await http.post("/ag-ui/Analyzer", json=body("t-rl3", ("m1", "three")))
    assert third.status_code == 429


def test_the_cors_allow_list_takes_origins_and_names_a_bad_one() -> None:
    listed = Settings.from_env({"MOZAIKS_CORS_ORIGINS": " https://app.example.com/ , http://localhost:3000"})
    assert listed.cors_origins == ("https://app.example.com", "http://localhost:3000")
    assert Settings.from_env({}).cors_origins == ()
    for bad in ("app.example.com", "https://app.example.com/chat", "ftp://x"):
        with pytest.raises(SettingsError, match=f"MOZAIKS_CORS_ORIGINS: '{bad}'"):
            Settings.from_env({"MOZAIKS_CORS_ORIGINS": bad})


async def test_resuming_after_a_records_last_event_sends_nothing_of_it_again_and_ids_before_the_run_are_refused(
    start_node, store: MongoEventStore
) -> None:
    node = await start_node()
    chat = stream_of("t-ids")
    before_run = [
        Pending(event=ChatCreated(context={"n": 0})),
        Pending(event=MessageUser(content="hi", message_id="m0")),
    ]
    first_run = [
        Pending(event=RunStarted(pattern="RoundRobin", max_turns=8), run_id="run0"),
        Pending(event=RunCompleted(), run_id="run0"),
    ]
    this_run = [
        Pending(event=MessageUser(content="go", message_id="m1")),
        Pending(event=RunStarted(pattern="RoundRobin", max_turns=8), run_id="run1"),
        *a_turn_of("Analyst", 1),
        Pending(event=RunCompleted(summary="done"), run_id="run1"),
    ]
    await store.append(chat, [*before_run, *first_run, *this_run], 0)
    start = len(before_run) + len(first_run) + 1  # the seq of this run's message.user
    payload = body("t-ids", ("m0", "hi"), ("m1", "go"))
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        whole = await run(http, "Analyzer", payload)  # a repeat: the finished run, streamed again
        assert position(whole[0].id)[0] == start
        # A record that yields several events: `<seq>` names its last, `<seq>.<k>` the others.
        seqs = [position(e.id)[0] for e in whole]
        several = next(seq for seq in dict.fromkeys(seqs) if seqs.count(seq) > 1 and seq != start)
        first, last = seqs.index(several), len(seqs) - 1 - seqs[::-1].index(several)
        assert whole[last].id == str(several) and whole[first].id == f"{several}.0"
        assert await run(http, "Analyzer", payload, last_event_id=str(several)) == whole[last + 1 :]
        assert await run(http, "Analyzer", payload, last_event_id=f"{several}.0") == whole[first + 1 :]
        # The run's own first record is in bounds (its opening events carry its seq); one before is not.
        assert await run(http, "Analyzer", payload, last_event_id=str(start)) == whole[seqs.count(start) :]
        refused = {
            text: await http.post("/ag-ui/Analyzer", json=payload, headers={"Last-Event-ID": text})
            for text in (str(start - 1), "1", "-3", "x", f"{several}.x", "")
        }
    answers = {
        text: (r.status_code, r.json().get("error") if r.status_code == 400 else None)
        for text, r in refused.items()
    }
    assert answers == {
        str(start - 1): (400, "bad_request"),
        "1": (400, "bad_request"),
        "-3": (400, "bad_request"),
        "x": (400, "bad_request"),
        f"{several}.x": (400, "bad_request"),
        "": (200, None),  # no id: the whole run
    }
    assert f"starts at seq {start}" in refused[str(start - 1)].json()["detail"]
