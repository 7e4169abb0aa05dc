"""The `mozaiks` command: serve the runtime, run a workflow in the terminal, validate, rebuild, tokens."""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import socket
import sys
from typing import TYPE_CHECKING, NoReturn

import click
import msgspec

from app.settings import Settings, SettingsError

if TYPE_CHECKING:
    from app.runs.workflows import WorkflowManager


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def fail(message: str) -> NoReturn:
    """Print one line a user can act on and exit non-zero."""
    click.echo(f"mozaiks: error: {message}", err=True)
    sys.exit(2)


# The commands defined in other modules, imported only when named: they pull in AG2 (seconds of
# imports), which `mozaiks --help`, `mozaiks serve`'s one-line start-up errors and `mozaiks token` do
# without. Each with its help line, so the command list shows them without importing them either
# (tests/test_serve.py checks the lines against the commands).
_ELSEWHERE = {
    "run": (
        "app.cli.runs:run_command",
        "Run WORKFLOW on MESSAGE in the terminal, printing events as they are recorded.",
    ),
    "workflows": ("app.cli.runs:workflows_group", "Inspect workflow manifests."),
    "projections": (
        "app.cli.projections:projections_group",
        "Projections derived from the event log (chat_sessions, chat_metrics).",
    ),
    "audit": ("app.cli.audit:audit_group", "Export and verify the event log across chats."),
    "metrics": ("app.cli.audit:metrics_group", "Metrics over time."),
    "otel": (
        "app.cli.otel:otel_group",
        "OpenTelemetry traces of past chats (to OTEL_EXPORTER_OTLP_ENDPOINT).",
    ),
    "replay": (
        "app.cli.replay:replay_command",
        "Run chat CHAT_ID again into a new chat (`chat.created.replay_of`), turn by turn.",
    ),
    "diff": (
        "app.cli.replay:diff_command",
        "Compare two chats turn by turn; exit 1 when they differ (for CI gates).",
    ),
    "fixtures": ("app.cli.replay:fixtures_group", "Offline fixtures from recorded chats."),
}


class _Commands(click.Group):
    """The command group, importing the commands of `_ELSEWHERE` when they are named."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_ELSEWHERE})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _ELSEWHERE:
            return super().get_command(ctx, cmd_name)
        module, name = _ELSEWHERE[cmd_name][0].split(":")
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list; the commands of `_ELSEWHERE` by their help line, not imported."""
        commands = {name: command for name, command in self.commands.items() if not command.hidden}
        commands.update({name: click.Command(name, help=line) for name, (_, line) in _ELSEWHERE.items()})
        limit = formatter.width - 6 - max(map(len, commands))
        with formatter.section("Commands"):
            formatter.write_dl(
                [(name, commands[name].get_short_help_str(limit)) for name in sorted(commands)]
            )


@click.group(cls=_Commands)
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR")
def main(log_level: str) -> None:
    """Mozaiks AI runtime: event-sourced AG2 workflows with a live ChatUI."""
    from app.logging import configure_logging  # not for --help, which must answer at once

    configure_logging(log_level)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind")
@click.option("--port", default=8000, show_default=True, type=int, help="port to bind")
def serve(host: str, port: int) -> None:
    """Run the HTTP/WebSocket service (embedded MongoDB when DATABASE_URI is not set)."""
    from app.embedded import EmbeddedMongo, EmbeddedServerError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        fail(str(exc))
    if importlib.util.find_spec("websockets") is None:
        # uvicorn would only log it and answer every WebSocket with 405: a ChatUI that never updates.
        fail("no WebSocket library installed (the ChatUI's live stream needs it): pip install websockets")
    if settings.local_mode and not _is_loopback(host):
        fail(
            f"refusing to bind {host} without MOZAIKS_AUTH_SECRET or MOZAIKS_OIDC_ISSUER: local mode serves loopback only"
        )
    try:
        with socket.create_server((host, port)):
            pass  # free now; uvicorn binds it in a moment
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    embedded = None
    if settings.database_uri is None:
        # Started here, not in the app's lifespan, so a start-up failure is one line, not a traceback;
        # it boots in its own process while this one imports the app.
        embedded = EmbeddedMongo(settings.data_dir / "data")
        try:
            settings = msgspec.structs.replace(settings, database_uri=embedded.launch())
        except EmbeddedServerError as exc:
            fail(str(exc))
    try:
        import uvicorn  # imported once the one-line start-up errors above are behind us

        from app.http.server import SHUTDOWN_GRACE_S, create_app

        # Stopped from the app's shutdown too: uvicorn re-raises SIGTERM after a graceful shutdown,
        # which would skip the `finally` below.
        on_shutdown = [embedded.stop] if embedded is not None else []  # called without arguments
        service = create_app(settings, on_shutdown=on_shutdown)
        if embedded is not None:
            try:
                embedded.wait_ready()
            except EmbeddedServerError as exc:
                fail(str(exc))
            click.echo(
                f"mozaiks: embedded MongoDB on 127.0.0.1:{embedded.port}, data in {settings.data_dir / 'data'}"
            )
        announce_workflows(service.state.workflows)
        click.echo(
            f"mozaiks: serving on http://{host}:{port}/ ({'offline fixtures' if settings.offline else 'OpenAI'})"
        )
        uvicorn.run(
            service,
            host=host,
            port=port,
            ws_max_size=settings.max_frame_bytes,
            ws_ping_interval=None,  # the runtime's own heartbeat frames keep sockets alive
            # Compression is per connection (its own deflate state): a frame shared by every client
            # of a chat would be compressed once per client. Frames are small JSON; send them as is.
            ws_per_message_deflate=False,
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
    finally:
        if embedded is not None:
            embedded.stop()


def announce_workflows(workflows: WorkflowManager) -> None:
    """Say which workflows folder was loaded and what it held; warn when nothing could be loaded."""
    folder = workflows.path.resolve()
    failed = f"; {len(workflows.errors)} problem(s), see `mozaiks workflows validate {folder}`"
    if not workflows.workflows:
        click.echo(
            f"mozaiks: warning: no workflows loaded from {folder} (set MOZAIKS_WORKFLOWS_PATH to a folder of "
            f"workflow folders{failed if workflows.errors else ''})",
            err=True,
        )
        return
    click.echo(
        f"mozaiks: workflows from {folder}: {', '.join(workflows.names())}"
        + (failed if workflows.errors else "")
    )


@main.command()
@click.option("--user", "user_id", required=True, help="the token's sub (user id)")
@click.option("--app", "app_id", required=True, help="the token's app_id")
@click.option(
    "--role", "roles", multiple=True, default=["user"], show_default=True, help="user, auditor or analyst"
)
@click.option("--ttl", default=3600, show_default=True, help="seconds until it expires")
def token(user_id: str, app_id: str, roles: tuple[str, ...], ttl: int) -> None:
    """Print a bearer token signed with MOZAIKS_AUTH_SECRET."""
    from app.http.auth import issue_token

    secret = Settings.from_env().auth_secret
    if secret is None:
        fail("MOZAIKS_AUTH_SECRET is not set")
    click.echo(issue_token(secret, user_id, app_id, list(roles), ttl))
