"""UI tools on real nodes (real wire server, real HTTP and WebSocket): a form answered by WebSocket
and the rest by REST, bad answers refused with nothing recorded, a pending form surviving its node,
a timeout that records `ui.expired` while the run goes on, and an AG-UI client answering with a tool message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from ag_ui.core import RunAgentInput
from websockets.asyncio.client import connect

from app.http.auth import issue_token
from domain.events import (
    ChatCreated,
    LlmCall,
    MessageUser,
    Pending,
    Record,
    RunStarted,
    StreamRef,
    ToolCalled,
    UiRequested,
)
from domain.store import MongoEventStore
from tests.llm_server import Reply, StreamingModel, ToolCall, text_reply
from tests.test_agui import body, read_sse

SECRET = "test-secret-of-at-least-thirty-two-bytes!"
FORM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "team_size": {"type": "integer", "minimum": 1},
    },
    "required": ["name", "team_size"],
}


def bearer(user: str, roles: tuple[str, ...] = ("user",)) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, user, 'P', list(roles))}"}


async def records_until(
    store: MongoEventStore, chat_id: str, done: Callable[[list[Record]], bool], what: str
) -> list[Record]:
    """The chat's records once `done` holds for them (bounded: fails naming what never came)."""
    records: list[Record] = []
    for _ in range(600):
        records = [record async for record in store.read(chat_id)]
        if done(records):
            return records
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} never came; the log has {[r.type for r in records]}")


def open_request(records: list[Record], component: str) -> Record | None:
    """The chat's latest `ui.requested` of `component` once its run waits on it (`run.suspended`
    last), if none of its answers is in the log yet."""
    closed = {r.data["request_id"] for r in records if r.type in ("ui.responded", "ui.expired")}
    asked = [r for r in records if r.type == "ui.requested" and r.data["component"] == component]
    if not asked or asked[-1].data["request_id"] in closed or records[-1].type != "run.suspended":
        return None
    return asked[-1] if asked[-1].data["request_id"] in records[-1].data["request_ids"] else None


def types_of(records: list[Record], request: Record) -> list[str]:
    """The types of a request's records and its tool call's result, in log order."""
    rid, call = request.data["request_id"], request.data["tool_call_id"]
    return [
        r.type
        for r in records
        if r.data.get("request_id") == rid or (r.type == "tool.result" and r.data.get("call_id") == call)
    ]


def ui_workflow(root: Path, ui: dict[str, Any], arguments: dict[str, Any]) -> Path:
    """A one-agent workflow under `root/workflows` whose agent calls one UI tool `ask`, then answers."""
    folder = root / "workflows" / "Asker"
    (folder / "fixtures").mkdir(parents=True)
    (folder / "workflow.json").write_text(
        json.dumps({"name": "Asker", "visual_agents": ["Asker"], "entry_agent": "Asker", "max_turns": 6})
    )
    agent = {"name": "Asker", "tools": ["ask"], "handoffs": {"after_work": "terminate"}}
    (folder / "agents.json").write_text(json.dumps({"agents": [agent]}))
    (folder / "tools.json").write_text(json.dumps({"tools": [{"name": "ask", "ui": ui}]}))
    script = [{"tool_calls": [{"name": "ask", "arguments": arguments}]}, {"content": "Done."}]
    (folder / "fixtures" / "Asker.json").write_text(json.dumps(script))
    return folder.parent


async def test_intake_answered_by_websocket_and_rest_bad_answers_recording_nothing(
    start_node: Any, store: MongoEventStore
) -> None:
    node = await start_node(auth_secret=SECRET, chat_starts_per_minute=1000)
    ada = bearer("ada")
    async with httpx.AsyncClient(base_url=node.url, headers=ada) as http:
        started = await http.post("/api/chats", json={"workflow": "Intake", "message": "sign me up"})
        assert started.status_code == 201, started.text
        chat_id = started.json()["chat_id"]
        records = await records_until(
            store, chat_id, lambda rs: open_request(rs, "form") is not None, "the form request"
        )
        form = open_request(records, "form")
        assert form is not None and form.visible and form.agent == "Intake"
        assert form.data["tool_call_id"] and form.data["props"]["title"] == "Your details"
        assert form.data["expires_at"] is not None
        called = [r for r in records if r.type == "tool.called"][-1]
        assert called.data["call_id"] == form.data["tool_call_id"] and called.seq < form.seq
        # The request belongs to the run that asked it (a run's records carry its id).
        assert called.run_id is not None and form.run_id == called.run_id
        url = f"/api/chats/{chat_id}/ui/{form.data['request_id']}"

        async def refused(path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
            before = await store.last_seq(chat_id)
            response = await http.post(path, json=body, headers=headers)
            assert await store.last_seq(chat_id) == before, f"{path} {body}: recorded something"
            return response

        # A schema violation names the failing JSON path.
        bad = await refused(url, {"answer": {"name": "Ada", "email": "ada@x.io", "team_size": 0}})
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_answer", bad.text
        assert bad.json()["fields"][0]["name"] == "$.team_size"
        missing = await refused(url, {"answer": {"name": "Ada"}})
        assert missing.status_code == 422 and "email" in missing.json()["detail"]
        unknown = await refused(f"/api/chats/{chat_id}/ui/nope", {"answer": {}})
        assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_request")
        reader = await refused(url, {"answer": {}}, bearer("audit", ("auditor",)))
        assert (reader.status_code, reader.json()["error"]) == (403, "forbidden")
        no_body = await refused(url, {"reply": 1})
        assert no_body.status_code == 400

        # The form answered over the WebSocket: a bad answer first gets an error frame.
        answer = {"name": "Ada", "email": "ada@x.io", "team_size": 3}
        token = issue_token(SECRET, "ada", "P", ["user"])
        async with connect(
            f"{node.ws_url}/ws/chats/{chat_id}?after=0", subprotocols=["mozaiks.v1", f"bearer.{token}"]
        ) as ws:
            rid = form.data["request_id"]
            await ws.send(json.dumps({"type": "ui.response", "request_id": rid, "answer": {"name": ""}}))
            while (frame := json.loads(await ws.recv()))["type"] != "error":
                pass
            assert frame["code"] == "invalid_answer" and "$" in frame["message"]
            await ws.send(json.dumps({"type": "ui.response", "request_id": rid, "answer": answer}))
            records = await records_until(
                store, chat_id, lambda rs: open_request(rs, "choice") is not None, "the choice request"
            )
        assert types_of(records, form) == ["ui.requested", "ui.responded", "tool.result"]
        responded = next(r for r in records if r.type == "ui.responded")
        assert responded.data["answer"] == answer and responded.data["user_id"] == "ada"
        result = next(r for r in records if r.type == "tool.result" and r.seq > responded.seq)
        assert json.loads(result.data["content"]) == answer  # what the agent received as the tool result
        again = await refused(url, {"answer": answer})
        assert (again.status_code, again.json()["error"]) == (409, "request_closed")

        # The choice and the confirm over REST; wrong option and non-boolean refused first.
        choice = open_request(records, "choice")
        assert choice is not None
        curl = f"/api/chats/{chat_id}/ui/{choice.data['request_id']}"
        wrong = await refused(curl, {"answer": "Gold"})
        assert wrong.status_code == 422 and "options" in wrong.json()["detail"]
        assert (await http.post(curl, json={"answer": "Team"})).status_code == 202
        records = await records_until(
            store, chat_id, lambda rs: open_request(rs, "confirm") is not None, "the confirm request"
        )
        confirm = open_request(records, "confirm")
        assert confirm is not None
        kurl = f"/api/chats/{chat_id}/ui/{confirm.data['request_id']}"
        assert (await refused(kurl, {"answer": "yes"})).status_code == 422
        artifact = next(r for r in records if r.type == "ui.requested" and r.data["component"] == "artifact")
        shown = await refused(f"/api/chats/{chat_id}/ui/{artifact.data['request_id']}", {"answer": True})
        assert shown.status_code == 409
        accepted = await http.post(kurl, json={"answer": True})
        assert accepted.status_code == 202 and accepted.json()["seq"] > confirm.seq
        records = await records_until(
            store, chat_id, lambda rs: rs[-1].type in ("run.completed", "run.failed"), "the run's end"
        )
    assert records[-1].type == "run.completed", records[-1].data
    for request in (choice, confirm):
        assert types_of(records, request) == ["ui.requested", "ui.responded", "tool.result"]
    panels = [r for r in records if r.type == "ui.requested" and r.data["component"] == "artifact"]
    assert [p.data["props"]["artifact_id"] for p in panels] == ["summary", "summary"]
    assert "confirmed" in panels[-1].data["props"]["content"]
    # The AgentDriven start's hidden first message, and the recorder's structured record at the end.
    assert records[1].type == "message.user" and not records[1].visible
    filed = [r for r in records if r.type == "message.agent" and r.agent == "Recorder"]
    assert filed[-1].data["structured"] == {"name": "Ada", "plan": "Team", "team_size": 3, "confirmed": True}


async def test_a_pending_form_survives_its_node_and_the_answer_continues_the_chat(
    start_node: Any, store: MongoEventStore, db: Any, tmp_path: Path
) -> None:
    call = ToolCall(id="call_form_1", name="ask", arguments=json.dumps({"title": "Team", "schema": FORM}))
    model = StreamingModel([Reply(tool_calls=[call]), text_reply("Welcome, Ada, team of 3.", 3)])
    workflows = ui_workflow(tmp_path, {"component": "form"}, {})
    try:
        common = {"workflows_path": workflows, "openai_base_url": model.base_url, "openai_api_key": "k"}
        first = await start_node(**common)
        async with httpx.AsyncClient(base_url=first.url) as http:
            started = await http.post("/api/chats", json={"workflow": "Asker", "message": "hello"})
            chat_id = started.json()["chat_id"]
        records = await records_until(
            store, chat_id, lambda rs: open_request(rs, "form") is not None, "the form request"
        )
        form = open_request(records, "form")
        assert form is not None
        # The waiting chat is a state in the log: no task, no lease; its session says `waiting`.
        seen: tuple[Any, ...] = ()
        for _ in range(200):
            session = await db["chat_sessions"].find_one({"_id": chat_id}) or {}
            lease = await db["chat_leases"].find_one({"_id": chat_id})
            seen = (chat_id in first.runtime.supervisor.tasks, lease, session.get("status"))
            if seen == (False, None, "waiting"):
                break
            await asyncio.sleep(0.05)
        assert seen == (False, None, "waiting"), f"(task, lease, status) of the waiting chat: {seen}"
        await first.stop()  # the run ended suspended on the form: nothing of it is left on the node
        records = [r async for r in store.read(chat_id)]
        assert records[-1].type == "run.suspended" and records[-1].data["request_ids"] == [
            form.data["request_id"]
        ]

        second = await start_node(**common, node_id="test-node-second")
        answer = {"name": "Ada", "team_size": 3}
        async with httpx.AsyncClient(base_url=second.url) as http:
            url = f"/api/chats/{chat_id}/ui/{form.data['request_id']}"
            assert (await http.post(url, json={"answer": answer})).status_code == 202
        records = await records_until(
            store, chat_id, lambda rs: rs[-1].type in ("run.completed", "run.failed"), "the run's end"
        )
    finally:
        model.close()
    assert records[-1].type == "run.completed", records[-1].data
    assert types_of(records, form) == ["ui.requested", "ui.responded", "tool.result"]
    said = [r for r in records if r.type == "message.agent"]
    assert said[-1].data["content"] == "Welcome, Ada, team of 3."
    # The continuing run's model call had the tool call and the answer in place, as its last messages.
    last = model.requests[-1]["messages"]
    assert last[-2]["tool_calls"][0]["id"] == "call_form_1"
    assert last[-1]["role"] == "tool" and json.loads(last[-1]["content"]) == answer


async def test_a_timeout_records_ui_expired_and_the_run_goes_on(
    start_node: Any, store: MongoEventStore, tmp_path: Path
) -> None:
    workflows = ui_workflow(
        tmp_path, {"component": "confirm", "timeout_s": 0.3}, {"question": "Still there?"}
    )
    node = await start_node(workflows_path=workflows)
    async with httpx.AsyncClient(base_url=node.url) as http:
        started = await http.post("/api/chats", json={"workflow": "Asker", "message": "hello"})
        chat_id = started.json()["chat_id"]
        records = await records_until(
            store, chat_id, lambda rs: rs[-1].type in ("run.completed", "run.failed"), "the run's end"
        )
        confirm = next(r for r in records if r.type == "ui.requested")
        late = await http.post(f"/api/chats/{chat_id}/ui/{confirm.data['request_id']}", json={"answer": True})
        assert (late.status_code, late.json()["error"]) == (409, "request_closed")
    assert records[-1].type == "run.completed", records[-1].data
    assert types_of(records, confirm) == ["ui.requested", "ui.expired", "tool.result"]
    result = next(r for r in records if r.type == "tool.result")
    assert result.data["content"].startswith("No answer")


async def test_agui_client_gets_the_tool_call_and_an_interrupt_then_answers_with_a_tool_message(
    start_node: Any, tmp_path: Path
) -> None:
    workflows = ui_workflow(tmp_path, {"component": "confirm"}, {"question": "Go ahead?"})
    node = await start_node(workflows_path=workflows)
    thread = "agui-ui-thread"
    user = {"id": "m1", "role": "user", "content": "hello"}
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        first = body(thread, ("m1", "hello"))
        async with http.stream("POST", "/ag-ui/Asker", json=first) as response:
            events = [e.event for e in await read_sse(response)]
        types = [e["type"] for e in events]
        assert [t for t in types if "TOOL" in t] == ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END"]
        start = next(e for e in events if e["type"] == "TOOL_CALL_START")
        args = next(e for e in events if e["type"] == "TOOL_CALL_ARGS")
        assert start["toolCallName"] == "ask" and json.loads(args["delta"]) == {"question": "Go ahead?"}
        finished = events[-1]
        assert finished["type"] == "RUN_FINISHED" and finished["outcome"]["type"] == "interrupt"
        [interrupt] = finished["outcome"]["interrupts"]
        assert interrupt["toolCallId"] == start["toolCallId"] and interrupt["reason"] == "ui_required"
        assert interrupt["responseSchema"] == {"type": "boolean"}

        def answering(content: str, run: str) -> dict[str, Any]:
            tool = {"id": f"t-{run}", "role": "tool", "toolCallId": start["toolCallId"], "content": content}
            payload = {"threadId": thread, "runId": run, "messages": [user, tool]}
            RunAgentInput.model_validate(payload)
            return payload

        bad = await http.post("/ag-ui/Asker", json=answering('"perhaps"', "r2"))
        assert (bad.status_code, bad.json()["error"]) == (422, "invalid_answer"), bad.text
        async with http.stream("POST", "/ag-ui/Asker", json=answering("true", "r3")) as response:
            assert response.status_code == 200
            events = [e.event for e in await read_sse(response)]
    result = next(e for e in events if e["type"] == "TOOL_CALL_RESULT")
    assert result["toolCallId"] == start["toolCallId"] and result["content"] == "true"
    assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["outcome"]["type"] == "success"

    # The same interrupt answered with `resume` (as AG-UI answers any interrupt) on another thread.
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        async with http.stream(
            "POST", "/ag-ui/Asker", json=body("agui-ui-resume", ("m1", "hello"))
        ) as response:
            [interrupt] = [e.event for e in await read_sse(response)][-1]["outcome"]["interrupts"]
        resume = [{"interruptId": interrupt["id"], "status": "resolved", "payload": True}]
        answer = body("agui-ui-resume", ("m1", "hello"), run="r2", resume=resume)
        async with http.stream("POST", "/ag-ui/Asker", json=answer) as response:
            events = [e.event for e in await read_sse(response)]
    result = next(e for e in events if e["type"] == "TOOL_CALL_RESULT")
    assert result["toolCallId"] == interrupt["toolCallId"] and result["content"] == "true"
    assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["outcome"]["type"] == "success"


async def test_an_answer_while_a_dead_nodes_lease_lingers_continues_the_chat_after_the_sweep(
    start_node: Any, store: MongoEventStore, db: Any, tmp_path: Path
) -> None:
    # A node died (no shutdown) while its run waited on a form: its records and its lease are all
    # that is left. The answer comes while the lease still looks alive.
    workflows = ui_workflow(tmp_path, {"component": "form"}, {})
    node = await start_node(workflows_path=workflows, lease_ttl_s=0.6)
    expires = datetime.now(UTC) + timedelta(seconds=2)
    await db["chat_leases"].insert_one(
        {"_id": "crashed", "owner": "dead", "run_id": "r-dead", "expires_at": expires}
    )
    chat = StreamRef(chat_id="crashed", app_id="local", user_id="local", workflow="Asker")
    arguments = json.dumps({"title": "Team", "schema": FORM})
    await store.append(
        chat,
        [
            Pending(event=ChatCreated(offline=True)),
            Pending(event=MessageUser(content="hello")),
            Pending(event=RunStarted(pattern="Default", max_turns=6, offline=True), run_id="r-dead"),
            Pending(event=LlmCall(model="offline", offline=True), agent="Asker", run_id="r-dead"),
            Pending(
                event=ToolCalled(tool="ask", call_id="c1", arguments=arguments),
                agent="Asker",
                run_id="r-dead",
            ),
            Pending(
                event=UiRequested(
                    request_id="q1",
                    tool_call_id="c1",
                    tool="ask",
                    component="form",
                    props=json.loads(arguments),
                ),
                agent="Asker",
                run_id="r-dead",
            ),
        ],
        expected_seq=0,
    )
    async with httpx.AsyncClient(base_url=node.url) as http:
        sent = await http.post("/api/chats/crashed/ui/q1", json={"answer": {"name": "Ada", "team_size": 2}})
        assert sent.status_code == 202, sent.text
    records = await records_until(
        store,
        "crashed",
        lambda rs: rs[-1].type in ("run.completed", "run.failed") and rs[-1].run_id != "r-dead",
        "the continuing run's end",
    )
    assert records[-1].type == "run.completed", records[-1].data
    kinds = [r.type for r in records if r.run_id == "r-dead" or r.type.startswith("ui.")]
    # The answer is recorded with the call's result at once; the sweep then ends the dead run and
    # continues the chat.
    assert kinds[-4:] == ["ui.requested", "ui.responded", "tool.result", "run.failed"]
    assert [r.data["content"] for r in records if r.type == "message.agent"] == ["Done."]
