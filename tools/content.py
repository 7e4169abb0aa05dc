"""Content generation: deterministic drafts from a topic, so offline runs are reproducible."""

from __future__ import annotations

from typing import Any

_FORMATS = {
    "headline": "{Topic}: what you need to know",
    "tagline": "{Topic}, made simple.",
    "paragraph": (
        "{Topic} matters because it shapes everyday decisions. This draft introduces {topic}, "
        "explains why it is useful, and ends with one clear next step for the reader."
    ),
    "outline": "1. What {topic} is\n2. Why {topic} matters\n3. How to start with {topic}",
}


def generate_content(topic: str, format: str = "paragraph", context: dict[str, Any] | None = None) -> str:
    """Draft a headline, tagline, paragraph or outline about a topic."""
    topic = topic.strip()
    if not topic:
        raise ValueError("topic must not be empty")
    template = _FORMATS.get(format)
    if template is None:
        raise ValueError(f"unknown format {format!r}; use one of {', '.join(sorted(_FORMATS))}")
    text = template.format(topic=topic, Topic=topic[:1].upper() + topic[1:])
    if context is not None:
        # Remember what was drafted so later agents (and the log) can refer to it.
        context["drafts"] = int(context.get("drafts") or 0) + 1
        context["last_topic"] = topic
    return text
