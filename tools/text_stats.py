"""Text statistics: counts and readability figures of a text."""

from __future__ import annotations

import json
import re
from typing import Any

_WORD = re.compile(r"[A-Za-z0-9']+")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


def text_statistics(text: str, context: dict[str, Any] | None = None) -> str:
    """Count characters, words, sentences and the average word length of a text (JSON)."""
    words = _WORD.findall(text)
    sentences = max(1, len(_SENTENCE_END.findall(text))) if text.strip() else 0
    stats = {
        "characters": len(text),
        "words": len(words),
        "sentences": sentences,
        "average_word_length": round(sum(map(len, words)) / len(words), 2) if words else 0.0,
        "words_per_sentence": round(len(words) / sentences, 2) if sentences else 0.0,
    }
    if context is not None:
        context["last_word_count"] = stats["words"]
    return json.dumps(stats, sort_keys=True)
