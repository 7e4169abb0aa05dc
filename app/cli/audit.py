"""CLI for auditors and analysts: `audit export|verify`, `audit anchors export`, `metrics export`.

Each opens the configured database like the server does (DATABASE_URI, else the embedded server
under MOZAIKS_DATA_DIR) and uses the same anchor key (MOZAIKS_ANCHOR_KEY, else derived from
MOZAIKS_AUTH_SECRET, else `<data_dir>/anchor.key`). Progress goes to stderr, data to stdout.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import click
import msgspec
from rich.console import Console
from rich.table import Table

from app.cli.projections import progress_bar
from app.database import open_store
from app.http.analytics import CSV_COLUMNS, csv_row, parse_group_by, time_range, to_csv
from app.http.audit import anchor_key
from app.runs.children import descendants
from app.settings import Settings, SettingsError
from domain.anchors import AnchorBook
from domain.audit import AuditFilter, LogCheck, LogVerification
from domain.errors import MozaiksError
from domain.events import EVENT_TYPES
from domain.model_io import PartStore, bad_part, call_hashes, scan_parts
from projections.buckets import series

_ndjson = msgspec.json.Encoder(enc_hook=str)


def _run(main: Callable[[Settings], Coroutine[Any, Any, int]]) -> None:
    try:
        code = asyncio.run(main(Settings.from_env()))
    except (MozaiksError, SettingsError, ValueError) as exc:
        click.echo(f"mozaiks: error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


def report(result: LogVerification, console: Console, what: str) -> None:
    """Print a verification's outcome: one line when intact, else a table of broken chats."""
    scope = f"app {result.app_id}" if result.app_id else "all apps"
    if result.ok:
        console.print(
            f"[green]verified {what}: {result.chats:,} chats, {result.records:,} records, "
            f"{result.anchors:,} anchors ({scope}): every chain intact, no chat shorter than its anchor, "
            f"{result.forks:,} forks anchored in their parents[/]"
        )
        return
    if result.broken:
        table = Table(title=f"Broken chats ({len(result.broken)})", title_justify="left")
        for column in ("chat", "first broken seq", "anchored seq", "problem"):
            table.add_column(column)
        for chat in result.broken:
            table.add_row(
                chat.chat_id,
                str(chat.broken_seq),
                "" if chat.anchored_seq is None else str(chat.anchored_seq),
                chat.detail or "",
            )
        console.print(table)
    for problem in result.anchor_problems:
        console.print(f"[red]anchor problem: {problem}[/]")
    for problem in result.part_problems:
        console.print(f"[red]model I/O problem: {problem}[/]")
    console.print(
        f"[red]verification FAILED ({what}, {scope}): {len(result.broken)} broken of {result.chats:,} chats, "
        f"{len(result.anchor_problems)} anchor problem(s), {len(result.part_problems)} model I/O problem(s)[/]"
    )


@click.group("audit")
def audit_group() -> None:
    """Export and verify the event log across chats."""


@audit_group.command("export")
@click.option("--app", "app_id", default=None, help="only this app (default: every app)")
@click.option(
    "--type", "types", multiple=True, type=click.Choice(sorted(EVENT_TYPES)), help="event type (repeatable)"
)
@click.option("--agent", default=None)
@click.option("--workflow", default=None)
@click.option("--user", "user_id", default=None)
@click.option("--chat", "chat_id", default=None)
@click.option("--run", "run_id", default=None)
@click.option("--since", type=click.DateTime(), default=None, help="from this UTC time (inclusive)")
@click.option("--until", type=click.DateTime(), default=None, help="to this UTC time (exclusive)")
@click.option("--with-children", is_flag=True, help="with --chat: also the chats it started, recursively")
@click.option(
    "--with-model-io",
    is_flag=True,
    default=False,
    help="also write the model I/O parts of the exported llm.call records, each checked against its hash",
)
def export_command(
    app_id: str | None,
    types: tuple[str, ...],
    agent: str | None,
    workflow: str | None,
    user_id: str | None,
    chat_id: str | None,
    run_id: str | None,
    since: datetime | None,
    until: datetime | None,
    with_model_io: bool,
    with_children: bool,
) -> None:
    """Write matching records as NDJSON to stdout, then re-verify the chain of every chat exported.

    With --with-model-io, the model I/O parts the exported `llm.call` records name follow the records,
    one `{"model_io_part": HASH, "body": CANONICAL_JSON}` line each, every one checked against its hash.
    With --with-children (and --chat), the chat's child workflows are exported too, recursively.
    """
    if with_children and chat_id is None:
        raise click.UsageError("--with-children needs --chat (the chat whose children to export)")
    wanted = AuditFilter(
        app_id=app_id, types=types, agent=agent, workflow=workflow, user_id=user_id,
        chat_id=chat_id, run_id=run_id, since=since, until=until,
    )  # fmt: skip
    console = Console(stderr=True, soft_wrap=True)
    _run(
        lambda settings: _export(
            settings,
            wanted,
            sys.stdout.buffer,
            console,
            with_model_io=with_model_io,
            with_children=with_children,
        )
    )


async def _export(
    settings: Settings,
    wanted: AuditFilter,
    out: BinaryIO,
    console: Console,
    *,
    with_model_io: bool = False,
    with_children: bool = False,
) -> int:
    # Exporting whole chats (no filter but the app), the chains are checked as the records stream
    # past; otherwise the exported chats are read again, whole, afterwards.
    whole = wanted == AuditFilter(app_id=wanted.app_id)
    async with open_store(settings) as store:
        filters = [wanted]
        if with_children and wanted.chat_id is not None:
            family = await descendants(store, wanted.chat_id)
            filters = [msgspec.structs.replace(wanted, chat_id=chat) for chat in family]
        book = AnchorBook(store.db, anchor_key(settings))
        inline = LogCheck(await book.scan(wanted.app_id), book.key) if whole else None
        chats: set[str] = set()
        referenced: dict[str, None] = {}
        count = 0
        with progress_bar(console) as bar:
            task = bar.add_task("exporting", total=None)
            for one in filters:
                async for doc in store.audit(one, batch_size=2000):
                    if inline is not None:
                        inline.add(doc)
                    chats.add(str(doc["chat_id"]))
                    if with_model_io and doc.get("type") == "llm.call" and doc["data"].get("io") == "full":
                        referenced.update(dict.fromkeys(call_hashes(doc["data"])))
                    doc["id"] = doc.pop("_id")
                    out.write(_ndjson.encode(doc) + b"\n")
                    count += 1
                    if count % 1000 == 0:
                        bar.update(task, completed=count)
            bar.update(task, completed=count, total=count)
            out.flush()
            if inline is not None:
                await inline.check_forks(store.events)
                result = inline.result(wanted.app_id)
            else:
                check = bar.add_task(f"verifying {len(chats):,} chats", total=None)
                result = await store.verify_all(
                    book,
                    app_id=wanted.app_id,
                    chat_ids=chats,
                    progress=lambda done, total: bar.update(check, completed=done, total=total),
                )
        if with_model_io:
            result.part_problems = await _export_parts(PartStore(store.db), list(referenced), out)
            out.flush()
            console.print(f"exported {len(referenced):,} model I/O parts")
        console.print(f"exported {count:,} records of {len(chats):,} chats")
        report(result, console, "the exported chats")
        return 0 if result.ok else 1


async def _export_parts(parts: PartStore, hashes: list[str], out: BinaryIO) -> list[str]:
    """Write the parts `hashes` (each checked against its hash); returns the problems found."""
    problems: list[str] = []
    stored = await parts.get(hashes)
    for hash_ in hashes:
        body = stored.get(hash_)
        if body is None:
            problems.append(f"model I/O part {hash_} is missing")
            continue
        problem = bad_part(hash_, body)
        if problem is not None:
            problems.append(problem)
        out.write(_ndjson.encode({"model_io_part": hash_, "body": body.decode()}) + b"\n")
    return problems


@audit_group.command("verify")
@click.option("--app", "app_id", default=None, help="only this app's chats and anchors (default: all)")
@click.option(
    "--anchors",
    "anchors_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="an `audit anchors export` file kept elsewhere: also check the log and the stored anchors against it",
)
@click.option("--chat", "chat_id", default=None, help="only this chat (default: every chat)")
@click.option("--with-children", is_flag=True, help="with --chat: also the chats it started, recursively")
def verify_command(
    app_id: str | None, anchors_file: Path | None, chat_id: str | None, with_children: bool
) -> None:
    """Check every chat's hash chain and tail anchor (and each fork's anchor in its parent); list broken chats."""
    if with_children and chat_id is None:
        raise click.UsageError("--with-children needs --chat (the chat whose children to verify)")
    console = Console(stderr=True, soft_wrap=True)
    _run(lambda settings: _verify(settings, app_id, console, anchors_file, chat_id, with_children))


def read_exported(path: Path) -> list[dict[str, Any]]:
    """The anchors of an `audit anchors export` file; raises ValueError naming the bad line."""
    anchors: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            anchors.append(msgspec.json.decode(line, type=dict[str, Any]))
        except msgspec.DecodeError as exc:
            raise ValueError(f"{path}, line {number}: not an anchor ({exc})") from None
    return anchors


async def _verify(
    settings: Settings,
    app_id: str | None,
    console: Console,
    anchors_file: Path | None = None,
    chat_id: str | None = None,
    with_children: bool = False,
) -> int:
    exported = read_exported(anchors_file) if anchors_file is not None else None
    async with open_store(settings) as store:
        chat_ids: set[str] | None = None
        if chat_id is not None:
            chat_ids = set(await descendants(store, chat_id)) if with_children else {chat_id}
        book = AnchorBook(store.db, anchor_key(settings))
        with progress_bar(console) as bar:
            task = bar.add_task("verifying chains", total=None)
            result = await store.verify_all(
                book,
                app_id=app_id,
                exported=exported,
                chat_ids=chat_ids,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
            if app_id is None:  # parts are shared by content across apps: checked on a whole-log verify
                result.part_problems = [
                    p async for _, _, p in scan_parts(PartStore(store.db)) if p is not None
                ]
        report(result, console, "the log" + (f" against {anchors_file}" if anchors_file else ""))
        return 0 if result.ok else 1


@audit_group.group("anchors")
def anchors_group() -> None:
    """The tail anchors."""


@anchors_group.command("export")
@click.option("--app", "app_id", default=None, help="only this app's anchors")
def anchors_export_command(app_id: str | None) -> None:
    """Write every anchor as NDJSON to stdout: keep the file apart from the database."""

    async def main(settings: Settings) -> int:
        async with open_store(settings) as store:
            book = AnchorBook(store.db, anchor_key(settings))
            count = 0
            async for doc in book.documents(app_id):
                sys.stdout.buffer.write(_ndjson.encode(doc) + b"\n")
                count += 1
            click.echo(f"exported {count:,} anchors", err=True)
            return 0

    _run(main)


@click.group("metrics")
def metrics_group() -> None:
    """Metrics over time."""


@metrics_group.command("export")
@click.option("--app", "app_id", default="local", show_default=True, help="the app whose metrics to export")
@click.option("--from", "start", type=click.DateTime(), default=None, help="UTC start (default: 30 days ago)")
@click.option("--to", "end", type=click.DateTime(), default=None, help="UTC end, exclusive (default: now)")
@click.option("--bucket", type=click.Choice(["hour", "day"]), default="day", show_default=True)
@click.option(
    "--group-by", default="workflow,model,agent", show_default=True, help="any of workflow,model,agent"
)
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="file (default: stdout; parquet needs a file)",
)
def metrics_export_command(
    app_id: str,
    start: datetime | None,
    end: datetime | None,
    bucket: str,
    group_by: str,
    fmt: str,
    output: Path | None,
) -> None:
    """Write the metrics series (as `GET /metrics/perf/series`) as CSV or Parquet."""
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401 - only checking that the optional extra is installed
        except ImportError:
            click.echo(
                "mozaiks: error: Parquet export needs pyarrow: pip install 'mozaiks-runtime[parquet]' "
                "(or use --format csv)",
                err=True,
            )
            sys.exit(2)
        if output is None:
            click.echo("mozaiks: error: --format parquet needs --output FILE", err=True)
            sys.exit(2)

    async def main(settings: Settings) -> int:
        first, last = time_range(start, end)
        async with open_store(settings) as store:
            result = await series(
                store.db,
                app_id=app_id,
                start=first,
                end=last,
                bucket="hour" if bucket == "hour" else "day",
                group_by=parse_group_by(group_by),
            )
        if fmt == "parquet":
            assert output is not None
            write_parquet(result.points, output)
        elif output is None:
            sys.stdout.write(to_csv(result.points))
        else:
            output.write_text(to_csv(result.points))
        click.echo(f"exported {len(result.points):,} points", err=True)
        return 0

    _run(main)


def write_parquet(points: Any, path: Path) -> None:
    """The points as a Parquet file with CSV_COLUMNS (pyarrow must be installed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [csv_row(point) for point in points]
    columns: dict[str, list[Any]] = {name: [row[i] for row in rows] for i, name in enumerate(CSV_COLUMNS)}
    for name in ("latency_p50_ms", "latency_p95_ms"):
        columns[name] = [None if value == "" else value for value in columns[name]]
    columns["cost_usd"] = [float(value) for value in columns["cost_usd"]]
    pq.write_table(pa.table(columns), path)
