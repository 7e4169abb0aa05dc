"""Orchestration on AG2: agent factory, model clients, the recorder and the Orchestrator."""

from app.orchestration.orchestrator import Orchestrator, RunReport

__all__ = ["Orchestrator", "RunReport"]
