"""Auditing across chats on the real wire server: the app-wide query and its cursor, indexes, tail anchors."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from app.http.auth import Principal, issue_token
from app.http.controllers import verify_chat
from domain.anchors import ANCHORS, Anchor, AnchorBook, Head, derive_key, signature
from domain.audit import AuditFilter, BadCursor, Position, find_records, plans, verify_log
from domain.events import (
    ChatCreated,
    ForkedFrom,
    LlmCall,
    MessageAgent,
    MessageUser,
    Pending,
    RunCompleted,
    RunStarted,
    StreamRef,
    ToolCalled,
    ToolResult,
    seal,
)
from domain.store import MongoEventStore
from tests.cli import invoke
from tests.test_store import InsertsInFlight

SECRET = "audit-test-secret-of-at-least-thirty-two-bytes"
ROOT = Path(__file__).resolve().parents[1]
APPS = ("P", "Q")
USERS = ("u0", "u1", "u2")
WORKFLOWS = ("Alpha", "Beta")
AGENTS = ("Planner", "Writer", "_Hidden")
LATE_APPENDS = 150  # records appended while a test pages through the log


def bearer(user: str, app: str, roles: tuple[str, ...] = ("user",)) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, user, app, list(roles))}"}


def chat_events(i: int) -> list[list[Pending]]:
    """A small chat: created, a user message, one or two runs of agent turns with tools and LLM calls."""
    bursts: list[list[Pending]] = [
        [Pending(event=ChatCreated()), Pending(event=MessageUser(content=f"hi {i}"))]
    ]
    for r in range(1 + i % 2):
        run_id = f"run-{i}-{r}"
        burst = [Pending(event=RunStarted(pattern="RoundRobin", max_turns=4), run_id=run_id)]
        for turn in range(2):
            agent = AGENTS[(i + turn + r) % 3]
            burst.append(
                Pending(
                    event=LlmCall(
                        model="gpt-4o-mini", prompt_tokens=10 + i, completion_tokens=5, latency_ms=100.0 + i
                    ),
                    agent=agent,
                    run_id=run_id,
                    visible=False,
                )
            )
            if (i + turn) % 3 == 0:
                burst.append(
                    Pending(
                        event=ToolCalled(tool="search", call_id=f"c{i}{turn}", arguments="{}"),
                        agent=agent,
                        run_id=run_id,
                    )
                )
                burst.append(
                    Pending(
                        event=ToolResult(tool="search", call_id=f"c{i}{turn}", content="r"),
                        agent=agent,
                        run_id=run_id,
                    )
                )
            burst.append(
                Pending(
                    event=MessageAgent(content=f"turn {turn}"),
                    agent=agent,
                    run_id=run_id,
                    visible=agent != "_Hidden",
                )
            )
        burst.append(Pending(event=RunCompleted(), run_id=run_id))
        bursts.append(burst)
    return bursts


def ref(i: int) -> StreamRef:
    return StreamRef(
        chat_id=f"chat-{i:02d}", app_id=APPS[i % 2], user_id=USERS[i % 3], workflow=WORKFLOWS[(i // 2) % 2]
    )


async def write_chats(store: MongoEventStore, count: int, pause_s: float = 0.0) -> None:
    """`count` chats, one after another; `pause_s` between appends gives each burst its own millisecond."""
    for i in range(count):
        for burst in chat_events(i):
            await store.append(ref(i), burst, None)
            await asyncio.sleep(pause_s)


def matches(doc: Mapping[str, Any], f: AuditFilter) -> bool:
    if f.types and doc["type"] not in f.types:
        return False
    for field in ("app_id", "agent", "workflow", "user_id", "chat_id", "run_id"):
        value = getattr(f, field)
        if value is not None and doc[field] != value:
            return False
    if f.visible is not None and doc["visible"] != f.visible:
        return False
    if f.since is not None and doc["ts"] < f.since:
        return False
    return f.until is None or doc["ts"] < f.until


async def page_all(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    params: dict[str, Any],
    limit: int = 7,
    max_pages: int = 100,
) -> list[dict[str, Any]]:
    """Every record of a query, page by page through the cursor (at most `max_pages` pages)."""
    records: list[dict[str, Any]] = []
    cursor = None
    for _ in range(max_pages):
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        response = await http.get("/api/events", params=query, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        # A full page says there may be more; a short one is the last.
        assert len(page["events"]) == limit if page["more"] else len(page["events"]) < limit, page
        records += page["events"]
        cursor = page["next"]
        if not page["more"]:
            return records
    raise AssertionError(
        f"paging {params} by {limit} did not end after {max_pages} pages ({len(records)} records): "
        "the cursor keeps announcing more"
    )


def filter_params(f: AuditFilter) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if f.types:
        params["type"] = list(f.types)
    for field in ("agent", "workflow", "user_id", "chat_id", "run_id"):
        if getattr(f, field) is not None:
            params[field] = getattr(f, field)
    for field in ("since", "until"):
        value = getattr(f, field)
        if value is not None:
            params[field] = value.isoformat()
    return params


@pytest.fixture
async def secured(start_node: Any) -> Any:
    return await start_node(auth_secret=SECRET)


async def test_each_filter_returns_exactly_the_matching_records_of_the_callers_app(
    secured: Any, store: MongoEventStore, db: AsyncDatabase[Any]
) -> None:
    await write_chats(store, 12)
    stored = [doc async for doc in db["events"].find({})]
    times = sorted(doc["ts"] for doc in stored)
    middle, late = times[len(times) // 3], times[2 * len(times) // 3]
    filters = [
        AuditFilter(),
        AuditFilter(types=("llm.call",)),
        AuditFilter(types=("tool.called", "tool.result", "run.completed")),
        AuditFilter(agent="Writer"),
        AuditFilter(workflow="Beta"),
        AuditFilter(user_id="u1"),
        AuditFilter(chat_id="chat-04"),
        AuditFilter(run_id="run-03-1"),
        AuditFilter(since=middle),
        AuditFilter(since=middle, until=late),
        # Filters beyond an index's prefix, checked on each document read: paging must still be exact.
        AuditFilter(agent="Writer", workflow="Beta"),
        AuditFilter(chat_id="chat-04", types=("llm.call", "tool.called"), since=middle),
        AuditFilter(run_id="run-03-1", agent="Writer", until=late),
        AuditFilter(types=("message.agent",), agent="_Hidden", user_id="u2", since=middle),
    ]
    async with httpx.AsyncClient(base_url=secured.url) as http:
        for app in APPS:
            auditor = bearer("auditor", app, ("auditor",))
            for f in filters:
                expected = sorted(
                    (d for d in stored if d["app_id"] == app and matches(d, f)),
                    key=lambda d: (d["ts"], d["chat_id"], d["seq"]),
                )
                got = await page_all(http, auditor, filter_params(f))
                assert [(r["chat_id"], r["seq"]) for r in got] == [
                    (d["chat_id"], d["seq"]) for d in expected
                ], (app, f)
                assert all(r["app_id"] == app for r in got)
                streamed = await http.get(
                    "/api/events",
                    params=filter_params(f),
                    headers={**auditor, "Accept": "application/x-ndjson"},
                )
                assert streamed.headers["content-type"].startswith("application/x-ndjson")
                assert [json.loads(line)["id"] for line in streamed.text.splitlines()] == [
                    d["_id"] for d in expected
                ]
            assert any(f.types for f in filters) and expected  # the last filter matched something
            # The other app's chat, asked for by id, is simply not there.
            other = "chat-01" if app == "P" else "chat-00"
            assert (await http.get("/api/events", params={"chat_id": other}, headers=auditor)).json()[
                "events"
            ] == []
        # A user reads the visible records of their own chats only, and no one else's.
        user = bearer("u1", "P")
        own = await page_all(http, user, {})
        expected_own = [d for d in stored if d["app_id"] == "P" and d["user_id"] == "u1" and d["visible"]]
        assert sorted(r["id"] for r in own) == sorted(d["_id"] for d in expected_own)
        assert (await http.get("/api/events", params={"user_id": "u2"}, headers=user)).status_code == 403
        # Bad input: a clear 400 naming what is wrong.
        bad = await http.get("/api/events", params={"type": "nope"}, headers=user)
        assert bad.status_code == 400 and "nope" in bad.text
        bad_cursor = await http.get("/api/events", params={"cursor": "not-a-cursor"}, headers=user)
        assert bad_cursor.status_code == 400 and "cursor" in bad_cursor.text
        assert (await http.get("/api/events")).status_code == 401


async def test_store_find_returns_exactly_the_records_matching_every_filter_in_one_chat_or_all(
    store: MongoEventStore, db: AsyncDatabase[Any]
) -> None:
    await write_chats(store, 6, pause_s=0.003)
    stored = [doc async for doc in db["events"].find({})]
    # A time window that cuts chat-03 (asked for alone below) in three.
    times = sorted(doc["ts"] for doc in stored if doc["chat_id"] == "chat-03")
    middle, late = times[len(times) // 3], times[2 * len(times) // 3]
    assert times[0] < middle < late <= times[-1]
    filters = [
        AuditFilter(),
        AuditFilter(types=("llm.call", "tool.called")),
        AuditFilter(agent="Writer"),
        AuditFilter(app_id="Q"),
        AuditFilter(user_id="u1"),
        AuditFilter(visible=False),
        AuditFilter(visible=True, agent="_Hidden"),
        AuditFilter(since=middle),
        AuditFilter(until=late),
        AuditFilter(since=middle, until=late, user_id="u2", types=("message.agent",)),
    ]
    for f in filters:
        given = {
            "types": f.types or None,
            "agent": f.agent,
            "app_id": f.app_id,
            "user_id": f.user_id,
            "visible": f.visible,
            "since": f.since,
            "until": f.until,
        }
        for chat_id in (None, "chat-03"):
            expected = sorted(
                (
                    (d["chat_id"], d["seq"])
                    for d in stored
                    if matches(d, f) and chat_id in (None, d["chat_id"])
                ),
            )
            found = [(r.chat_id, r.seq) async for r in store.find(chat_id, **given)]
            assert found == expected, (f, chat_id)
            newest_first = [(r.chat_id, r.seq) async for r in store.find(chat_id, newest_first=True, **given)]
            assert newest_first == expected[::-1], (f, chat_id)
            assert [(r.chat_id, r.seq) async for r in store.find(chat_id, limit=2, **given)] == expected[:2]
            if chat_id is not None and expected:
                after = expected[0][1]
                later = [(r.chat_id, r.seq) async for r in store.find(chat_id, after=after, **given)]
                assert later == expected[1:], (f, chat_id)
    assert [r.seq async for r in store.read("chat-03", after=1, limit=2)] == [2, 3]


async def test_paging_while_appends_continue_misses_and_repeats_nothing(
    secured: Any, store: MongoEventStore, db: AsyncDatabase[Any]
) -> None:
    await write_chats(store, 12)
    before = {doc["_id"] async for doc in db["events"].find({"app_id": "P"}, {"_id": 1})}
    stop = asyncio.Event()
    appended = 0

    async def keep_appending() -> None:
        nonlocal appended
        n = 100
        # A bounded number, so that paging catches up with the end of the log whatever the two speeds.
        while not stop.is_set() and appended < LATE_APPENDS:
            i = n % 12
            chat = (
                ref(i) if n % 3 else StreamRef(chat_id=f"new-{n}", app_id="P", user_id="u0", workflow="Alpha")
            )
            await store.append(chat, [Pending(event=MessageAgent(content=f"late {n}"), agent="Writer")], None)
            appended += 1
            n += 1
            await asyncio.sleep(0)

    writer = asyncio.create_task(keep_appending())
    try:
        async with httpx.AsyncClient(base_url=secured.url) as http:
            most = (len(before) + LATE_APPENDS) // 5 + 2  # every page full, and the last one empty
            records = await page_all(http, bearer("auditor", "P", ("auditor",)), {}, limit=5, max_pages=most)
    finally:
        stop.set()
        await writer
    ids = [r["id"] for r in records]
    assert appended > 0
    assert len(ids) == len(set(ids)), "a record came twice"
    assert before <= set(ids), f"missed {len(before - set(ids))} records stored before paging began"
    # By time, not by the `ts` text: a stamp on a whole second is written without its fraction.
    keys = [(datetime.fromisoformat(r["ts"]), r["chat_id"], r["seq"]) for r in records]
    assert keys == sorted(keys)


async def test_records_of_several_types_at_one_instant_come_in_chat_then_seq_order_and_pages_keep_the_window(
    db: AsyncDatabase[Any],
) -> None:
    # Two types are read apart and merged in time order: at one millisecond, chat a's record before
    # chat b's, whatever their seqs and whichever type's read holds each; a page goes on after its
    # cursor and stays inside the time window, for one app or every app.
    at = datetime(2026, 12, 7, 12, 0, 0, 5000, tzinfo=UTC)
    before = at - timedelta(milliseconds=1)

    def doc(chat: str, seq: int, type_: str, ts: datetime = at) -> dict[str, Any]:
        return {
            "_id": f"{chat}{seq}", "app_id": "P", "chat_id": chat, "seq": seq, "type": type_, "ts": ts,
            "run_id": f"run-{chat}",
        }  # fmt: skip

    # Inserted out of order; z and y are last by id but first in time.
    docs = [
        doc("b", 1, "tool.called"),
        doc("a", 5, "tool.result"),
        doc("a", 4, "tool.called"),
        doc("c", 2, "tool.result"),
        doc("z", 9, "tool.called", before),
        doc("zz", 1, "tool.result", before),
        doc("b", 200, "message.agent"),
        doc("z", 10, "message.agent"),
    ]
    events = db["merged"]
    await events.insert_many(docs)
    await events.create_index([("chat_id", 1), ("seq", 1)], name="chat_seq")  # as the log has

    async def ids(f: AuditFilter, after: dict[str, Any] | None = None, limit: int | None = None) -> list[str]:
        position = Position.of(after) if after is not None else None
        return [d["_id"] async for d in find_records(events, f, after=position, limit=limit)]

    both = ("tool.called", "tool.result")
    f = AuditFilter(app_id="P", types=both)
    a4, z9 = docs[2], docs[4]
    assert await ids(f) == ["z9", "zz1", "a4", "a5", "b1", "c2"]
    assert await ids(f, a4, limit=2) == ["a5", "b1"]
    # A cursor at the window's start or before it, or at its end: nothing outside the window.
    assert await ids(AuditFilter(app_id="P", types=both, since=at), a4) == ["a5", "b1", "c2"]
    assert await ids(AuditFilter(app_id="P", types=both, since=at), z9) == ["a4", "a5", "b1", "c2"]
    earlier = {"ts": before - timedelta(milliseconds=1), "chat_id": "z", "seq": 0}
    assert await ids(AuditFilter(app_id="P", types=both, since=at), earlier) == ["a4", "a5", "b1", "c2"]
    assert await ids(AuditFilter(app_id="P", types=both, until=at), z9) == ["zz1"]
    assert await ids(AuditFilter(app_id="P", types=both, until=at), a4) == []
    # Every app's log is read in chat order, inside the window, after the cursor.
    assert await ids(AuditFilter(types=("tool.called",), since=at)) == ["a4", "b1"]
    assert await ids(AuditFilter(types=("tool.called",), until=at)) == ["z9"]
    assert await ids(AuditFilter(types=("tool.called",)), a4) == ["b1", "z9"]
    assert await ids(AuditFilter(types=both), a4) == ["a5", "b1", "c2", "z9", "zz1"]
    # One chat or one run: its other conditions and the window hold too, a time without a zone is
    # UTC and one with another offset its instant; a cursor of another chat starts it over or ends it.
    assert await ids(AuditFilter(chat_id="a", types=("tool.called",))) == ["a4"]
    assert await ids(AuditFilter(run_id="run-a", types=("tool.result",))) == ["a5"]
    start_of_a = {"ts": at, "chat_id": "a", "seq": 0}
    assert await ids(AuditFilter(chat_id="a", types=("tool.called",)), start_of_a) == ["a4"]
    assert await ids(AuditFilter(run_id="run-a", types=("tool.called",)), start_of_a) == ["a4"]
    assert await ids(AuditFilter(chat_id="z", since=at.replace(tzinfo=None))) == ["z10"]
    assert await ids(AuditFilter(chat_id="z", until=at.replace(tzinfo=None))) == ["z9"]
    plus_two = at.astimezone(timezone(timedelta(hours=2)))
    assert await ids(AuditFilter(app_id="P", types=both, since=plus_two)) == ["a4", "a5", "b1", "c2"]
    assert await ids(AuditFilter(chat_id="b"), a4) == ["b1", "b200"]
    assert await ids(AuditFilter(chat_id="b"), docs[3]) == []  # c2: after chat b


def test_a_cursor_out_of_range_or_cut_is_refused_naming_it_and_every_valid_one_is_read_back() -> None:
    def cursor(*fields: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(list(fields)).encode()).decode().rstrip("=")

    for position in (Position(0, "c", 0), Position(1, "c", 200), Position(1, "c" * 7, 2**62 - 1)):
        assert Position.decode(position.encode()) == position
    for bad in (cursor(1, "c", -1), cursor(1, "c", 2**62), cursor(10**17, "c", 1), cursor(1, "c")[:-3]):
        with pytest.raises(BadCursor) as refused:
            Position.decode(bad + "x" * 40)  # cut or lengthened: quoted to 40 characters
        assert str(refused.value) == (
            f"cursor {(bad + 'x' * 40)[:40]!r} is not one this server issued; start again without it"
        )
        with pytest.raises(BadCursor):
            Position.decode(bad)


def _stages(plan: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = [plan]
    for key in ("inputStage", "outerStage", "innerStage"):
        if isinstance(plan.get(key), Mapping):
            found += _stages(plan[key])
    for child in plan.get("inputStages", ()):
        found += _stages(child)
    return found


async def test_every_documented_filter_is_served_by_an_index(
    store: MongoEventStore, db: AsyncDatabase[Any]
) -> None:
    await write_chats(store, 4)
    last = await db["events"].find_one({"app_id": "P"}, sort=[("ts", -1)])
    assert last is not None
    after = Position.of(last)
    # Each filter with the index that serves it: the one whose prefix holds its equalities.
    documented = [
        (AuditFilter(app_id="P"), "app_time"),
        (AuditFilter(app_id="P", types=("llm.call",)), "app_type_time"),
        (AuditFilter(app_id="P", types=("llm.call", "tool.called")), "app_type_time"),
        (AuditFilter(app_id="P", agent="Writer"), "app_agent_time"),
        (AuditFilter(app_id="P", workflow="Alpha"), "app_workflow_time"),
        (AuditFilter(app_id="P", user_id="u1"), "app_user_time"),
        (AuditFilter(app_id="P", user_id="u1", visible=True), "app_user_time"),
        (AuditFilter(app_id="P", chat_id="chat-00"), "chat_seq"),
        (AuditFilter(app_id="P", run_id="run-00-0"), "run_chat_seq"),
        (AuditFilter(app_id="P", since=last["ts"]), "app_time"),
        (AuditFilter(app_id="P", until=last["ts"]), "app_time"),
        (AuditFilter(types=("llm.call",)), "chat_seq"),  # the CLI's export of every app
    ]
    for f, index in documented:
        reads = [
            (query, plan)
            for position in (None, after)
            for plan in plans(f, position)
            for query in plan.queries
        ]
        for query, plan in reads:
            explained = await db["events"].find(query, sort=plan.sort, hint=plan.hint).explain()
            stages = _stages(explained["queryPlanner"]["winningPlan"])
            names = [stage.get("stage") for stage in stages]
            assert "COLLSCAN" not in names, (f, query, names)
            # The server's choice, where no plan names one.
            scans = [stage["indexName"] for stage in stages if stage.get("stage") == "IXSCAN"]
            assert scans == [index], (f, query, scans)


# ---- tail anchors -------------------------------------------------------------------------------


def audit(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`mozaiks audit ARGS` run in this process (see tests.cli.invoke)."""
    from app.cli.audit import audit_group

    return invoke(audit_group, *args, env=env)


def mozaiks(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`mozaiks ARGS` as its own process, through the command's entry point."""
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


async def wait_anchored(db: AsyncDatabase[Any], chat_ids: list[str], store: MongoEventStore) -> None:
    """Until each chat's head (its terminal record) is anchored."""
    async with asyncio.timeout(60):
        while True:
            heads = {c: await store.last_seq(c) for c in chat_ids}
            anchored = {
                c: await db["chain_anchors"].find_one({"chat_id": c, "seq": s}) for c, s in heads.items()
            }
            if all(anchored.values()):
                return
            await asyncio.sleep(0.05)


async def test_a_removed_tail_a_deleted_chat_and_an_edited_anchor_are_reported(
    secured: Any, store: MongoEventStore, db: AsyncDatabase[Any], mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    await write_chats(store, 8)
    chats = [f"chat-{i:02d}" for i in range(8)]
    # Every chat ends with run.completed: the writer anchors it without waiting for its interval.
    await wait_anchored(db, chats, store)
    env = {"DATABASE_URI": mongo_uri, "MOZAIKS_DB": db_name, "MOZAIKS_AUTH_SECRET": SECRET}
    # The first command runs as its own process through the entry point; the rest run the same
    # command group in this process (no interpreter start-up and imports each time).
    clean = mozaiks("audit", "verify", env=env)
    assert clean.returncode == 0, clean.stderr
    assert "every chain intact" in " ".join(clean.stderr.split())

    kept_apart = tmp_path / "anchors.ndjson"
    kept_apart.write_text(audit("anchors", "export", "--app", "P", env=env).stdout)

    truncated, deleted, edited, unanchored = "chat-00", "chat-02", "chat-04", "chat-06"  # all of app P
    head = await store.last_seq(truncated)
    await db["events"].delete_many({"chat_id": truncated, "seq": {"$gt": head - 3}})
    await db["events"].delete_many({"chat_id": deleted})
    anchor = await db["chain_anchors"].find_one({"chat_id": edited}, sort=[("n", -1)])
    assert anchor is not None
    await db["chain_anchors"].update_one({"_id": anchor["_id"]}, {"$set": {"seq": anchor["seq"] + 5}})
    # A tail removed together with the anchors that vouch for it: only the exported copy knows.
    await db["events"].delete_one({"chat_id": unanchored, "seq": await store.last_seq(unanchored)})
    removed = [a["_id"] async for a in db["chain_anchors"].find({"chat_id": unanchored})]
    await db["chain_anchors"].delete_many({"chat_id": unanchored})

    auditor = bearer("auditor", "P", ("auditor",))
    async with httpx.AsyncClient(base_url=secured.url) as http:
        cut = (await http.get(f"/api/chats/{truncated}/verify", headers=auditor)).json()
        assert cut["ok"] is False and cut["broken_seq"] == head - 2 and cut["anchored_seq"] == head
        assert "removed from its end" in cut["detail"]
        gone = await http.get(f"/api/chats/{deleted}/verify", headers=auditor)
        assert gone.status_code == 200 and gone.json()["ok"] is False
        assert "deleted" in gone.json()["detail"]
        forged = (await http.get(f"/api/chats/{edited}/verify", headers=auditor)).json()
        assert forged["ok"] is False and "signature" in forged["detail"]
        intact = (
            await http.get("/api/chats/chat-01/verify", headers=bearer("auditor", "Q", ("auditor",)))
        ).json()
        assert intact["ok"] is True and intact["anchored_seq"] == await store.last_seq("chat-01")
        # The chat's user gets a 404 for a deleted chat: only auditors learn of anchors.
        assert (await http.get(f"/api/chats/{deleted}/verify", headers=bearer("u2", "P"))).status_code == 404

    broken = audit("verify", "--app", "P", env=env)
    assert broken.returncode == 1
    out = " ".join(broken.stderr.split())
    assert re.search(rf"{truncated} │ {head - 2} │ {head} │", out), out
    assert deleted in out and "deleted" in out
    assert f"P#{anchor['n']}" in out and "signature does not match" in out
    assert "chat-01" not in out  # app Q is not part of this check
    assert unanchored not in out  # without its anchors, the database alone cannot tell
    checked = audit("verify", "--app", "P", "--anchors", str(kept_apart), env=env)
    against = " ".join(checked.stderr.split())
    assert checked.returncode == 1 and re.search(rf"{unanchored} │ \d+ │ \d+ │ the log ends", against), (
        against
    )
    assert all(f"{anchor_id} " in against or f"{anchor_id} of" in against for anchor_id in removed), against
    assert "not in the database" in against
    other = audit("verify", "--app", "Q", env=env)
    assert other.returncode == 0, other.stderr

    export = audit("export", "--app", "P", "--type", "llm.call", env=env)
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert (
        lines
        and {line["type"] for line in lines} == {"llm.call"}
        and {line["app_id"] for line in lines} == {"P"}
    )
    told = " ".join(export.stderr.split())
    assert export.returncode == 1 and truncated in told and "verification FAILED (the exported chats" in told
    assert deleted not in told  # only the exported chats are checked, and the deleted one has no records
    # A whole app's export checks the chains as the records stream past: the same findings.
    whole = audit("export", "--app", "P", env=env)
    told = " ".join(whole.stderr.split())
    assert whole.returncode == 1 and re.search(rf"{truncated} │ {head - 2} │ {head} │", told), told
    assert deleted in told and "deleted" in told and "signature does not match" in told
    assert len(whole.stdout.splitlines()) == await db["events"].count_documents({"app_id": "P"})
    intact_app = audit("export", "--app", "Q", env=env)
    assert intact_app.returncode == 0 and "every chain intact" in " ".join(intact_app.stderr.split())
    anchors = audit("anchors", "export", "--app", "Q", env=env)
    exported = [json.loads(line) for line in anchors.stdout.splitlines()]
    assert exported and all(a["app_id"] == "Q" for a in exported) and "sig" in exported[0]


async def test_verifying_one_app_reads_that_apps_chats_and_anchors_only_and_says_how_many(
    store: MongoEventStore, db: AsyncDatabase[Any]
) -> None:
    await write_chats(store, 6)  # chat-00, -02, -04 are app P's; chat-01, -03, -05 app Q's
    book = AnchorBook(db, derive_key(SECRET))
    await book.ensure_indexes()
    heads = []
    for i in range(6):
        last = [r async for r in store.read(f"chat-{i:02d}")][-1]
        heads.append(Head(app_id=APPS[i % 2], chat_id=last.chat_id, seq=last.seq, hash=last.hash))
    assert await book.append(heads) == 6
    exported = [doc async for doc in book.documents()]  # both apps' anchors, kept apart
    # App P's chat-00 loses its last record: P's verification finds it, Q's is not concerned.
    await db["events"].delete_one({"chat_id": "chat-00", "seq": heads[0].seq})
    q_records = await db["events"].count_documents({"app_id": "Q"})

    q = await store.verify_all(book, app_id="Q", exported=exported)
    assert (q.app_id, q.chats, q.records, q.anchors) == ("Q", 3, q_records, 3)
    assert q.ok, (q.broken, q.anchor_problems)
    p = await store.verify_all(book, app_id="P", exported=exported)
    assert (p.chats, p.records, p.anchors) == (3, await db["events"].count_documents({"app_id": "P"}), 3)
    assert [v.chat_id for v in p.broken] == ["chat-00"] and not p.anchor_problems
    # The whole log, and a few chats of it.
    everything = await store.verify_all(book, exported=exported)
    assert (everything.chats, everything.anchors, [v.chat_id for v in everything.broken]) == (
        6,
        6,
        ["chat-00"],
    )
    some = await store.verify_all(book, chat_ids={"chat-01", "chat-02"})
    assert (some.chats, some.ok) == (2, True)


async def test_a_head_resealed_on_its_real_predecessor_a_chain_broken_before_its_anchor_and_a_deleted_chat(
    store: MongoEventStore, db: AsyncDatabase[Any]
) -> None:
    # The chain alone cannot see a head record re-sealed on its real predecessor: its anchor can. A
    # chain broken before the anchored seq is reported where it breaks (not as a removed tail), and
    # an anchored chat gone from the log is broken from seq 1.
    await write_chats(store, 3)  # chat-00 and chat-02 are app P's, chat-01 app Q's
    book = AnchorBook(db, derive_key(SECRET))
    await book.ensure_indexes()
    chats = {i: [r async for r in store.read(f"chat-{i:02d}")] for i in range(3)}
    heads = [
        Head(app_id=APPS[i % 2], chat_id=f"chat-{i:02d}", seq=rs[-1].seq, hash=rs[-1].hash)
        for i, rs in chats.items()
    ]
    assert await book.append(heads) == 3
    last, before = chats[0][-1], chats[0][-2]
    forgery = Pending(event=MessageAgent(content="forged"), agent=last.agent, id=last.id)
    await db["events"].replace_one({"_id": last.id}, seal(ref(0), forgery, last.seq, before.hash, last.ts))
    await db["events"].delete_many({"chat_id": "chat-01"})
    await db["events"].update_one({"_id": chats[2][1].id}, {"$set": {"data.content": "edited"}})
    await db["events"].delete_one({"_id": chats[2][-1].id})

    result = await store.verify_all(book)
    verdicts = {v.chat_id: v for v in result.broken}
    assert sorted(verdicts) == ["chat-00", "chat-01", "chat-02"] and not result.anchor_problems
    rewritten, deleted, broken = verdicts["chat-00"], verdicts["chat-01"], verdicts["chat-02"]
    assert [v.ok for v in (rewritten, deleted, broken)] == [False, False, False]  # false, not just falsy
    assert (rewritten.broken_seq, rewritten.anchored_seq, rewritten.last_seq) == (
        last.seq,
        last.seq,
        last.seq,
    )
    anchor = await book.latest("chat-00")
    assert anchor is not None
    assert rewritten.detail == (
        f"record seq {last.seq} is not the one anchored (seq {last.seq} was anchored in "
        f"{anchor.describe()}): the chat was rewritten"
    )
    assert (deleted.broken_seq, deleted.anchored_seq, deleted.checked) == (1, chats[1][-1].seq, 0)
    assert "the log has no records of this chat" in str(deleted.detail), deleted
    assert (broken.broken_seq, broken.anchored_seq, broken.detail) == (
        2,
        chats[2][-1].seq,
        "hash does not match the record's content",
    )


def described(doc: Mapping[str, Any]) -> str:
    return msgspec.convert(dict(doc), Anchor).describe()


async def test_each_fault_of_the_anchor_chains_and_of_a_copy_kept_apart_is_named(
    db: AsyncDatabase[Any],
) -> None:
    # What a verification tells an auditor about the anchors themselves, each naming its anchor: one
    # that cannot be read, numbers missing from an app's chain, one that does not chain to the one
    # before, an edited one; of a copy kept apart: an unreadable one, one signed with another key,
    # one deleted from the database, one that differs; and which anchor is then each chat's latest.
    key = derive_key(SECRET)
    book = AnchorBook(db, key)
    await book.ensure_indexes()
    heads = [
        Head(app_id=app, chat_id=f"{app}-{i}", seq=i, hash=f"h{i}")
        for app, n in (("E", 1), ("G", 4), ("L", 2), ("M", 3))
        for i in range(1, n + 1)
    ]
    assert await book.append(heads) == 10
    exported = {doc["_id"]: doc async for doc in book.documents()}
    assert await book.append([Head(app_id="G", chat_id="G-1", seq=7, hash="h7")]) == 1  # G#5, newer
    anchors = db["chain_anchors"]
    await anchors.update_one({"_id": "M#1"}, {"$unset": {"sig": ""}})
    await anchors.delete_many({"_id": {"$in": ["G#2", "G#3"]}})
    relinked = {**exported["L#2"], "prev_sig": "0" * 64}
    relinked["sig"] = signature(key, "L", 2, "L-2", 2, "h2", relinked["ts"], relinked["prev_sig"])
    await anchors.replace_one({"_id": "L#2"}, relinked)
    await anchors.update_one({"_id": "E#1"}, {"$set": {"seq": 9}})
    edited = {**exported["E#1"], "seq": 9}

    scan = await book.scan()
    assert scan.count == 9
    assert scan.problems == [
        f"{described(edited)} (chat E-1): signature does not match: edited, or signed with another key",
        "anchors G#2..#3 are missing",
        f"{described(relinked)} does not chain to L#1",
        "anchor 'M#1' is malformed",
        "anchors M#1..#1 are missing",
    ]
    assert sorted(scan.latest) == ["G-1", "G-4", "L-1", "L-2", "M-2", "M-3"]

    scan.compare([{"_id": "X#1"}, edited, exported["G#2"], exported["L#2"], exported["G#1"]], key)
    assert scan.problems[5:] == [
        "exported anchor 'X#1' is malformed",
        f"exported {described(edited)}: signature does not match this key",
        f"{described(exported['G#2'])} (chat G-2, seq 2) is in the exported file but not in the database: "
        "anchors were deleted",
        f"{described(exported['L#2'])} differs from the exported copy",
    ]
    # The deleted anchor counts again; the database's anchor stays a chat's latest against an older
    # copy, or a copy of the same number.
    assert (scan.latest["G-2"].n, scan.latest["G-1"].n, scan.latest["L-2"].sig) == (2, 5, relinked["sig"])


async def test_a_chats_own_verify_names_an_edited_anchor_after_what_its_chain_shows(
    store: MongoEventStore, db: AsyncDatabase[Any]
) -> None:
    await write_chats(store, 2)  # chat-00 of app P, chat-01 of app Q
    book = AnchorBook(db, derive_key(SECRET))
    await book.ensure_indexes()
    lasts = [[r async for r in store.read(f"chat-{i:02d}")][-1] for i in range(2)]
    await book.append(
        Head(app_id=APPS[i], chat_id=r.chat_id, seq=r.seq, hash=r.hash) for i, r in enumerate(lasts)
    )
    await db["chain_anchors"].update_many({}, {"$set": {"hash": "0" * 64}})  # both anchors edited
    await db["events"].update_one({"chat_id": "chat-01", "seq": 2}, {"$set": {"data.content": "edited"}})
    told = []
    for i in range(2):
        auditor = Principal(user_id="auditor", app_id=APPS[i], roles=frozenset({"auditor"}))
        verdict = await verify_chat(store, book, auditor, f"chat-{i:02d}")
        anchor = await book.latest(f"chat-{i:02d}")
        assert anchor is not None and not verdict.ok
        told.append((verdict.broken_seq, verdict.detail, anchor.describe()))
    (intact_seq, intact, first), (broken_seq, broken, second) = told
    assert intact_seq is None
    assert intact == f"{first} has a bad signature (edited, or signed with another key)"
    assert broken_seq == 2
    assert (
        broken
        == f"hash does not match the record's content; {second} has a bad signature (edited, or signed with another key)"
    )


async def test_verifying_the_log_checks_each_forks_anchor_in_its_parent_the_logs_last_chat_included(
    store: MongoEventStore,
) -> None:
    # `z-fork` is the log's last chat in chat order: no later chat closes its check before the forks'.
    parent = StreamRef(chat_id="a-parent", app_id="P", user_id="u0", workflow="Alpha")
    said = await store.append(
        parent, [Pending(event=ChatCreated()), Pending(event=MessageUser(content="hi"))], 0
    )
    fork = StreamRef(chat_id="z-fork", app_id="P", user_id="u0", workflow="Alpha")
    anchor = ForkedFrom(chat_id="a-parent", seq=2, hash=said[1].hash)
    await store.append(
        fork, [Pending(event=ChatCreated(forked_from=anchor)), Pending(event=MessageUser(content="and?"))], 0
    )
    intact = await store.verify_all(None)
    assert (intact.ok, intact.forks, intact.chats, intact.anchors) == (True, 1, 2, 0)
    await store.events.update_one({"chat_id": "a-parent", "seq": 2}, {"$set": {"data.content": "forged"}})
    result = await store.verify_all(None)
    assert [(v.chat_id, v.broken_seq) for v in result.broken] == [("a-parent", 2), ("z-fork", 1)]
    assert "forked_from chat a-parent seq 2" in str(result.broken[1].detail), result.broken[1]


async def test_verifying_an_app_checks_its_interleaved_chats_and_reports_progress_over_its_records(
    store: MongoEventStore,
) -> None:
    # Four chats of two apps written turn by turn, so their records alternate in the log.
    for turn in range(3):
        for i in range(4):
            event = ChatCreated() if turn == 0 else MessageUser(content=f"turn {turn}")
            await store.append(ref(i), [Pending(event=event)], None)
    seen: list[tuple[int, int]] = []
    result = await verify_log(
        store.events, None, app_id="P", progress=lambda done, total: seen.append((done, total)), batch_size=2
    )
    assert (result.ok, result.chats, result.records) == (True, 2, 6), result
    # Every `batch_size` records, out of app P's 6 (not the whole log's 12), then the end.
    assert seen == [(2, 6), (4, 6), (6, 6), (6, 6)]


def test_anchors_signed_by_this_version_verify_in_the_next_the_key_and_signature_are_fixed(
    local_clock_far_from_utc: None,
) -> None:
    # Known answers: a change to the key's derivation or to what is signed would turn every anchor
    # already stored into a "bad signature". Time is signed as UTC epoch milliseconds (a naive time
    # is UTC, an aware one its instant, microseconds cut), and an anchor names its time in UTC (the
    # host's clock set 14 h from it here).
    key = derive_key(SECRET)
    assert key.hex() == "9d8a3683d207836fa2a78c17b74fe08ada33e616fcd48f6d109eb254fd15af70"
    at = datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC)
    expected = "6034841099c809951cc6723fff6a4ce067d7e59ac32651aa071c8671301b1ebd"
    for ts in (
        at,
        at.replace(tzinfo=None),
        at.astimezone(timezone(timedelta(hours=2))),
        at.replace(microsecond=123999),
    ):
        assert signature(key, "P", 12, "chat-00", 7, "h" * 64, ts, "0" * 64) == expected, ts
    anchor = Anchor(
        id="P#12", app_id="P", n=12, chat_id="chat-00", seq=7, hash="h" * 64,
        ts=at.astimezone(timezone(timedelta(hours=2))), prev_sig="0" * 64, sig=expected,
    )  # fmt: skip
    assert anchor.signed_by(key) and anchor.describe() == "anchor P#12 of 2026-12-01T10:00:00.123456Z"


async def test_anchors_are_written_durably_numbered_once_per_app_and_read_newest_first_and_in_order(
    mongo_uri: str, db: AsyncDatabase[Any]
) -> None:
    # An anchor vouches for a chat only if it survives a crash (sent majority-acknowledged and
    # journaled: the wire shows it), if no app can hold two anchors of one number (the unique guard
    # that chains concurrent writers), and if a chat's check reads its newest anchor.
    listener = InsertsInFlight(ANCHORS, lambda: None)
    client: AsyncMongoClient[Any] = AsyncMongoClient(mongo_uri, event_listeners=[listener])
    try:
        book = AnchorBook(client[db.name], derive_key(SECRET))
        await book.ensure_indexes()
        indexes = await book.anchors.index_information()
        assert indexes["app_n"]["key"] == [("app_id", 1), ("n", 1)] and indexes["app_n"].get("unique") is True
        assert indexes["chat_n"]["key"] == [("chat_id", 1), ("n", -1)]
        # App Q's anchors are written before app P's, and chat q-1 is anchored three times.
        for seq in (3, 5, 8):
            await book.append([Head(app_id="Q", chat_id="q-1", seq=seq, hash=f"h{seq}")])
        await book.append([Head(app_id="P", chat_id=f"p-{i}", seq=2, hash="h2") for i in range(2)])
        assert listener.write_concerns and all(
            concern == {"w": "majority", "j": True} for concern in listener.write_concerns
        )
        with pytest.raises(DuplicateKeyError):  # a second anchor Q#1, as a rival writer would try
            await book.anchors.insert_one({"_id": "rival", "app_id": "Q", "n": 1})
        newest = await book.latest("q-1")
        assert newest is not None and (newest.n, newest.seq) == (3, 8)
        listed = [(doc["app_id"], doc["n"]) async for doc in book.documents()]
        assert listed == [("P", 1), ("P", 2), ("Q", 1), ("Q", 2), ("Q", 3)]
        assert [(doc["app_id"], doc["n"]) async for doc in book.documents("Q")] == [
            ("Q", 1),
            ("Q", 2),
            ("Q", 3),
        ]
        # A rival writer anchoring the same app between this writer's read of the last anchor and
        # its insert takes the next number: this writer's anchors are re-chained after the rival's.
        rival = AnchorBook(client[db.name], derive_key(SECRET))
        read_last = book.anchors.find_one
        raced = False

        async def rival_writes_after_the_read(*args: Any, **kwargs: Any) -> Any:
            nonlocal raced
            last = await read_last(*args, **kwargs)
            if not raced:
                raced = True
                await rival.append([Head(app_id="R", chat_id="r-rival", seq=1, hash="h1")])
            return last

        book.anchors.find_one = rival_writes_after_the_read  # type: ignore[method-assign]
        heads = [Head(app_id="R", chat_id=f"r-{i}", seq=4, hash="h4") for i in range(2)]
        assert await book.append(heads) == 2 and raced
        book.anchors.find_one = read_last  # type: ignore[method-assign]
        assert [(doc["n"], doc["chat_id"]) async for doc in book.documents("R")] == [
            (1, "r-rival"),
            (2, "r-0"),
            (3, "r-1"),
        ]
        assert (await book.scan("R")).problems == []
        listed = [(doc["app_id"], doc["n"]) async for doc in book.documents()]
        # Restored from a backup in another order (newest first), they are read in the same order,
        # and the chains check out: numbered without a gap, each linked to the one before.
        stored = [doc async for doc in book.anchors.find({})]
        await book.anchors.delete_many({})
        await book.anchors.insert_many(
            sorted(stored, key=lambda doc: (doc["app_id"], doc["n"]), reverse=True)
        )
        assert [(doc["app_id"], doc["n"]) async for doc in book.documents()] == listed
        assert (await book.scan()).problems == []
        newest = await book.latest("q-1")
        assert newest is not None and (newest.n, newest.seq) == (3, 8)
    finally:
        await client.close()
