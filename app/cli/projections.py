"""`mozaiks projections rebuild [--name N] [--chat ID]` and `mozaiks projections status` (registered in `app.cli`)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
from pymongo.asynchronous.database import AsyncDatabase
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from app.database import open_store
from app.settings import Settings, SettingsError
from domain.errors import MozaiksError
from domain.store import MongoEventStore
from projections.prices import PriceTable
from projections.rebuild import PROJECTION_NAMES, RebuildSummary, rebuild, select_projectors
from projections.runner import CHECKPOINTS
from projections.writer import ProjectionWriter, behind


class EventsPerSecond(ProgressColumn):
    """The task's current speed in events per second."""

    def render(self, task: Task) -> Text:
        """`12,345 events/s`, or a dash before the first measurement."""
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} events/s" if speed else "– events/s", style="progress.data.speed")


def progress_bar(console: Console) -> Progress:
    """A progress bar with events done/total, events per second and the time left."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        EventsPerSecond(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def summary_table(summary: RebuildSummary) -> Table:
    """The rebuild's result as a two-column table."""
    table = Table(title="Rebuild finished", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("projections", ", ".join(summary.names))
    table.add_row("scope", f"chat {summary.chat_id}" if summary.chat_id else "all chats")
    table.add_row("chats", f"{summary.chats:,}")
    table.add_row("events", f"{summary.events:,}")
    table.add_row("time", f"{summary.seconds:.2f} s")
    table.add_row("rate", f"{summary.events_per_s:,.0f} events/s")
    table.add_row("appended meanwhile", f"{summary.caught_up_after_swap:,} events, applied after the swap")
    table.add_row("unreadable chats", str(len(summary.broken_chats)))
    return table


async def run_rebuild(
    db: AsyncDatabase[Any],
    store: MongoEventStore,
    names: tuple[str, ...],
    chat_id: str | None,
    prices: PriceTable | None,
    console: Console,
) -> RebuildSummary:
    """Rebuild with a progress bar on `console`, then print the summary."""
    label = f"rebuilding {', '.join(names or PROJECTION_NAMES)}" + (f" of chat {chat_id}" if chat_id else "")
    with progress_bar(console) as bar:
        task = bar.add_task(label, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = await rebuild(
            db, store, names=names or None, chat_id=chat_id, progress=progress, prices=prices
        )
        bar.update(task, completed=summary.events, total=summary.events)
    console.print(summary_table(summary))
    for broken_chat, seq in sorted(summary.broken_chats.items()):
        console.print(
            f"[yellow]chat {broken_chat}: record {seq} is unreadable; its projections stop before it "
            f"(check it with GET /api/chats/{broken_chat}/verify)[/]"
        )
    return summary


async def _rebuild(settings: Settings, names: tuple[str, ...], chat_id: str | None, console: Console) -> None:
    prices = PriceTable.load(settings.prices_path)
    async with open_store(settings) as store:
        await run_rebuild(store.db, store, names, chat_id, prices, console)


@click.group("projections")
def projections_group() -> None:
    """Projections derived from the event log (chat_sessions, chat_metrics)."""


@projections_group.command("rebuild")
@click.option(
    "--name",
    "names",
    type=click.Choice(PROJECTION_NAMES),
    multiple=True,
    help="projection to rebuild (repeatable; default: all)",
)
@click.option("--chat", "chat_id", default=None, help="recompute only this chat's documents")
def rebuild_command(names: tuple[str, ...], chat_id: str | None) -> None:
    """Drop and recompute projections from the log; safe while the service runs."""
    console = Console(stderr=False)
    try:
        asyncio.run(_rebuild(Settings.from_env(), names, chat_id, console))
    except (MozaiksError, SettingsError) as exc:
        click.echo(f"mozaiks: error: {exc}", err=True)
        sys.exit(2)


async def _status(settings: Settings, console: Console) -> None:
    async with open_store(settings) as store:
        projectors = select_projectors(None, PriceTable.load(settings.prices_path))
        table = Table(title="Projections")
        for column in ("projection", "collection", "documents", "chats behind", "events behind"):
            table.add_column(column)
        for projector in projectors:
            writer = ProjectionWriter(store.db, store, projector)
            lagging = await behind(store, [writer])
            documents = await writer.collection.estimated_document_count()
            events = sum(head - at for at, head in lagging.values())
            table.add_row(
                projector.name, projector.collection, f"{documents:,}", f"{len(lagging):,}", f"{events:,}"
            )
        console.print(table)
        checkpoint = await store.db[CHECKPOINTS].find_one({"_id": "projections"})
        if checkpoint is None:
            console.print("runner checkpoint: none (the runner opens the stream at its start and catches up)")
        else:
            console.print(
                f"runner checkpoint: chat {checkpoint.get('chat_id')} seq {checkpoint.get('seq')}, "
                f"event of {checkpoint.get('event_ts')}, saved {checkpoint.get('saved_at')}"
            )


@projections_group.command("status")
def status_command() -> None:
    """How far each projection is behind the log, and the runner's checkpoint."""
    try:
        asyncio.run(_status(Settings.from_env(), Console()))
    except (MozaiksError, SettingsError) as exc:
        click.echo(f"mozaiks: error: {exc}", err=True)
        sys.exit(2)
