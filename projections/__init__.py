"""Projections derived from the event log: chat_sessions and chat_metrics."""
