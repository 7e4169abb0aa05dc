"""`mozaiks run WORKFLOW ["message"]` and `mozaiks workflows validate [PATH]` (registered in `app.cli`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

import click

from app.database import open_store
from app.runs.orchestrator import Orchestrator, RunNotRecorded
from app.runs.ui import WAITING, InvalidAnswer, UiRequestClosed, record_outcome
from app.runs.workflows import Tool, WorkflowManager
from app.settings import Settings
from domain.events import InputReceived, Pending, Record, StreamRef, UiResponded
from domain.store import MongoEventStore


@click.command("validate")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def validate_command(path: Path | None) -> None:
    """Check every workflow under PATH (default MOZAIKS_WORKFLOWS_PATH); print all problems at once."""
    folder = path or Settings.from_env().workflows_path
    manager = WorkflowManager(folder)
    for error in manager.errors:
        click.echo(f"error: {error}", err=False)
    if manager.workflows:
        click.echo(f"ok: {', '.join(manager.names())}")
    if manager.errors:
        broken = len({e.workflow for e in manager.errors})
        noun = "problem" if len(manager.errors) == 1 else "problems"
        click.echo(f"{len(manager.errors)} {noun} in {broken} workflow(s) under {folder}")
        raise SystemExit(1)


@click.group("workflows")
def workflows_group() -> None:
    """Inspect workflow manifests."""


workflows_group.add_command(validate_command)


@click.command("run")
@click.argument("workflow")
@click.argument("message", required=False)
@click.option("--user-id", default="local", show_default=True, help="user_id recorded on the chat")
@click.option("--app-id", default="local", show_default=True, help="app_id recorded on the chat")
@click.option(
    "--all-events/--visible-only", default=True, show_default=True, help="also print hidden agents' events"
)
def run_command(workflow: str, message: str | None, user_id: str, app_id: str, all_events: bool) -> None:
    """Run WORKFLOW on MESSAGE in the terminal, printing events as they are recorded.

    An AgentDriven workflow needs no MESSAGE: its agent speaks first.
    """
    settings = Settings.from_env()
    raise SystemExit(asyncio.run(_run(settings, workflow, message, user_id, app_id, all_events)))


async def _run(
    settings: Settings, workflow: str, message: str | None, user_id: str, app_id: str, all_events: bool
) -> int:
    manager = WorkflowManager(settings.workflows_path)
    if workflow not in manager.workflows:
        for error in manager.errors:
            if error.workflow == workflow:
                click.echo(f"error: {error}", err=True)
        click.echo(
            f"workflow {workflow!r} is not available (loaded: {', '.join(manager.names()) or 'none'})",
            err=True,
        )
        return 2
    if message is None and not manager.get(workflow).agent_driven:
        click.echo(f"workflow {workflow!r} starts with the user's message: give MESSAGE", err=True)
        return 2
    async with open_store(settings) as store:
        orchestrator = Orchestrator(store, manager, settings)
        if settings.offline:
            click.echo(
                "offline mode: agents play their scripted fixtures (no OPENAI_API_KEY / OPENAI_BASE_URL)"
            )
        stream = await orchestrator.create_chat(
            workflow=workflow, user_id=user_id, app_id=app_id, message=message
        )
        answered = asyncio.Event()
        tools = manager.get(workflow).tools
        printer = asyncio.create_task(_print_events(store, stream, all_events, tools, answered))
        try:
            outcome = ""
            while outcome in ("", "run.suspended"):  # a UI request waits: its answer continues the chat
                if outcome:
                    await answered.wait()  # the printer asks for the answer and records it
                answered.clear()
                try:
                    outcome = await orchestrator.run(stream)
                except RunNotRecorded as exc:  # the database came back too late: record the run's end now
                    click.echo(f"recording the run's end after a database outage ({exc.cause})", err=True)
                    run_id = exc.pendings[-1].run_id or ""
                    outcome = (await store.finish_run(stream, run_id, exc.pendings)).type
            # Let the printer reach the terminal record before stopping it.
            await asyncio.wait_for(printer, timeout=10)
        finally:
            printer.cancel()
        report = orchestrator.last_report
        records = await store.last_seq(stream.chat_id)
        assert report is not None
        click.echo(
            f"chat {stream.chat_id} · {outcome} · {report.llm_calls} LLM calls · "
            f"{report.prompt_tokens} prompt + {report.completion_tokens} completion tokens · "
            f"{records} events" + (" · offline" if report.offline else "")
        )
        return 0 if outcome == "run.completed" else 1


async def _print_events(
    store: MongoEventStore,
    stream: StreamRef,
    all_events: bool,
    tools: Mapping[str, Tool],
    answered: asyncio.Event,
) -> None:
    printer = StreamPrinter()
    async for record in store.subscribe(stream.chat_id):
        if all_events or record.visible:
            printer.show(record)
        if record.type == "input.requested":
            text = await asyncio.to_thread(click.prompt, "you", default="", show_default=False)
            received = Pending(event=InputReceived(request_id=record.data["request_id"], text=text))
            await store.append(stream, [received], expected_seq=None)
        if record.type == "ui.requested" and record.data["component"] in WAITING:
            await _answer_ui(store, stream, record, tools)
            answered.set()
        if record.type in ("run.completed", "run.failed", "run.stopped"):
            return


async def _answer_ui(
    store: MongoEventStore, stream: StreamRef, request: Record, tools: Mapping[str, Tool]
) -> None:
    """Ask the terminal for a UI request's answer (JSON; a choice's option as plain text) until it is valid."""
    props = request.data["props"]
    if request.data["component"] == "form":
        click.echo(f"form: {json.dumps(props.get('schema'))}")
    elif request.data["component"] == "choice":
        click.echo(f"options: {', '.join(map(str, props.get('options') or []))}")
    while True:
        text = await asyncio.to_thread(click.prompt, "answer (JSON)", default="", show_default=False)
        try:
            answer = json.loads(text)
        except ValueError:
            answer = text
        outcome = UiResponded(request_id=request.data["request_id"], answer=answer, user_id=stream.user_id)
        try:
            await record_outcome(store, stream, outcome.request_id, outcome, tools=tools)
            return
        except InvalidAnswer as exc:
            click.echo(f"not recorded: {exc}")
        except UiRequestClosed as exc:  # it expired meanwhile
            click.echo(str(exc))
            return


class StreamPrinter:
    """Prints records one per line; a streamed message's text as it arrives, on the line of its first delta."""

    def __init__(self) -> None:
        self.open: str | None = None  # message_id of the line being written
        self.streamed: dict[str, int] = {}  # message_id -> characters printed

    def show(self, record: Record) -> None:
        if record.type == "message.delta":
            message_id, text = record.data["message_id"], record.data["text"]
            if self.open != message_id:
                self.end_line()
                prefix = f"{record.seq:>4} {record.agent or '-':<14} {'message.delta':<16} "
                click.echo(prefix + ("... " if message_id in self.streamed else ""), nl=False)
                self.open = message_id
            click.echo(text, nl=False)
            self.streamed[message_id] = self.streamed.get(message_id, 0) + len(text)
            return
        self.end_line()
        streamed = (
            self.streamed.pop(record.data.get("message_id", ""), None)
            if record.type == "message.agent"
            else None
        )
        if streamed is not None:
            click.echo(
                f"{record.seq:>4} {record.agent or '-':<14} {'message.agent':<16} (streamed above: {streamed} characters)"
            )
        else:
            click.echo(describe(record))

    def end_line(self) -> None:
        if self.open is not None:
            click.echo("")
            self.open = None


def describe(record: Record) -> str:
    """One terminal line for a record: seq, agent, type and its text."""
    data = record.data
    match record.type:
        case "message.user" | "message.agent":
            text = data["content"]
        case "tool.called":
            text = f"{data['tool']}({data['arguments']})"
        case "tool.result":
            text = ("ERROR " if data["is_error"] else "") + data["content"]
        case "handoff":
            text = f"{data['source']} -> {data['target']} ({data['kind']})"
        case "speaker.selected":
            text = data["speaker"]
        case "llm.call":
            text = f"{data['model']} {data['prompt_tokens']}+{data['completion_tokens']} tokens {data['latency_ms']:.0f} ms"
            text += " offline" if data.get("offline") else ""
        case "input.requested":
            text = data["prompt"]
        case "input.received":
            text = data["text"]
        case "context.updated":
            text = json.dumps(data["variables"], sort_keys=True)
        case "run.failed":
            text = data["error"]
        case "ag2.event":
            text = data["name"]
        case _:
            text = json.dumps(data, sort_keys=True, default=str)
    hidden = "" if record.visible else " (hidden)"
    return f"{record.seq:>4} {record.agent or '-':<14} {record.type:<16} {text}{hidden}"
