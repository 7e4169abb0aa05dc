"""Every run.started gets exactly one terminal record, and it is the run's last; no chat stays wedged."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from domain.events import InputRequested, MessageUser, Pending, RunCompleted, RunFailed, RunStarted, StreamRef
from domain.store import MongoEventStore
from tests.faults.checks import check_log, drive_to_end, records_of, run_end, wait_for, waiting_for_input


def stream(chat_id: str, workflow: str = "Analyzer") -> StreamRef:
    return StreamRef(chat_id=chat_id, app_id="local", user_id="local", workflow=workflow)


async def orphan(store: MongoEventStore, chat_id: str, run_id: str) -> None:
    """A chat whose run started and then lost its node and its lease, with no terminal record."""
    await store.append(stream(chat_id), [Pending(event=MessageUser(content="hi"))], 0)
    await store.append(
        stream(chat_id), [Pending(event=RunStarted(pattern="RoundRobin", max_turns=8), run_id=run_id)], 1
    )


async def test_finish_run_records_one_terminal_even_when_two_writers_race(store: MongoEventStore) -> None:
    await orphan(store, "race", "r1")
    finishes = [
        store.finish_run(
            stream("race"),
            "r1",
            [Pending(event=RunFailed(error=f"writer {n}", reason="interrupted"), run_id="r1")],
        )
        for n in range(4)
    ]
    ends = await asyncio.gather(*finishes)
    assert len({end.id for end in ends}) == 1
    again = await store.finish_run(stream("race"), "r1", [Pending(event=RunCompleted(), run_id="r1")])
    assert again.id == ends[0].id and again.type == "run.failed"
    records = await records_of(store, "race")
    assert [r.type for r in records] == ["message.user", "run.started", "run.failed"]
    check_log(records)


async def test_a_run_with_no_lease_and_no_end_never_blocks_the_chat(
    start_node: Any, store: MongoEventStore
) -> None:
    await orphan(store, "wedged", "r-lost")
    node = await start_node()
    async with httpx.AsyncClient(base_url=node.url) as http:
        sent = await http.post("/api/chats/wedged/messages", json={"message": "still there?"})
        assert sent.status_code == 202 and sent.json()["recorded"] == "message.user", sent.text
        assert await drive_to_end(http, store, "wedged", runs=2) == "run.completed"
    records = await records_of(store, "wedged")
    lost = next(r for r in records if r.run_id == "r-lost" and r.type == "run.failed")
    assert lost.data["reason"] == "interrupted"
    check_log(records)


async def test_the_sweep_records_a_run_that_lost_its_lease(start_node: Any, store: MongoEventStore) -> None:
    await start_node(lease_ttl_s=0.6)  # its projections see the run as going; its sweep finds no lease
    await orphan(store, "swept", "r-gone")
    records = await wait_for(store, "swept", lambda rs: run_end(rs) is not None, timeout=60)
    assert records[-1].type == "run.failed"
    assert records[-1].data == {"error": "the run lost its lease", "reason": "interrupted"}
    check_log(records)


async def test_words_to_a_chat_whose_run_lost_its_node_record_why_that_run_ended(
    start_node: Any, store: MongoEventStore
) -> None:
    # It sweeps every 300 s: once its first sweep is over, only the words can find the run.
    node = await start_node(lease_ttl_s=600)
    async with asyncio.timeout(30):
        while node.runtime.supervisor._sweeps < 1:
            await asyncio.sleep(0.05)
    await orphan(store, "quiet", "r-quiet")
    async with httpx.AsyncClient(base_url=node.url) as http:
        sent = await http.post("/api/chats/quiet/messages", json={"message": "anyone there?"})
        assert sent.status_code == 202 and sent.json()["recorded"] == "message.user", sent.text
        assert await drive_to_end(http, store, "quiet", runs=2) == "run.completed"
    records = await records_of(store, "quiet")
    lost = next(r for r in records if r.run_id == "r-quiet" and r.type == "run.failed")
    assert lost.data == {"error": "the run's node stopped holding its lease", "reason": "interrupted"}
    check_log(records)


@pytest.mark.usefixtures("local_clock_far_from_utc")  # a sweep reads expiry in UTC, whatever the zone
async def test_a_run_outliving_its_lease_ttl_renews_the_lease_and_no_sweep_interrupts_it(
    start_node: Any, store: MongoEventStore, db: Any
) -> None:
    node = await start_node(lease_ttl_s=1.2)
    await start_node(lease_ttl_s=1.2)  # another node, sweeping for expired leases
    async with httpx.AsyncClient(base_url=node.url) as http:
        created = await http.post("/api/chats", json={"workflow": "Assistant", "message": "bees"})
        chat_id = created.json()["chat_id"]
        await wait_for(store, chat_id, waiting_for_input)
        first = await db["chat_leases"].find_one({"_id": chat_id})
        assert first is not None
        # Until the run has outlived its first lease twice over: a sweep that took the lease over
        # (its own node's included) would push the expiry one TTL past the takeover only, then
        # record the run as interrupted and delete the lease.
        async with asyncio.timeout(30):
            while True:
                lease = await db["chat_leases"].find_one({"_id": chat_id})
                assert lease is not None and (lease["owner"], lease["run_id"]) == (
                    first["owner"],
                    first["run_id"],
                )
                if lease["expires_at"] > first["expires_at"] + timedelta(seconds=2.4):
                    break
                await asyncio.sleep(0.05)
        assert waiting_for_input(await records_of(store, chat_id))
        assert await drive_to_end(http, store, chat_id) == "run.completed"
    check_log(await records_of(store, chat_id))


async def test_two_nodes_sweeping_one_expired_lease_record_one_interruption(
    start_node: Any, store: MongoEventStore, db: Any
) -> None:
    await orphan(store, "twice", "r-dead")
    await db["chat_leases"].insert_one(
        {
            "_id": "twice",
            "owner": "dead",
            "run_id": "r-dead",
            "expires_at": datetime.now(UTC) - timedelta(seconds=1),
        }
    )
    await asyncio.gather(start_node(lease_ttl_s=0.4), start_node(lease_ttl_s=0.4))
    records = await wait_for(store, "twice", lambda rs: run_end(rs) is not None)
    async with asyncio.timeout(30):
        while await db["chat_leases"].count_documents({}):
            await asyncio.sleep(0.05)
    records = await records_of(store, "twice")
    assert [r.type for r in records].count("run.failed") == 1
    assert records[-1].data == {"error": "node dead stopped while running", "reason": "interrupted"}
    check_log(records)


async def test_a_sweep_records_each_lost_run_of_its_own_chat_and_counts_what_it_recorded(
    start_node: Any, store: MongoEventStore, db: Any
) -> None:
    # It sweeps every 300 s: once its first sweep is over, the sweep below is the only one.
    node = await start_node(lease_ttl_s=600)
    async with asyncio.timeout(30):
        while node.runtime.supervisor._sweeps < 1:
            await asyncio.sleep(0.05)
    leases, sessions = db["chat_leases"], db["chat_sessions"]
    expired = datetime.now(UTC) - timedelta(seconds=1)
    for chat_id in ("dead-a", "dead-b"):  # their node died holding their leases
        await orphan(store, chat_id, f"r-{chat_id}")
        await leases.insert_one(
            {"_id": chat_id, "owner": "dead", "run_id": f"r-{chat_id}", "expires_at": expired}
        )
    # An expired lease of a chat with no log (its first append never landed): removed, nothing recorded.
    await leases.insert_one({"_id": "ghost", "owner": "dead", "run_id": "r-ghost", "expires_at": expired})
    await orphan(store, "busy", "r-busy")  # running on a live node: its lease is live
    live = datetime.now(UTC) + timedelta(hours=1)
    await leases.insert_one({"_id": "busy", "owner": "alive", "run_id": "r-busy", "expires_at": live})
    await orphan(store, "lost", "r-lost")  # its node lost the lease without recording the end
    await orphan(store, "lost-waiting", "r-lost-waiting")  # the same, while it waited for input
    asked = Pending(event=InputRequested(request_id="q1"), run_id="r-lost-waiting")
    await store.append(stream("lost-waiting"), [asked], 2)
    await orphan(store, "ended", "r-ended")  # its run is over
    await store.append(stream("ended"), [Pending(event=RunCompleted(), run_id="r-ended")], 2)
    projected = [
        {"_id": "busy", "status": "running"},
        {"_id": "lost", "status": "running"},
        {"_id": "lost-waiting", "status": "waiting_input"},
        {"_id": "ended", "status": "completed"},
    ]
    async with asyncio.timeout(30):
        while await sessions.count_documents({"$or": projected}) < len(projected):
            await asyncio.sleep(0.05)
    # Projected documents that lag their log: "ended" still shown going, "vanished" with no log at all.
    await sessions.update_one({"_id": "ended"}, {"$set": {"status": "running"}})
    await sessions.insert_one({"_id": "vanished", "status": "running", "last_seq": 2})

    assert await node.runtime.supervisor.recover_expired() == 4
    for chat_id, error in (
        ("dead-a", "node dead stopped while running"),
        ("dead-b", "node dead stopped while running"),
        ("lost", "the run lost its lease"),
        ("lost-waiting", "the run lost its lease"),
    ):
        records = await records_of(store, chat_id)
        assert (records[-1].type, records[-1].run_id) == ("run.failed", f"r-{chat_id}"), chat_id
        assert records[-1].data == {"error": error, "reason": "interrupted"}, chat_id
        check_log(records)
    assert [r.type for r in await records_of(store, "ended")][-1] == "run.completed"
    assert [r.type for r in await records_of(store, "busy")] == ["message.user", "run.started"]
    assert [lease["_id"] async for lease in leases.find({})] == ["busy"]


async def test_a_stop_sent_to_another_node_is_recorded_by_the_running_node_as_the_runs_last_record(
    start_node: Any, store: MongoEventStore
) -> None:
    node_a = await start_node()
    node_b = await start_node()
    async with httpx.AsyncClient(base_url=node_a.url) as a, httpx.AsyncClient(base_url=node_b.url) as b:
        chat_id = (await a.post("/api/chats", json={"workflow": "Assistant", "message": "bees"})).json()[
            "chat_id"
        ]
        await wait_for(store, chat_id, waiting_for_input)
        stopped = await b.post(f"/api/chats/{chat_id}/stop", timeout=30)
        assert stopped.status_code == 202
        # The stop answers once the run's end is in the log (node A obeyed the mark within STOP_WAIT_S).
        records = await records_of(store, chat_id)
        assert run_end(records) == "run.stopped", [r.type for r in records[-3:]]
        async with asyncio.timeout(30):
            while chat_id in node_a.runtime.supervisor.tasks:
                await asyncio.sleep(0.05)
    records = await records_of(store, chat_id)
    assert records[-1].type == "run.stopped" and records[-1].data["by"] == "local"
    started = next(r for r in records if r.type == "run.started")
    assert started.data["node"] == node_a.settings.node_id
    check_log(records)


async def test_stopping_a_run_whose_node_is_gone_records_the_stop_at_once(
    start_node: Any, store: MongoEventStore
) -> None:
    await orphan(store, "gone", "r-gone")
    node = await start_node()
    async with httpx.AsyncClient(base_url=node.url) as http:
        assert (await http.post("/api/chats/gone/stop")).status_code == 202
    records = await records_of(store, "gone")
    assert records[-1].type == "run.stopped" and records[-1].run_id == "r-gone"
    check_log(records)


async def test_stopping_a_run_whose_node_died_holding_its_lease_records_the_stop_at_once(
    start_node: Any, store: MongoEventStore, db: Any
) -> None:
    # It sweeps every 300 s: once its first sweep is over, no sweep gets to the dead lease first.
    node = await start_node(lease_ttl_s=600)
    async with asyncio.timeout(30):
        while node.runtime.supervisor._sweeps < 1:
            await asyncio.sleep(0.05)
    await orphan(store, "dead-stop", "r-dead-stop")
    await orphan(store, "finished", "r-finished")  # another chat, whose run is over: not this stop's
    await store.append(stream("finished"), [Pending(event=RunCompleted(), run_id="r-finished")], 2)
    expired = datetime.now(UTC) - timedelta(seconds=1)  # the lease is still there; its node is not
    await db["chat_leases"].insert_one(
        {"_id": "dead-stop", "owner": "dead", "run_id": "r-dead-stop", "expires_at": expired}
    )
    # (A stop that waits for a node to obey answers after STOP_WAIT_S: the client waits longer.)
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        assert (await http.post("/api/chats/dead-stop/stop")).status_code == 202
    # Recorded by the stop itself, not left as a mark on a lease nobody reads.
    records = await records_of(store, "dead-stop")
    assert (records[-1].type, records[-1].run_id) == ("run.stopped", "r-dead-stop"), [r.type for r in records]
    assert records[-1].data["by"] == "local"
    check_log(records)


@pytest.mark.usefixtures("local_clock_far_from_utc")  # the lease is live in UTC, whatever the zone
async def test_a_stop_for_a_run_on_another_live_node_marks_its_lease_and_records_nothing_itself(
    start_node: Any, store: MongoEventStore, db: Any
) -> None:
    node = await start_node()
    await orphan(store, "held", "r-held")
    live = datetime.now(UTC) + timedelta(hours=1)  # held by a live node (that never gets to obey here)
    await db["chat_leases"].insert_one(
        {"_id": "held", "owner": "elsewhere", "run_id": "r-held", "expires_at": live}
    )
    assert await node.runtime.supervisor.stop("held", "boss", wait=False) == "r-held"
    lease = await db["chat_leases"].find_one({"_id": "held"})
    assert lease is not None and lease["stop"] == {"by": "boss"}, lease
    assert [r.type for r in await records_of(store, "held")] == ["message.user", "run.started"]
