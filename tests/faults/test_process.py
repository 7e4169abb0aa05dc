"""kill -9 of a real `mozaiks serve` OS process running a chat, while a second process serves its clients."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from app.embedded import free_port
from domain.store import MongoEventStore
from tests.faults.checks import (
    assert_chat_sound,
    assert_client_saw_the_log,
    records_of,
    run_end,
    wait_for,
    waiting_for_input,
)
from tests.faults.report import Report
from tests.faults.server import FaultServer
from tests.test_serve import serve, wait_ready


def start_serve(
    folder: Path, server: FaultServer, store: MongoEventStore, name: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    folder.mkdir()
    process = serve(
        folder,
        "--port",
        str(port),
        DATABASE_URI=server.uri_for(f"mz-{name}"),
        MOZAIKS_DB=store.db.name,
        MOZAIKS_LEASE_TTL_S="2",
    )
    wait_ready(port, process, within_s=60)
    return process, f"127.0.0.1:{port}"


async def test_kill_9_of_the_serve_process_running_a_chat(
    fault_server: FaultServer, fault_store: MongoEventStore, report: Report, tmp_path: Path
) -> None:
    name = "serve process kill -9"
    (first, first_addr), (second, second_addr) = await asyncio.gather(  # both start up at once
        asyncio.to_thread(start_serve, tmp_path / "a", fault_server, fault_store, "a"),
        asyncio.to_thread(start_serve, tmp_path / "b", fault_server, fault_store, "b"),
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://{first_addr}", timeout=60) as http_a:
            created = await http_a.post("/api/chats", json={"workflow": "Assistant", "message": "Find bees"})
            chat_id = str(created.json()["chat_id"])
        await wait_for(fault_store, chat_id, waiting_for_input)
        lease = await fault_store.db["chat_leases"].find_one({"_id": chat_id})
        assert lease is not None and lease["owner"].endswith(f":{first.pid}")
        seen: list[int] = []
        async with connect(f"ws://{second_addr}/ws/chats/{chat_id}?after=0") as ws:
            first.send_signal(signal.SIGKILL)  # no shutdown: the run's node is simply gone
            first.wait(30)
            async with asyncio.timeout(60):
                while True:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "event":
                        seen.append(frame["seq"])
                        if frame["event"]["type"] == "run.failed":
                            break
        records = await records_of(fault_store, chat_id)
        failed = records[-1]
        assert (
            failed.type == "run.failed"
            and failed.data["reason"] == "interrupted"
            and run_end(records) == "run.failed"
        )
        assert_client_saw_the_log(seen, records)
        async with httpx.AsyncClient(base_url=f"http://{second_addr}", timeout=60) as http_b:
            sound = await assert_chat_sound(http_b, fault_store, chat_id)
        started = [r for r in await records_of(fault_store, chat_id) if r.type == "run.started"]
        assert started[-1].data["node"].endswith(f":{second.pid}")  # the second process ran the next message
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(process.wait, 30)
    report.record(name, 1, sound, {"lease TTL s": 2})
