"""Child workflows: a tools.json `workflow` tool starts another workflow's chat and answers with its result."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from app.cli.audit import _export, _verify
from app.runs.workflows import WorkflowManager
from domain.events import (
    ChatCreated,
    ChildStarted,
    MessageUser,
    ParentRef,
    Pending,
    Record,
    RunStarted,
    StreamRef,
)
from domain.store import MongoEventStore
from tests.faults.checks import check_log, records_of, run_end, wait_for, waiting_for_input

WORKFLOWS = Path(__file__).parent / "child_workflows"


def ended(records: list[Record]) -> bool:
    return run_end(records) is not None


def child_id_of(records: list[Record]) -> str | None:
    return next((str(r.data["child_chat_id"]) for r in records if r.type == "child.started"), None)


async def child_of(store: MongoEventStore, chat_id: str) -> str:
    records = await wait_for(store, chat_id, lambda rs: child_id_of(rs) is not None, 30)
    child = child_id_of(records)
    assert child is not None
    return child


def test_a_child_tool_naming_a_workflow_that_is_not_loaded_is_a_load_error(tmp_path: Path) -> None:
    for name in ("Delegator",):
        folder = tmp_path / name
        folder.mkdir()
        for item in (WORKFLOWS / name).rglob("*"):
            if item.is_file():
                target = folder / item.relative_to(WORKFLOWS / name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(item.read_bytes())
    manager = WorkflowManager(tmp_path)  # Helper is not there
    assert manager.names() == []
    [error] = manager.errors
    assert error.workflow == "Delegator" and error.file == "tools.json"
    assert "$.tools[0].workflow" in str(error) and "'Helper', which is not loaded" in str(error)


async def test_a_child_completes_its_result_reaches_the_parent_and_the_tree_and_audit_show_both(
    start_node: Any, store: MongoEventStore
) -> None:
    node = await start_node(workflows_path=WORKFLOWS)
    async with httpx.AsyncClient(base_url=node.url) as http:
        created = await http.post("/api/chats", json={"workflow": "Delegator", "message": "sum please"})
        parent = created.json()["chat_id"]
        records = await wait_for(store, parent, ended, 60)
        assert run_end(records) == "run.completed", [r.type for r in records]
        child = child_id_of(records)
        assert child is not None
        types = [r.type for r in records]
        started = next(r for r in records if r.type == "child.started")
        completed = next(r for r in records if r.type == "child.completed")
        assert started.data == {"child_chat_id": child, "workflow": "Helper", "tool": "ask_helper"}
        assert completed.data["outcome"] == "run.completed" and completed.data["result"] == "2+2 is 4."
        assert completed.data["error"] is None
        # The tool's result to the agent is the child's answer, before the agent's next message.
        result = next(r for r in records if r.type == "tool.result")
        assert result.data["content"] == "2+2 is 4." and not result.data["is_error"]
        assert types.index("tool.called") < types.index("child.started") < types.index("child.completed")
        assert types.index("child.completed") < types.index("tool.result")
        said = [r.data["content"] for r in records if r.type == "message.agent"]
        assert said[-1] == "The helper says the sum is 4."
        kid = await records_of(store, child)
        assert kid[0].type == "chat.created" and kid[0].workflow == "Helper"
        assert kid[0].data["parent"] == {"chat_id": parent, "seq": started.seq}
        assert (kid[0].app_id, kid[0].user_id) == (records[0].app_id, records[0].user_id)
        assert run_end(kid) == "run.completed"
        check_log(records)
        check_log(kid)

        tree = (await http.get(f"/api/chats/{parent}/tree")).json()
        assert (tree["chat_id"], tree["relation"], tree["status"]) == (parent, "root", "completed")
        [branch] = tree["children"]
        assert branch["chat_id"] == child and branch["relation"] == "child"
        assert branch["parent_seq"] == started.seq and branch["workflow"] == "Helper"
        assert branch["status"] == "completed" and tree["forks"] == []
        missing = await http.get("/api/chats/nope/tree")
        assert missing.status_code == 404 and missing.json()["error"]

    out = io.BytesIO()
    console = Console(file=io.StringIO())
    assert await _export(node.settings, _chat_filter(parent), out, console, with_children=True) == 0
    exported = {json.loads(line)["chat_id"] for line in out.getvalue().splitlines()}
    assert exported == {parent, child}
    assert await _verify(node.settings, None, console, None, parent, True) == 0


def _chat_filter(chat_id: str) -> Any:
    from domain.audit import AuditFilter

    return AuditFilter(chat_id=chat_id)


async def test_stopping_the_parent_stops_its_running_child(
    start_node: Any, store: MongoEventStore, db: Any
) -> None:
    node = await start_node(workflows_path=WORKFLOWS)
    async with httpx.AsyncClient(base_url=node.url) as http:
        created = await http.post("/api/chats", json={"workflow": "Patient", "message": "go"})
        parent = created.json()["chat_id"]
        child = await child_of(store, parent)
        waiting = await wait_for(store, child, waiting_for_input, 30)  # the child runs, waiting for the user
        # Each chat runs under its own lease.
        leases = {lease["_id"]: lease["run_id"] async for lease in db["chat_leases"].find({})}
        child_run = next(r.run_id for r in waiting if r.type == "run.started")
        assert leases.get(child) == child_run and parent in leases and leases[parent] != child_run
        stopped = await http.post(f"/api/chats/{parent}/stop")
        assert stopped.status_code < 300, stopped.text
        kid = await wait_for(store, child, ended, 30)
        assert run_end(kid) == "run.stopped"
        records = await wait_for(store, parent, ended, 30)
        assert run_end(records) == "run.stopped"
        completed = next(r for r in records if r.type == "child.completed")
        assert completed.data["outcome"] == "run.stopped"
        assert "stopped with its parent" in completed.data["error"]
        tree = (await http.get(f"/api/chats/{parent}/tree")).json()
        assert [c["status"] for c in tree["children"]] == ["stopped"]
    check_log(records)
    check_log(kid)


async def test_a_child_stopped_by_its_user_gives_the_parent_agent_an_error_and_the_parent_goes_on(
    start_node: Any, store: MongoEventStore
) -> None:
    node = await start_node(workflows_path=WORKFLOWS)
    async with httpx.AsyncClient(base_url=node.url) as http:
        created = await http.post("/api/chats", json={"workflow": "Patient", "message": "go"})
        parent = created.json()["chat_id"]
        child = await child_of(store, parent)
        await wait_for(store, child, waiting_for_input, 30)
        stopped = await http.post(f"/api/chats/{child}/stop")
        assert stopped.status_code < 300, stopped.text
        records = await wait_for(store, parent, ended, 30)
    assert run_end(records) == "run.completed"  # the agent read the error and finished its turn
    completed = next(r for r in records if r.type == "child.completed")
    assert completed.data["outcome"] == "run.stopped"
    assert completed.data["error"] == "child workflow Waiter was stopped by local"
    result = next(r for r in records if r.type == "tool.result")
    assert result.data["is_error"] and "child workflow Waiter was stopped" in result.data["content"]
    check_log(records)


async def test_a_child_that_cannot_start_answers_the_agent_with_an_error_saying_why(
    start_node: Any, store: MongoEventStore
) -> None:
    node = await start_node(workflows_path=WORKFLOWS, max_active_runs=1)  # the parent holds the only slot
    async with httpx.AsyncClient(base_url=node.url) as http:
        created = await http.post("/api/chats", json={"workflow": "Delegator", "message": "sum please"})
        records = await wait_for(store, created.json()["chat_id"], ended, 30)
    assert run_end(records) == "run.completed"
    completed = next(r for r in records if r.type == "child.completed")
    assert completed.data["outcome"] == "run.failed"
    assert completed.data["error"].startswith("child workflow Helper did not start: this node runs 1 runs")
    result = next(r for r in records if r.type == "tool.result")
    assert result.data["is_error"] and "did not start" in result.data["content"]


async def test_a_node_killed_while_the_child_runs_leaves_both_ended_and_nothing_wedged(
    start_node: Any, store: MongoEventStore
) -> None:
    node = await start_node(workflows_path=WORKFLOWS)
    async with httpx.AsyncClient(base_url=node.url) as http:
        created = await http.post("/api/chats", json={"workflow": "Patient", "message": "go"})
        parent = created.json()["chat_id"]
    child = await child_of(store, parent)
    await wait_for(store, child, waiting_for_input, 30)
    await node.kill()
    kid = await records_of(store, child)
    child_end = next(r for r in kid if r.type == "run.failed")
    assert child_end.data["reason"] == "interrupted"
    records = await records_of(store, parent)
    completed = next(r for r in records if r.type == "child.completed")
    assert completed.data["outcome"] == "run.failed" and "failed" in completed.data["error"]
    assert run_end(records) == "run.failed"
    # Nothing wedged: another node continues the parent chat.
    other = await start_node(workflows_path=WORKFLOWS)
    async with httpx.AsyncClient(base_url=other.url) as http:
        sent = await http.post(f"/api/chats/{parent}/messages", json={"message": "again"})
        assert sent.status_code == 202, sent.text
        records = await wait_for(store, parent, lambda rs: run_end(rs) == "run.completed", 30)
    check_log(records)
    check_log(kid)


async def test_the_sweep_ends_the_child_of_a_dead_parent_and_answers_the_parent_with_an_error(
    start_node: Any, store: MongoEventStore, db: Any
) -> None:
    # A parent and its child both lost their node (a crash: leases left to expire, no shutdown).
    parent = StreamRef(chat_id="dead-parent", app_id="local", user_id="local", workflow="Patient")
    child = StreamRef(chat_id="dead-child", app_id="local", user_id="local", workflow="Waiter")
    started = RunStarted(pattern="Default", max_turns=6)
    await store.append(parent, [Pending(event=ChatCreated()), Pending(event=MessageUser(content="go"))], 0)
    await store.append(parent, [Pending(event=started, run_id="rp")], 2)
    [link] = await store.append(
        parent,
        [Pending(event=ChildStarted(child_chat_id="dead-child", workflow="Waiter"), run_id="rp")],
        3,
    )
    await store.append(
        child,
        [
            Pending(event=ChatCreated(parent=ParentRef(chat_id="dead-parent", seq=link.seq))),
            Pending(event=MessageUser(content="ask")),
            Pending(event=started, run_id="rc"),
        ],
        0,
    )
    past = datetime.now(UTC) - timedelta(seconds=1)
    for chat_id, run_id in (("dead-parent", "rp"), ("dead-child", "rc")):
        await db["chat_leases"].insert_one(
            {"_id": chat_id, "owner": "gone", "run_id": run_id, "expires_at": past}
        )
    node = await start_node(workflows_path=WORKFLOWS, lease_ttl_s=0.6)
    records = await wait_for(store, "dead-parent", ended, 30)
    kid = await wait_for(store, "dead-child", ended, 30)
    assert run_end(kid) == "run.failed"
    assert next(r for r in kid if r.type == "run.failed").data["reason"] == "interrupted"
    assert [r.type for r in records][-2:] == ["child.completed", "run.failed"]
    assert records[-2].data["outcome"] == "run.failed" and "failed" in records[-2].data["error"]
    async with httpx.AsyncClient(base_url=node.url) as http:
        sent = await http.post("/api/chats/dead-parent/messages", json={"message": "again"})
        assert sent.status_code == 202, sent.text
    check_log(records)
    check_log(kid)


async def test_the_tree_holds_children_and_forks_recursively_and_leaves_out_chats_the_caller_may_not_read(
    store: MongoEventStore,
) -> None:
    from app.http.auth import Principal
    from app.http.children import build_tree
    from domain.events import chain_hash, seal

    def ref(chat_id: str, user: str = "ada") -> StreamRef:
        return StreamRef(chat_id=chat_id, app_id="app", user_id=user, workflow="Patient")

    await store.append(ref("root"), [Pending(event=ChatCreated())], 0)
    for child, user in (("kid", "ada"), ("other", "bob")):
        await store.append(
            ref("root"), [Pending(event=ChildStarted(child_chat_id=child, workflow="Waiter"))], None
        )
        await store.append(
            ref(child, user), [Pending(event=ChatCreated(parent=ParentRef(chat_id="root", seq=2)))], 0
        )
    await store.append(
        ref("kid"), [Pending(event=ChildStarted(child_chat_id="grandkid", workflow="Waiter"))], None
    )
    await store.append(ref("grandkid"), [Pending(event=ChatCreated())], 0)
    # A fork of the child (its `forked_from` is written by the fork capability; here, the stored shape).
    doc = seal(
        ref("fork"), Pending(event=ChatCreated()), 1, "0" * 64, datetime.now(UTC).replace(microsecond=0)
    )
    doc["data"]["forked_from"] = {"chat_id": "kid", "seq": 1, "hash": "h"}
    doc["hash"] = chain_hash(doc["prev_hash"], doc)
    await store.events.insert_one(doc)

    ada = Principal(user_id="ada", app_id="app", roles=frozenset({"user"}))
    first = await anext(store.read("root", limit=1))
    tree = await build_tree(store, ada, first)
    assert [c.chat_id for c in tree.children] == ["kid"]  # bob's chat is not ada's to read
    [kid] = tree.children
    assert [c.chat_id for c in kid.children] == ["grandkid"] and kid.children[0].relation == "child"
    assert [(f.chat_id, f.relation, f.parent_seq) for f in kid.forks] == [("fork", "fork", 1)]
    assert (tree.status, kid.status) == ("idle", "idle")
    auditor = Principal(user_id="eve", app_id="app", roles=frozenset({"auditor"}))
    assert [c.chat_id for c in (await build_tree(store, auditor, first)).children] == ["kid", "other"]
