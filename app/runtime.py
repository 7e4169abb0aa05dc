"""Every service of one process, built by the app's lifespans and injected into handlers as `runtime`."""

from __future__ import annotations

from typing import Any

from app.hub import LiveHub
from app.observability import Observability
from app.orchestration import Orchestrator
from app.orchestration.pool import RoutingExecutor
from app.settings import Settings
from app.supervisor import RunSupervisor
from app.workflows import WorkflowManager
from domain.store import MongoEventStore
from projections.runner import ProjectionRunner


class Runtime:
    """Every service of one process, built by the lifespans and injected into handlers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.observability = Observability()
        self.workflows = WorkflowManager(settings.workflows_path)
        # The AsyncDatabase, set by the database lifespan.
        self.db: Any = None
        self.store: MongoEventStore | None = None
        self.hub: LiveHub | None = None
        self.supervisor: RunSupervisor | None = None
        self.projections: ProjectionRunner | None = None
        self.orchestrator: Orchestrator | None = None
        # The loop's default executor while the app runs (model calls apart from the runtime's I/O).
        self.executor: RoutingExecutor | None = None
