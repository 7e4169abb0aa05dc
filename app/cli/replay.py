"""`mozaiks replay CHAT_ID`, `mozaiks diff CHAT_A CHAT_B`, `mozaiks fixtures export CHAT_ID --to DIR`.

Each opens the configured database like the server does. With `--token` (or MOZAIKS_TOKEN, checked
with MOZAIKS_AUTH_SECRET) the caller reads only what that token may read over the API (the chat's
user, auditors of its app); without one, the operator at the database reads every chat. Refusals
print `mozaiks: error: [code] detail` (the API's error codes) and exit 2, having written nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import click
import msgspec
from litestar.exceptions import HTTPException, PermissionDeniedException

from app.database import open_store
from app.http import codes
from app.http.auth import Principal, principal_from_token
from app.http.controllers import owned_chat
from app.runs.replay import ON_DIVERGE, ReplayRefused, replay
from app.runs.workflows import FIXTURES_DIR, WorkflowManager
from app.settings import Settings, SettingsError
from domain.errors import MozaiksError, UnknownChat
from domain.events import Record
from domain.manifest import ScriptedReply, ScriptedToolCall
from domain.model_io import read_call
from domain.store import MongoEventStore
from projections.diff import as_text, diff_chats
from projections.prices import PriceTable

_token_option = click.option(
    "--token", envvar="MOZAIKS_TOKEN", default=None, help="act as this bearer token's user (MOZAIKS_TOKEN)"
)
_json = msgspec.json.Encoder()


def refuse(code: str, detail: str) -> NoReturn:
    click.echo(f"mozaiks: error: [{code}] {detail}", err=True)
    sys.exit(2)


def _run(main: Callable[[Settings], Coroutine[Any, Any, int]]) -> None:
    try:
        settings = Settings.from_env()
        code = asyncio.run(main(settings))
    except UnknownChat as exc:
        refuse(codes.UNKNOWN_CHAT, str(exc))
    except PermissionDeniedException as exc:
        refuse(codes.FORBIDDEN, str(exc.detail))
    except HTTPException as exc:
        refuse(codes.UNAUTHORIZED if exc.status_code == 401 else codes.ERROR, str(exc.detail))
    except ReplayRefused as exc:
        refuse(exc.code, str(exc))
    except (MozaiksError, SettingsError, ValueError) as exc:
        refuse(codes.ERROR, str(exc))
    sys.exit(code)


def caller(settings: Settings, token: str | None) -> Principal | None:
    """The token's principal; None for the operator (no token)."""
    if token is None:
        return None
    if settings.auth_secret is None:
        refuse(codes.UNAUTHORIZED, "--token needs MOZAIKS_AUTH_SECRET to check it")
    return principal_from_token(token, settings.auth_secret)


async def readable(store: MongoEventStore, principal: Principal | None, chat_id: str) -> list[Record]:
    """The chat's records, if the caller may read it (UnknownChat, or 403 as over the API)."""
    if principal is not None:
        await owned_chat(store, principal, chat_id)
    records = [record async for record in store.read(chat_id)]
    if not records:
        raise UnknownChat(chat_id)
    if principal is not None and "auditor" not in principal.roles:
        records = [r for r in records if r.visible]
    return records


@click.command("replay")
@click.argument("chat_id")
@click.option(
    "--workflows",
    "workflows_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="replay on the workflows of this folder (a changed copy); default MOZAIKS_WORKFLOWS_PATH",
)
@click.option(
    "--model",
    "model",
    type=click.Choice(["recorded", "live"]),
    default="recorded",
    show_default=True,
    help="answer model calls from the recording, or call the configured model",
)
@click.option(
    "--on-diverge",
    type=click.Choice(ON_DIVERGE),
    default="live",
    show_default=True,
    help="what a call whose request is not in the recording gets",
)
@_token_option
def replay_command(
    chat_id: str, workflows_dir: Path | None, model: str, on_diverge: str, token: str | None
) -> None:
    """Run chat CHAT_ID again into a new chat (`chat.created.replay_of`), turn by turn."""

    async def main(settings: Settings) -> int:
        principal = caller(settings, token)
        workflows = WorkflowManager(workflows_dir or settings.workflows_path)
        async with open_store(settings) as store:
            await readable(store, principal, chat_id)
            report = await replay(
                store, settings, workflows, chat_id,
                model="live" if model == "live" else "recorded",
                on_diverge=on_diverge,  # type: ignore[arg-type]
                user_id=principal.user_id if principal is not None else None,
                progress=click.echo,
            )  # fmt: skip
        if report.divergence is not None:
            click.echo(report.divergence.describe())
            if report.divergence.diff:
                click.echo(report.divergence.diff)
        click.echo(
            f"replay of {chat_id}: new chat {report.chat_id} · {report.runs} turn(s) "
            f"({', '.join(report.outcomes) or 'none'}) · {report.recorded} recorded, {report.live} live calls · "
            + ("diverged" if report.divergence else "no divergence")
        )
        # A turn suspended on a UI request is fine: the next turn continues it (the last must complete).
        ended = report.outcomes[-1:] == ["run.completed"]
        return 0 if ended and all(o in ("run.completed", "run.suspended") for o in report.outcomes) else 1

    _run(main)


@click.command("diff")
@click.argument("chat_a")
@click.argument("chat_b")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_token_option
def diff_command(chat_a: str, chat_b: str, fmt: str, token: str | None) -> None:
    """Compare two chats turn by turn; exit 1 when they differ (for CI gates)."""

    async def main(settings: Settings) -> int:
        principal = caller(settings, token)
        async with open_store(settings) as store:
            records_a = await readable(store, principal, chat_a)
            records_b = await readable(store, principal, chat_b)
        result = diff_chats(chat_a, records_a, chat_b, records_b, PriceTable.load(settings.prices_path))
        click.echo(_json.encode(result).decode() if fmt == "json" else as_text(result))
        return 0 if result.same else 1

    _run(main)


@click.group("fixtures")
def fixtures_group() -> None:
    """Offline fixtures from recorded chats."""


@fixtures_group.command("export")
@click.argument("chat_id")
@click.option(
    "--to",
    "folder",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="the workflow folder: files go to DIR/fixtures/<Agent>.json",
)
@_token_option
def fixtures_export_command(chat_id: str, folder: Path, token: str | None) -> None:
    """Write the offline fixtures of CHAT_ID's workflow from its recorded model calls."""

    async def main(settings: Settings) -> int:
        principal = caller(settings, token)
        async with open_store(settings) as store:
            records = await readable(store, principal, chat_id)
            scripts = await recorded_scripts(store, records)
        target = folder / FIXTURES_DIR
        target.mkdir(parents=True, exist_ok=True)
        for agent, replies in scripts.items():
            path = target / f"{agent}.json"
            path.write_bytes(msgspec.json.format(msgspec.json.encode(replies), indent=2) + b"\n")
            click.echo(f"wrote {path} ({len(replies)} replies)")
        return 0

    _run(main)


async def recorded_scripts(store: MongoEventStore, records: list[Record]) -> dict[str, list[ScriptedReply]]:
    """Each agent's answered model calls as scripted replies, in order (needs full model I/O)."""
    from domain.model_io import PartStore

    parts = PartStore(store.db)
    scripts: dict[str, list[ScriptedReply]] = {}
    for record in records:
        if record.type != "llm.call" or record.data.get("status", "ok") != "ok":
            continue
        io = await read_call(parts, record.data)
        if io.response is None:
            raise ReplayRefused(
                codes.BAD_REQUEST,
                f"the model call at seq {record.seq} kept no response (MOZAIKS_RECORD_MODEL_IO={io.io})",
            )
        message = io.response["choices"][0]["message"]
        calls = [
            ScriptedToolCall(
                name=c["function"]["name"], arguments=json.loads(c["function"]["arguments"] or "{}")
            )
            for c in message.get("tool_calls") or []
        ]
        usage = io.response.get("usage") or {}
        scripts.setdefault(record.agent or "", []).append(
            ScriptedReply(
                content=message.get("content"),
                tool_calls=calls,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
            )
        )
    return scripts
