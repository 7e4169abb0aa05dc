"""File uploads on a real node and wire server: stored once per sha256 in GridFS, recorded as
`file.uploaded`, listed, downloaded, read by an agent; refusals and a failed upload leave nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from app.http.auth import issue_token
from domain.events import ChatCreated, FileUploaded, Pending, StreamRef
from domain.files import ABANDONED_AFTER, PARTIAL, READ_CHUNK, FileStore, Swept
from domain.store import MongoEventStore

SECRET = "files-test-secret-of-at-least-thirty-two-bytes"
NOTES = "Bees dance to tell the hive where flowers are.\n" * 40


def bearer(user: str, app: str = "A", roles: tuple[str, ...] = ("user",)) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, user, app, list(roles))}"}


def reader(root: Path) -> Path:
    """A one-agent workflow whose Reader calls read_uploaded_file on notes.txt, then ends the run."""
    folder = root / "Reader"
    (folder / "fixtures").mkdir(parents=True)
    (folder / "workflow.json").write_text(
        json.dumps({"name": "Reader", "visual_agents": ["Reader"], "entry_agent": "Reader", "max_turns": 4})
    )
    agent = {"name": "Reader", "tools": ["read_uploaded_file"], "handoffs": {"after_work": "terminate"}}
    (folder / "agents.json").write_text(json.dumps({"agents": [agent]}))
    tool = {"name": "read_uploaded_file", "function": "tools.uploads:read_uploaded_file"}
    (folder / "tools.json").write_text(json.dumps({"tools": [tool]}))
    script = [
        {"tool_calls": [{"name": "read_uploaded_file", "arguments": {"name": "notes.txt"}}]},
        {"content": "Read."},
    ]
    (folder / "fixtures" / "Reader.json").write_text(json.dumps(script))
    return root


async def stored(db: AsyncDatabase[Any], chat_id: str) -> tuple[int, int, int]:
    """GridFS files, GridFS chunks, and the chat's records."""
    return (
        await db["uploads.files"].count_documents({}),
        await db["uploads.chunks"].count_documents({}),
        await db["events"].count_documents({"chat_id": chat_id}),
    )


async def test_upload_list_download_dedup_an_agent_reads_it_and_refusals_leave_nothing(
    start_node: Any, store: MongoEventStore, db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    node = await start_node(workflows_path=reader(tmp_path), auth_secret=SECRET, max_upload_mb=0.05)
    ada = bearer("ada")
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        chat_id = (await http.post("/api/chats", json={"workflow": "Reader"}, headers=ada)).json()["chat_id"]
        files = {"data": ("notes.txt", NOTES.encode(), "text/plain")}
        up = await http.post(f"/api/chats/{chat_id}/files", files=files, headers=ada)
        assert up.status_code == 201, up.text
        sha = hashlib.sha256(NOTES.encode()).hexdigest()
        assert {k: up.json()[k] for k in ("sha256", "name", "size", "content_type")} == {
            "sha256": sha, "name": "notes.txt", "size": len(NOTES), "content_type": "text/plain",
        }  # fmt: skip
        # The same bytes again, under another name: one stored file, two records.
        again = await http.post(
            f"/api/chats/{chat_id}/files",
            files={"data": ("copy.txt", NOTES.encode(), "text/plain")},
            headers=ada,
        )
        assert again.status_code == 201 and again.json()["sha256"] == sha
        assert await db["uploads.files"].count_documents({"filename": sha}) == 1
        listed = (await http.get(f"/api/chats/{chat_id}/files", headers=ada)).json()["files"]
        assert [(f["name"], f["sha256"]) for f in listed] == [("notes.txt", sha), ("copy.txt", sha)]
        got = await http.get(f"/api/chats/{chat_id}/files/{sha}", headers=ada)
        assert got.status_code == 200 and got.content == NOTES.encode()
        assert (
            got.headers["content-type"] == "application/octet-stream"
            and "attachment" in got.headers["content-disposition"]
        )
        auditor = await http.get(
            f"/api/chats/{chat_id}/files/{sha}", headers=bearer("aud", "A", ("auditor",))
        )
        assert auditor.status_code == 200 and auditor.content == NOTES.encode()
        # Another app's user (even an auditor), or another user of the app: no file.
        for other in (bearer("ada", "B"), bearer("aud", "B", ("auditor",)), bearer("eve")):
            assert (await http.get(f"/api/chats/{chat_id}/files/{sha}", headers=other)).status_code in (
                403,
                404,
            )
            assert (await http.get(f"/api/chats/{chat_id}/files", headers=other)).status_code in (403, 404)
        assert (await http.get(f"/api/chats/{chat_id}/files/{'0' * 64}", headers=ada)).status_code == 404

        # An agent reads it with the built-in tool.
        sent = await http.post(
            f"/api/chats/{chat_id}/messages", json={"message": "Read my notes"}, headers=ada
        )
        assert sent.status_code == 202, sent.text
        async with asyncio.timeout(60):
            while "run.completed" not in [r.type async for r in store.read(chat_id)]:
                await asyncio.sleep(0.05)
        [result] = [r async for r in store.find(chat_id, types=["tool.result"])]
        assert result.data["tool"] == "read_uploaded_file" and not result.data["is_error"]
        assert "Bees dance to tell the hive" in result.data["content"]

        # Refusals: too large (the body limit, and the file check inside the multipart framing), a type
        # not allowed, an empty file. Each leaves nothing behind.
        before = await stored(db, chat_id)
        refusals = [
            (("big.txt", b"x" * 200_000, "text/plain"), 413, "too_large"),
            (("edge.txt", b"x" * (52_428 + 10), "text/plain"), 413, "too_large"),
            (("tool.exe", b"MZ\x90\x00", "application/x-msdownload"), 415, "unsupported_type"),
            (("empty.txt", b"", "text/plain"), 400, "bad_request"),
        ]
        for part, status, code in refusals:
            refused = await http.post(f"/api/chats/{chat_id}/files", files={"data": part}, headers=ada)
            assert refused.status_code == status, (part[0], refused.status_code, refused.text)
            assert refused.json()["error"] == code, (part[0], refused.text)
        assert "MOZAIKS_UPLOAD_TYPES" in refused.json()["detail"] or code == "bad_request"
        other_app = await http.post(
            f"/api/chats/{chat_id}/files",
            files={"data": ("n.txt", b"hi", "text/plain")},
            headers=bearer("ada", "B"),
        )
        assert other_app.status_code == 403

        # An upload the client abandons midway (the connection closes inside the body).
        _, writer = await asyncio.open_connection("127.0.0.1", node.port)
        body = b'--b\r\nContent-Disposition: form-data; name="data"; filename="cut.txt"\r\nContent-Type: text/plain\r\n\r\n'
        token = ada["Authorization"]
        head = (
            f"POST /api/chats/{chat_id}/files HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 40000\r\n\r\n"
        )
        writer.write(head.encode() + body + b"y" * 10_000)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        # The node has read what was sent before it answers the next request on another connection.
        assert (await http.get(f"/api/chats/{chat_id}/files", headers=ada)).status_code == 200
        assert await stored(db, chat_id) == before


async def test_a_write_that_fails_midway_leaves_no_chunks(db: AsyncDatabase[Any]) -> None:
    files = FileStore(db)
    sent = 0

    async def breaks(n: int) -> bytes:
        nonlocal sent
        if sent >= 3 * READ_CHUNK:
            raise OSError("the client went away")
        sent += n
        return b"z" * n

    with pytest.raises(OSError, match="went away"):
        await files.put(breaks, max_bytes=10 * READ_CHUNK)
    assert sent >= 3 * READ_CHUNK  # several chunks were written before it broke
    assert await db["uploads.files"].count_documents({}) == 0
    assert await db["uploads.chunks"].count_documents({}) == 0
    # Past the limit while streaming: refused, nothing kept either.
    sent = 0
    with pytest.raises(Exception, match="larger than"):
        await files.put(breaks, max_bytes=READ_CHUNK)
    assert await db["uploads.chunks"].count_documents({}) == 0


async def test_the_sweep_removes_a_killed_nodes_partial_write_and_unrecorded_files_once_old(
    db: AsyncDatabase[Any], store: MongoEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = FileStore(db)

    def source(data: bytes) -> Any:
        view = memoryview(data)

        async def read(n: int) -> bytes:
            nonlocal view
            piece, view = bytes(view[:n]), view[n:]
            return piece

        return read

    kept = await files.put(source(b"kept " * 100_000), max_bytes=10**7)  # recorded: never swept
    stream = StreamRef(chat_id="c", app_id="A", user_id="u", workflow="w")
    recorded = FileUploaded(sha256=kept.sha256, name="k.txt", size=kept.size, content_type="text/plain")
    await store.append(stream, [Pending(event=ChatCreated()), Pending(event=recorded)], 0)
    stray = await files.put(source(b"never recorded"), max_bytes=10**7)  # renamed, never recorded
    # A node killed midway through a GridFS write: chunks flushed (the driver buffers 32 MB unless
    # told otherwise), no files document (it is written by close), no abort.
    monkeypatch.setattr("gridfs.asynchronous.grid_file._UPLOAD_BUFFER_SIZE", 0)
    killed = files.bucket.open_upload_stream_with_id(f"{PARTIAL}killed", f"{PARTIAL}killed")
    await killed.write(b"p" * (3 * READ_CHUNK))
    assert await db["uploads.chunks"].count_documents({"files_id": f"{PARTIAL}killed"}) >= 3
    assert await db["uploads.files"].count_documents({"_id": f"{PARTIAL}killed"}) == 0
    # Killed between the close and the rename: a whole file still named partial/.
    closed = files.bucket.open_upload_stream_with_id(f"{PARTIAL}closed", f"{PARTIAL}closed")
    await closed.write(b"c" * 10)
    await closed.close()
    kept_chunks = await db["uploads.chunks"].count_documents(
        {"files_id": (await files.first(kept.sha256) or {})["_id"]}
    )

    # Young leftovers may be writes still going on (or files about to be recorded): left alone.
    assert await files.sweep(store.events) == Swept()
    assert await db["uploads.chunks"].count_documents({"files_id": f"{PARTIAL}killed"}) >= 3
    # Once older than ABANDONED_AFTER: the partial write's chunks and the unrecorded file go.
    later = datetime.now(UTC) + ABANDONED_AFTER + timedelta(minutes=1)
    assert await files.sweep(store.events, now=later) == Swept(partial=2, unnamed=1)
    assert (
        await db["uploads.chunks"].count_documents(
            {"files_id": {"$in": [f"{PARTIAL}killed", f"{PARTIAL}closed"]}}
        )
        == 0
    )
    assert await files.first(stray.sha256) is None
    # The recorded file is whole: its document, every chunk, its bytes.
    assert await db["uploads.files"].count_documents({}) == 1
    assert await db["uploads.chunks"].count_documents({}) == kept_chunks >= 2
    assert await files.read(kept.sha256, 10**7) == b"kept " * 100_000
    assert await files.sweep(store.events, now=later) == Swept()
