"""Reading the files a user uploaded to the chat (built in: the runtime hands the tool its reader)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable


async def read_uploaded_file(name: str, uploads: Callable[[str], Awaitable[str]]) -> str:
    """Read a file the user uploaded to this chat, by its file name or sha256: its text (long files are cut)."""
    return await uploads(name)
