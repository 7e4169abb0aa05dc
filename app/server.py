"""The Litestar application: `create_app()` wires settings, lifespans, auth, controllers and the ChatUI.

Each resource is its own lifespan, entered in order and shut down in reverse: the database (and
embedded server), the live hub, the projection runner, the run supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import structlog
from litestar import Litestar, MediaType, Request, Response, get
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi.config import OpenAPIConfig
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from litestar.response import File
from litestar.static_files import create_static_files_router

from app.api import ChatController, HealthController, MetricsController, WorkflowController, info
from app.auth import BearerAuthMiddleware, token_from
from app.database import open_database
from app.hub import LiveHub
from app.orchestration import Orchestrator
from app.orchestration.pool import routed_default_executor
from app.runtime import Runtime
from app.settings import Settings
from app.supervisor import NoActiveRun, NodeBusy, RunActive, RunSupervisor
from app.transport import chat_socket
from app.workflows import UnknownWorkflow
from domain.errors import Conflict, CorruptRecord, UnknownChat
from domain.store import MongoEventStore
from projections.runner import ProjectionRunner

STATIC = Path(__file__).parent / "static"
SHUTDOWN_WAIT_S = 5.0
log = structlog.get_logger("mozaiks.server")


def _runtime(app: Litestar) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


@contextlib.asynccontextmanager
async def executor_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Model calls get threads of their own (MOZAIKS_MAX_CONCURRENT_LLM_CALLS); see app.orchestration.pool."""
    runtime = _runtime(app)
    with routed_default_executor(asyncio.get_running_loop(), runtime.settings.max_concurrent_llm_calls) as executor:
        runtime.executor = executor
        try:
            yield
        finally:
            runtime.executor = None


@contextlib.asynccontextmanager
async def database_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Open the database (starting the embedded server when no DATABASE_URI is set)."""
    runtime = _runtime(app)
    async with open_database(runtime.settings) as db:
        runtime.db = db
        runtime.store = MongoEventStore(db)
        await runtime.store.ensure_indexes()
        log.info("database.ready", db=runtime.settings.db_name, embedded=runtime.settings.database_uri is None)
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
    runtime = _runtime(app)
    assert runtime.store is not None
    runtime.hub = LiveHub(runtime.store, runtime.settings.ws_queue_max)
    async with _background("live-hub", runtime.hub.run()):
        await asyncio.wait_for(runtime.hub.wait_ready(), 30)
        yield


@contextlib.asynccontextmanager
async def projections_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Keep chat_sessions and chat_metrics up to date from the log (on the replica holding the lease)."""
    runtime = _runtime(app)
    assert runtime.store is not None
    settings = runtime.settings
    # One writer across replicas (the holder of the projection lease); the others stand by.
    runtime.projections = ProjectionRunner.for_settings(
        runtime.db, runtime.store, settings.prices_path, owner=settings.node_id, lease_ttl_s=settings.lease_ttl_s
    )
    async with _background("projection-runner", runtime.projections.run()):
        yield


@contextlib.asynccontextmanager
async def supervisor_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Runs in the background, each guarded by a lease; expired leases recovered as interrupted runs."""
    runtime = _runtime(app)
    assert runtime.store is not None
    assert runtime.hub is not None
    # Runs learn about input answers and stops from the process's one change stream (the hub).
    runtime.orchestrator = Orchestrator(runtime.store, runtime.workflows, runtime.settings, follow=runtime.hub.records)
    runtime.supervisor = RunSupervisor(runtime.db, runtime.store, runtime.orchestrator, runtime.settings)
    async with _background("lease-watch", runtime.supervisor.watch_leases()):
        try:
            yield
        finally:
            await runtime.supervisor.shutdown()


def _error(status: int, code: str) -> Any:
    def handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        return Response({"error": code, "detail": str(exc)}, status_code=status, media_type=MediaType.JSON)

    return handler


def _node_busy(request: Request[Any, Any, Any], exc: NodeBusy) -> Response[Any]:
    return Response(
        {"error": "node_busy", "detail": str(exc)},
        status_code=503,
        media_type=MediaType.JSON,
        headers={"Retry-After": str(exc.retry_after_s)},
    )


def _rate_limit_identity(request: Request[Any, Any, Any]) -> str:
    # Rate limits count per user: the bearer token (one per user) or, in local mode, the address.
    token = token_from(request)
    return f"token:{hash(token)}" if token else f"addr:{request.client.host if request.client else '?'}"


def _is_chat_start(request: Request[Any, Any, Any]) -> bool:
    return request.method == "POST" and request.url.path.rstrip("/") == "/api/chats"


@get("/", include_in_schema=False, media_type=MediaType.HTML)
async def chat_ui() -> File:
    """The ChatUI page."""
    return File(STATIC / "index.html", content_disposition_type="inline", media_type=MediaType.HTML)


def create_app(settings: Settings | None = None, on_shutdown: list[Callable[[], Any]] | None = None) -> Litestar:
    """Build the application for `settings` (default: from the environment).

    `on_shutdown` hooks run after every lifespan has closed (the CLI stops its embedded server there).
    """
    settings = settings or Settings.from_env()
    runtime = Runtime(settings)
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
            MetricsController,
            HealthController,
            PrometheusController,
            chat_socket,
            create_static_files_router(path="/static", directories=[STATIC]),
        ],
        lifespan=[executor_lifespan, database_lifespan, hub_lifespan, projections_lifespan, supervisor_lifespan],
        dependencies={"runtime": Provide(lambda: runtime, sync_to_thread=False)},
        middleware=[
            DefineMiddleware(
                BearerAuthMiddleware, exclude=["^/$", "^/static", "^/health", "^/schema", "^/api/info$", "^/ws/"]
            ),
            rate_limit.middleware,
            prometheus.middleware,
        ],
        exception_handlers={
            UnknownChat: _error(404, "unknown_chat"),
            UnknownWorkflow: _error(404, "unknown_workflow"),
            Conflict: _error(409, "conflict"),
            RunActive: _error(409, "run_active"),
            NoActiveRun: _error(409, "no_active_run"),
            NodeBusy: _node_busy,
            CorruptRecord: _error(500, "corrupt_record"),
        },
        openapi_config=OpenAPIConfig(title="Mozaiks AI Runtime", version="0.1.0", path="/schema"),
        request_max_body_size=settings.max_body_bytes,
        on_shutdown=on_shutdown or [],
        logging_config=None,  # logs go through app.logging's structlog setup, not Litestar's own
    )
    app.state.runtime = runtime
    app.state.settings = settings
    runtime.observability.bind(runtime)
    return app


