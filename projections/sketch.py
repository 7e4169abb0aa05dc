"""Latency percentiles that merge: a DDSketch log-bucket histogram stored as `{bucket key: count}`.

A latency goes to bucket `LogarithmicMapping(RELATIVE_ACCURACY).key(ms)`; the stored counts are
`$inc`ed, so the histograms of many chats (or agents) merge by adding counts, and a rebuild yields
the same counts as the live projection. A quantile read from the buckets is within
`RELATIVE_ACCURACY` (1 %) of the exact value at the same rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

from ddsketch.mapping import LogarithmicMapping

RELATIVE_ACCURACY: Final = 0.01
# Latencies below this (scripted offline calls) go to one zero bucket, read back as 0 ms.
ZERO_BELOW_MS: Final = 1e-3
ZERO_KEY: Final = "z"

_mapping: Final = LogarithmicMapping(RELATIVE_ACCURACY)


def bucket_key(latency_ms: float) -> str:
    """The histogram bucket (a MongoDB field name) of one latency in milliseconds."""
    if not latency_ms >= ZERO_BELOW_MS or math.isinf(latency_ms):  # also catches NaN
        return ZERO_KEY
    return f"k{_mapping.key(latency_ms)}"


def bucket_value(key: str) -> float:
    """The latency (ms) a bucket stands for: within RELATIVE_ACCURACY of every latency in it."""
    if key == ZERO_KEY:
        return 0.0
    return float(_mapping.value(int(key[1:])))


def _order(key: str) -> float:
    return -math.inf if key == ZERO_KEY else int(key[1:])


def merge(histograms: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The sum of several histograms (e.g. of many chats)."""
    total: dict[str, int] = {}
    for histogram in histograms:
        for key, count in histogram.items():
            total[key] = total.get(key, 0) + int(count)
    return total


def quantile(histogram: Mapping[str, int], q: float) -> float | None:
    """The q-quantile (0 ≤ q ≤ 1) in ms, DDSketch's definition: the value at rank q·(n−1); None if empty."""
    keys = sorted((key for key, count in histogram.items() if count > 0), key=_order)
    total = sum(int(histogram[key]) for key in keys)
    if total == 0:
        return None
    rank = q * (total - 1)
    running = 0
    for key in keys:
        running += int(histogram[key])
        if running > rank:
            return bucket_value(key)
    return bucket_value(keys[-1])
