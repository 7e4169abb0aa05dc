"""Every service of one process, built by the app's lifespans and injected into handlers as `runtime`."""

from __future__ import annotations

from typing import Any

from app.hub import LiveHub
from app.observability import Observability
from app.runs.orchestrator import Orchestrator
from app.runs.supervisor import RunSupervisor
from app.runs.workflows import WorkflowManager
from app.settings import Settings
from domain.anchors import AnchorBook
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
        # The tail anchors (set by the anchors lifespan).
        self.anchors: AnchorBook | None = None
