"""The change one event makes to a projected document, as MongoDB update operators.

The same `Update` is sent to MongoDB on the live path and applied in memory by a rebuild, so both
paths produce the same document. Every number a projector `$inc`s is an integer (tokens, nano-USD,
microseconds, bucket counts), so sums are exact and do not depend on how events are batched.
"""

from __future__ import annotations

from typing import Any

from domain.errors import MozaiksError


class ProjectionError(MozaiksError):
    """A projector produced an update that cannot be applied (a bug in the projector, not in the log)."""


def field_key(name: str) -> str:
    """A name (an agent's, a model's) made safe as one MongoDB field-name segment; see `name_of_key`."""
    # '.' splits a path and a leading '$' is an operator, so both are escaped, with '%' itself.
    return name.replace("%", "%25").replace(".", "%2E").replace("$", "%24") or "%00"


def name_of_key(key: str) -> str:
    """The original name of a `field_key`."""
    if key == "%00":
        return ""
    return key.replace("%24", "$").replace("%2E", ".").replace("%25", "%")


class Update:
    """`$set`, `$inc`, `$max` and `$push` over dotted paths; merges with later updates of the same chat.

    `keep[path] = n` bounds a pushed array to its last `n` items (`$push` with `$slice`).
    """

    __slots__ = ("inc", "keep", "max", "push", "set")

    def __init__(self) -> None:
        self.set: dict[str, Any] = {}
        self.inc: dict[str, int] = {}
        self.max: dict[str, int] = {}
        self.push: dict[str, list[Any]] = {}
        self.keep: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.set or self.inc or self.max or self.push)

    def merge(self, later: Update) -> None:
        """Fold `later` (the next event's update) into this one, as if both were applied in order."""
        mine = {**dict.fromkeys(self.set, "set"), **dict.fromkeys(self.inc, "inc")}
        mine.update(dict.fromkeys(self.max, "max"))
        mine.update(dict.fromkeys(self.push, "push"))
        for kind, paths in (("set", later.set), ("inc", later.inc), ("max", later.max), ("push", later.push)):
            for path in paths:
                if mine.get(path, kind) != kind:
                    raise ProjectionError(f"path {path!r} is changed by both ${mine[path]} and ${kind}")
        self.set.update(later.set)
        for path, delta in later.inc.items():
            self.inc[path] = self.inc.get(path, 0) + delta
        for path, value in later.max.items():
            self.max[path] = max(self.max.get(path, value), value)
        for path, items in later.push.items():
            self.push.setdefault(path, []).extend(items)
        self.keep.update(later.keep)

    def document(self, last_seq: int) -> dict[str, Any]:
        """The MongoDB update document, also moving the chat's `last_seq` to `last_seq`."""
        doc: dict[str, Any] = {"$set": {**self.set, "last_seq": last_seq}}
        if self.inc:
            doc["$inc"] = dict(self.inc)
        if self.max:
            doc["$max"] = dict(self.max)
        if self.push:
            doc["$push"] = {
                path: {"$each": list(items), **({"$slice": -self.keep[path]} if path in self.keep else {})}
                for path, items in self.push.items()
            }
        return doc

    def apply(self, doc: dict[str, Any]) -> None:
        """Apply the update to an in-memory document exactly as MongoDB would."""
        for path, value in self.set.items():
            parent, leaf = _parent(doc, path)
            parent[leaf] = value
        for path, delta in self.inc.items():
            parent, leaf = _parent(doc, path)
            parent[leaf] = parent.get(leaf, 0) + delta
        for path, value in self.max.items():
            parent, leaf = _parent(doc, path)
            current = parent.get(leaf)
            if current is None or value > current:
                parent[leaf] = value
        for path, items in self.push.items():
            parent, leaf = _parent(doc, path)
            parent.setdefault(leaf, []).extend(items)
            if path in self.keep:
                parent[leaf] = parent[leaf][-self.keep[path] :]


def _parent(doc: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    *parents, leaf = path.split(".")
    node = doc
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        node = child
    return node, leaf
