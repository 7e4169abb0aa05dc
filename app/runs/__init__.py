"""Runs of workflows: loading them, orchestration on AG2 (agents, model clients, recorder) and the run supervisor."""
