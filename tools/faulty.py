"""A tool that always fails, to show (and test) that a raising tool is reported, not fatal."""

from __future__ import annotations


def flaky_lookup(key: str) -> str:
    """Look a key up in a service that is down (always raises)."""
    raise ConnectionError(f"lookup service unavailable for key {key!r}")
