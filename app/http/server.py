"""The Litestar application: `create_app()` wires settings, lifespans, auth, controllers and the ChatUI.

Each resource is its own lifespan, entered in order and shut down in reverse: the executor that
keeps model calls apart from the runtime's own I/O, the database (and embedded server), the live
hub, the projection runner, the run supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import structlog
from litestar import Litestar, MediaType, Request, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusConfig
from litestar.response import File
from litestar.static_files import create_static_files_router
from litestar.types import Message, Scope

from app.database import open_database
from app.http.agui import run_agent
from app.http.analytics import SeriesController
from app.http.audit import AuditController, anchor_key
from app.http.auth import BearerAuthMiddleware, TokenVerifier, token_from
from app.http.budgets import BudgetController
from app.http.children import ChatTreeController
from app.http.controllers import (
    ChatController,
    HealthController,
    MetricsController,
    WorkflowController,
    info,
    prometheus_metrics,
)
from app.http.docs import SchemaPage
from app.http.errors import EXCEPTION_HANDLERS
from app.http.files import files_controller
from app.http.lineage import LineageController
from app.http.replay import ReplayController
from app.http.transport import chat_socket
from app.http.ui import answer_ui_request
from app.hub import LiveHub
from app.observability import watch_projection_lag, watch_runs
from app.runs.orchestrator import Orchestrator, load_ag2
from app.runs.pool import routed_default_executor
from app.runs.supervisor import RunSupervisor
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.anchors import AnchorBook
from domain.store import MongoEventStore, RetryPolicy
from projections.heads import AnchorWriter
from projections.runner import ProjectionRunner

STATIC = Path(__file__).parents[1] / "static"
SHUTDOWN_WAIT_S = 5.0
# On SIGTERM, requests still in flight (an AG-UI event stream, an audit export) get this long to end;
# then uvicorn cancels them and the lifespans shut down (runs stopped, tasks ended). Without a limit
# one open stream would hold the shutdown, and every run on the node, until the process is killed.
SHUTDOWN_GRACE_S = 10
# Sent on every HTTP response: the ChatUI page's own policy (its <meta> tag) plus what only a
# header can say (frame-ancestors: no framing at all), no MIME sniffing, and no Referer.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
)
log = structlog.get_logger("mozaiks.server")


@contextlib.asynccontextmanager
async def executor_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Model calls get threads of their own (MOZAIKS_MAX_CONCURRENT_LLM_CALLS); see app.runs.pool."""
    settings: Settings = app.state.settings
    with routed_default_executor(asyncio.get_running_loop(), settings.max_concurrent_llm_calls) as executor:
        app.state.executor = executor
        try:
            yield
        finally:
            app.state.executor = None


@contextlib.asynccontextmanager
async def identity_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Fetch the OIDC provider's keys once at start-up; if it is down, say so (and in /health/ready), not crash."""
    identity = await app.state.verifier.ready()
    if identity not in ("ok", "off"):
        log.warning("identity.not_ready", identity=identity)
    yield


@contextlib.asynccontextmanager
async def database_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Open the database (starting the embedded server when no DATABASE_URI is set) and the event store."""
    settings: Settings = app.state.settings
    async with open_database(settings) as db:
        store = MongoEventStore(db, RetryPolicy(budget_s=settings.db_retry_s))
        await store.ensure_indexes()
        app.state.db, app.state.store = db, store
        log.info("database.ready", db=settings.db_name, embedded=settings.database_uri is None)
        yield


@contextlib.asynccontextmanager
async def _background(name: str, coro: Any) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        # Shutdown must finish even if a task is slow to honour its cancellation.
        done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_WAIT_S)
        if not done:
            log.warning("shutdown.task_still_running", task=name, waited_s=SHUTDOWN_WAIT_S)
        elif not task.cancelled() and task.exception() is not None:
            log.warning("shutdown.task_failed", task=name, error=repr(task.exception()))


@contextlib.asynccontextmanager
async def hub_lifespan(app: Litestar) -> AsyncIterator[None]:
    """One change stream per process, fanned out to WebSocket clients."""
    settings: Settings = app.state.settings
    hub = app.state.hub = LiveHub(
        app.state.store, settings.ws_queue_max, stream_interval_s=settings.hub_stream_interval_ms / 1000
    )
    async with _background("live-hub", hub.run()):
        await asyncio.wait_for(hub.wait_ready(), 30)
        yield


@contextlib.asynccontextmanager
async def projections_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Keep chat_sessions and chat_metrics up to date from the log (on the replica holding the lease)."""
    settings: Settings = app.state.settings
    # One writer across replicas (the holder of the projection lease); the others stand by.
    runner = ProjectionRunner.for_settings(
        app.state.db,
        app.state.store,
        settings.prices_path,
        owner=settings.node_id,
        lease_ttl_s=settings.lease_ttl_s,
        min_interval_s=settings.projection_interval_ms / 1000,
    )
    app.state.projections = runner
    async with _background("projection-runner", runner.run()):
        yield


@contextlib.asynccontextmanager
async def anchors_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Anchor changed chat heads every MOZAIKS_ANCHOR_INTERVAL_S and after every terminal record."""
    state = app.state
    book = state.anchors = AnchorBook(state.db, anchor_key(state.settings))
    writer = AnchorWriter(state.db, book, state.settings.anchor_interval_s)
    state.projections.on_applied = writer.notice
    async with _background("anchor-writer", writer.run()):
        yield


@contextlib.asynccontextmanager
async def telemetry_lifespan(app: Litestar) -> AsyncIterator[None]:
    """With OTEL_EXPORTER_OTLP_ENDPOINT: each run's trace exported once it is over (app.telemetry)."""
    settings: Settings = app.state.settings
    if settings.otel_traces_endpoint is None:
        app.state.traces = None
        yield
        return
    from app.telemetry import TraceExport  # the OTel SDK is imported only when traces are exported

    traces = app.state.traces = TraceExport(app.state.store, settings)
    try:
        yield
    finally:
        await traces.close()


@contextlib.asynccontextmanager
async def supervisor_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Runs in the background, each guarded by a lease; expired leases recovered as interrupted runs."""
    state = app.state
    # Runs learn about input answers and stops from the process's one change stream (the hub).
    orchestrator = state.orchestrator = Orchestrator(
        state.store, state.workflows, state.settings, follow=state.hub.records
    )
    supervisor = state.supervisor = RunSupervisor(state.db, state.store, orchestrator, state.settings)
    supervisor.on_run_end = state.traces.run_ended if state.get("traces") else None
    async with (
        _background("lease-watch", supervisor.watch_leases()),
        _background("ag2-import", _load_ag2_once_ready(state.projections)),
    ):
        try:
            yield
        finally:
            await supervisor.shutdown()


async def _load_ag2_once_ready(projections: ProjectionRunner) -> None:
    """Import AG2 on a thread once the node is ready (never before: readiness waits for nothing of it),
    so the first chat seldom waits for those seconds of imports (a run imports it itself if need be)."""
    with contextlib.suppress(Exception):  # not caught up in a minute: import all the same
        await projections.wait_caught_up(timeout=60)
    threading.Thread(target=load_ag2, name="ag2-import", daemon=True).start()


async def security_headers(message: Message, scope: Scope) -> None:
    """Litestar `before_send` hook: the security headers on every HTTP response, errors included."""
    if message["type"] == "http.response.start":
        headers = MutableScopeHeaders.from_message(message)
        for name, value in SECURITY_HEADERS:
            headers[name] = value


# ---- services, injected into handlers by parameter name and type ---------------------------------
# Each is built once per process by its lifespan (above) and kept on the app's state.


def _from_state(name: str) -> Provide:
    """The dependency that hands a handler the service its lifespan keeps on the app's state as `name`."""

    def provide(state: State) -> Any:
        return state[name]

    return Provide(provide, sync_to_thread=False)


# A handler declares a service by parameter name; its annotation says the type it gets.
DEPENDENCIES: Final = {
    name: _from_state(name)
    for name in (
        "settings",
        "workflows",
        "db",
        "store",
        "hub",
        "projections",
        "anchors",
        "orchestrator",
        "supervisor",
        "verifier",
    )
}


def _rate_limit_identity(request: Request[Any, Any, Any]) -> str:
    # Rate limits count per user: the bearer token (one per user) or, in local mode, the address.
    token = token_from(request)
    return f"token:{hash(token)}" if token else f"addr:{request.client.host if request.client else '?'}"


def _is_chat_start(request: Request[Any, Any, Any]) -> bool:
    # Every AG-UI run counts: any of them may start a chat (a new threadId).
    path = request.url.path.rstrip("/")
    return request.method == "POST" and (path == "/api/chats" or path.startswith("/ag-ui/"))


@get("/", include_in_schema=False, media_type=MediaType.HTML)
async def chat_ui() -> File:
    """The ChatUI page."""
    return File(STATIC / "index.html", content_disposition_type="inline", media_type=MediaType.HTML)


def create_app(settings: Settings | None = None, on_shutdown: Sequence[Callable[[], Any]] = ()) -> Litestar:
    """Build the application for `settings` (default: from the environment).

    `on_shutdown` hooks run after every lifespan has closed (the CLI stops its embedded server there).
    """
    settings = settings or Settings.from_env()
    prometheus = PrometheusConfig(app_name="mozaiks", prefix="mozaiks", group_path=True, exclude=["/metrics"])
    rate_limit = RateLimitConfig(
        rate_limit=("minute", settings.chat_starts_per_minute),
        identifier_for_request=_rate_limit_identity,
        check_throttle_handler=_is_chat_start,
    )
    app = Litestar(
        route_handlers=[
            chat_ui,
            info,
            WorkflowController,
            ChatController,
            LineageController,
            files_controller(settings),
            MetricsController,
            AuditController,
            ChatTreeController,
            ReplayController,
            SeriesController,
            BudgetController,
            HealthController,
            prometheus_metrics,
            chat_socket,
            run_agent,
            answer_ui_request,
            create_static_files_router(path="/static", directories=[STATIC]),
        ],
        lifespan=[
            executor_lifespan,
            identity_lifespan,
            database_lifespan,
            hub_lifespan,
            projections_lifespan,
            anchors_lifespan,
            telemetry_lifespan,
            supervisor_lifespan,
        ],
        dependencies=DEPENDENCIES,
        middleware=[
            DefineMiddleware(
                BearerAuthMiddleware,
                exclude=["^/$", "^/static", "^/health", "^/schema", "^/api/info$", "^/ws/"],
            ),
            rate_limit.middleware,
            prometheus.middleware,
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        # Closed unless MOZAIKS_CORS_ORIGINS lists origins (AG-UI frontends usually live on another one).
        cors_config=CORSConfig(allow_origins=list(settings.cors_origins)) if settings.cors_origins else None,
        openapi_config=OpenAPIConfig(
            title="Mozaiks AI Runtime",
            version="0.1.0",
            path="/schema",
            # In local mode (no MOZAIKS_AUTH_SECRET, no MOZAIKS_OIDC_ISSUER) no token is needed; else every route but the open ones.
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        bearer_format="JWT",
                        description="RS/PS/ES256 from MOZAIKS_OIDC_ISSUER, or HS256 signed with MOZAIKS_AUTH_SECRET",
                    )
                }
            ),
            security=[{"bearer": []}],
            # A page of the runtime's own (its CSP blocks the stock plugins' CDN and inline scripts).
            render_plugins=[SchemaPage(), JsonRenderPlugin(path="/openapi.json")],
        ),
        request_max_body_size=settings.max_body_bytes,
        on_shutdown=list(on_shutdown),
        before_send=[security_headers],
        logging_config=None,  # logs go through app.logging's structlog setup, not Litestar's own
    )
    app.state.settings = settings
    app.state.verifier = TokenVerifier(settings)
    app.state.workflows = WorkflowManager(settings.workflows_path)
    watch_projection_lag(lambda: app.state.get("projections"))
    state = app.state
    watch_runs(
        in_flight=lambda: state.executor.in_flight if state.get("executor") else 0,
        queued=lambda: state.executor.queued if state.get("executor") else 0,
        active=lambda: len(state.supervisor.tasks) if state.get("supervisor") else 0,
    )
    return app
