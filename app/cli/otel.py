"""`mozaiks otel export --chat ID | --since TIME`: past chats' runs as OpenTelemetry traces.

The traces are built from the log exactly as the live export builds them (`app.telemetry`), so a
past run exports the very trace (same ids, same times) a live collector got.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import click
from opentelemetry.sdk.trace.export import SpanExportResult

from app.database import open_store
from app.settings import Settings, SettingsError
from app.telemetry import chat_runs, run_spans, span_exporter, trace_resource
from domain.errors import MozaiksError


@click.group("otel")
def otel_group() -> None:
    """OpenTelemetry traces of past chats (to OTEL_EXPORTER_OTLP_ENDPOINT)."""


@otel_group.command("export")
@click.option("--chat", "chat_id", default=None, help="export this chat's runs")
@click.option("--since", type=click.DateTime(), default=None, help="export runs started since this UTC time")
def export_command(chat_id: str | None, since: datetime | None) -> None:
    """Send past runs to the OTLP endpoint as traces, the same as the live export sent them."""
    try:
        settings = Settings.from_env()
        if (chat_id is None) == (since is None):
            raise click.UsageError("give --chat ID or --since TIME (one of them)")
        if settings.otel_traces_endpoint is None:
            raise SettingsError(
                "OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is not set"
            )
        code = asyncio.run(_export(settings, chat_id, since.replace(tzinfo=UTC) if since else None))
    except (MozaiksError, SettingsError) as exc:
        click.echo(f"mozaiks: error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


async def _export(settings: Settings, chat_id: str | None, since: datetime | None) -> int:
    exporter = span_exporter(settings)
    resource = trace_resource()
    runs = spans = 0
    try:
        async with open_store(settings) as store:
            if chat_id is not None:
                chats = [chat_id]
            else:
                started = store.find(types=["run.started"], since=since)
                chats = list(dict.fromkeys([record.chat_id async for record in started]))
            for chat in chats:
                records = [record async for record in store.read(chat)]
                if not records:
                    click.echo(f"mozaiks: error: chat {chat} does not exist", err=True)
                    return 2
                begun = {r.run_id: r.ts for r in records if r.type == "run.started"}
                for run_id in chat_runs(records):
                    if since is not None and begun.get(run_id, since) < since:
                        continue
                    batch = run_spans(
                        records, run_id, resource, capture_content=settings.otel_capture_content
                    )
                    result = await asyncio.to_thread(exporter.export, batch)
                    if result is not SpanExportResult.SUCCESS:
                        click.echo(
                            f"mozaiks: error: {settings.otel_traces_endpoint} did not take the trace of run "
                            f"{run_id} (chat {chat}); its log line above says why",
                            err=True,
                        )
                        return 1
                    runs, spans = runs + 1, spans + len(batch)
    finally:
        exporter.shutdown()  # type: ignore[no-untyped-call]
    click.echo(
        f"mozaiks: exported {spans} spans of {runs} runs in {len(chats)} chats to {settings.otel_traces_endpoint}",
        err=True,
    )
    return 0
