"""A file tool sandboxed to one workspace folder: paths that escape it are refused.

The workspace is `MOZAIKS_WORKSPACE` (default `.mozaiks/workspace`), created on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_BYTES = 256 * 1024


class WorkspaceError(ValueError):
    """A path outside the workspace, or a file the tool will not read or write."""


def workspace() -> Path:
    """The sandbox folder, resolved (symlinks included) and created if needed."""
    root = Path(os.environ.get("MOZAIKS_WORKSPACE") or ".mozaiks/workspace").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _inside(path: str) -> Path:
    root = workspace()
    if not path or "\0" in path:
        raise WorkspaceError("path must be a non-empty relative path")
    # resolve() follows symlinks and '..', so a link or a climb out of the workspace is caught too.
    target = (root / path).resolve()
    if target != root and not target.is_relative_to(root):
        raise WorkspaceError(f"path {path!r} is outside the workspace")
    return target


def write_file(path: str, content: str) -> str:
    """Write a UTF-8 text file inside the workspace and report its size."""
    data = content.encode("utf-8")
    if len(data) > MAX_BYTES:
        raise WorkspaceError(f"content is {len(data)} bytes; the limit is {MAX_BYTES}")
    target = _inside(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return f"wrote {len(data)} bytes to {target.relative_to(workspace())}"


def read_file(path: str) -> str:
    """Read a UTF-8 text file from the workspace."""
    target = _inside(path)
    if not target.is_file():
        raise WorkspaceError(f"no file {path!r} in the workspace")
    if target.stat().st_size > MAX_BYTES:
        raise WorkspaceError(f"file {path!r} is larger than {MAX_BYTES} bytes")
    return target.read_text(encoding="utf-8")


def list_files(folder: str = ".") -> str:
    """List the files of a workspace folder, one relative path per line."""
    target = _inside(folder)
    if not target.is_dir():
        raise WorkspaceError(f"no folder {folder!r} in the workspace")
    root = workspace()
    return "\n".join(sorted(str(p.relative_to(root)) for p in target.rglob("*") if p.is_file()))
