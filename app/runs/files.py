"""Uploaded files during a run: the reader behind the built-in `read_uploaded_file` tool.

A tool with an `uploads` parameter gets `ChatFiles(...).read`: it finds a file among the chat's
`file.uploaded` records (by name, the latest of that name, or by sha256) and gives its text from
GridFS, cut at `TOOL_READ_CHARS` characters. The parameter is hidden from the model, like `context`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Final

from domain.files import FileStore, text_of
from domain.store import MongoEventStore

# At most this many characters of a file reach an agent (bytes read: four times as many at most).
TOOL_READ_CHARS: Final = 64_000


class ChatFiles:
    """The files uploaded to one chat, as an agent reads them."""

    def __init__(self, store: MongoEventStore, chat_id: str) -> None:
        self.store = store
        self.chat_id = chat_id
        self.files = FileStore(store.db)

    async def read(self, name: str) -> str:
        """The text of the chat's file `name` (or sha256); an explanation naming the files when there is none."""
        uploaded = [r.data async for r in self.store.find(self.chat_id, types=["file.uploaded"])]
        match = [d for d in uploaded if name in (d.get("name"), d.get("sha256"))]
        if not match:
            names = ", ".join(sorted({str(d.get("name")) for d in uploaded})) or "none"
            return f"Error: no file {name!r} was uploaded to this chat (uploaded: {names})"
        content = await self.files.read(str(match[-1]["sha256"]), TOOL_READ_CHARS * 4)
        return text_of(content, TOOL_READ_CHARS)


def bind_uploads(function: Callable[..., Any], files: ChatFiles | None) -> Callable[..., Any]:
    """`function` as AG2 should call it: an `uploads` parameter gets the chat's file reader (hidden
    from the model's schema); other functions are returned as they are."""
    signature = inspect.signature(function)
    if "uploads" not in signature.parameters or files is None:
        return function

    @functools.wraps(function)
    async def with_uploads(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, uploads=files.read, **kwargs)
        return await result if inspect.isawaitable(result) else result

    with_uploads.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in signature.parameters.items() if name != "uploads"]
    )
    return with_uploads
