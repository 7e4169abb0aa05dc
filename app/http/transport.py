"""WebSocket transport: `/ws/chats/{chat_id}?after=SEQ` replays what the client missed, then goes live.

Server frames: `event`, `replay.done`, `heartbeat`, `error`. Client frames: `user.message`,
`input.response`, `ui.response`, `chat.stop`, `pong`. The log is the buffer: a client that reconnects with the
last seq it rendered gets every visible event after it exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from typing import Any, Final

import msgspec
import structlog
from litestar import WebSocket, websocket
from litestar.exceptions import NotAuthorizedException, WebSocketDisconnect

from app.http import codes
from app.http.auth import SUBPROTOCOL_PREFIX, IdentityUnavailable, Principal, authenticate
from app.http.budgets import refuse_over_budget
from app.http.codes import (
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_HEARTBEAT,
    CLOSE_SLOW,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_CHAT,
)
from app.http.errors import error_code
from app.hub import LiveHub, Overflowed
from app.observability import REPLAY_SIZE, WS_CLIENTS, WS_CLOSED
from app.runs.supervisor import RunSupervisor
from app.settings import Settings
from domain.errors import MozaiksError
from domain.events import Record, StreamRef, now
from domain.store import MongoEventStore, ReplayDone

log = structlog.get_logger("mozaiks.transport")

PROTOCOL: Final = "mozaiks.v1"
CLOSE_WAIT_S: Final = 5.0


# ---- frames -------------------------------------------------------------------------------------


class ServerFrame(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of the frames the server sends."""


class EventFrame(ServerFrame, tag="event", frozen=True, kw_only=True):
    seq: int
    event: dict[str, Any]


class ReplayDoneFrame(ServerFrame, tag="replay.done", frozen=True, kw_only=True):
    last_seq: int


class HeartbeatFrame(ServerFrame, tag="heartbeat", frozen=True, kw_only=True):
    ts: str


class ErrorFrame(ServerFrame, tag="error", frozen=True, kw_only=True):
    code: str
    message: str


class ClientFrame(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=True):
    """Base of the frames a client sends."""


class UserMessage(ClientFrame, tag="user.message", frozen=True, kw_only=True, forbid_unknown_fields=True):
    text: str


class InputResponse(ClientFrame, tag="input.response", frozen=True, kw_only=True, forbid_unknown_fields=True):
    request_id: str | None = None
    text: str


class UiResponse(ClientFrame, tag="ui.response", frozen=True, kw_only=True, forbid_unknown_fields=True):
    request_id: str
    answer: Any = None


class ChatStop(ClientFrame, tag="chat.stop", frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Pong(ClientFrame, tag="pong", frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


_encode = msgspec.json.Encoder().encode
_decode_client = msgspec.json.Decoder(UserMessage | InputResponse | UiResponse | ChatStop | Pong).decode


_FRAME_CACHE_SIZE: Final = 4096
_frames: OrderedDict[str, str] = OrderedDict()


def frame_text(frame: ServerFrame) -> str:
    """A server frame as the JSON text sent on the socket."""
    return _encode(frame).decode()


def event_frame(record: Record) -> str:
    """The `event` frame of a record (the client view: no raw AG2 event, no hash chain).

    Encoded once per record and process, not once per client: a chat's clients all get the same bytes.
    """
    frame = _frames.get(record.id)
    if frame is None:
        frame = _frames[record.id] = frame_text(EventFrame(seq=record.seq, event=record.public()))
        if len(_frames) > _FRAME_CACHE_SIZE:
            _frames.popitem(last=False)
    return frame


# ---- the connection ------------------------------------------------------------------------------


class _Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class ChatConnection:
    """One client's socket on one chat: sender, receiver and heartbeat tasks sharing one send lock."""

    def __init__(
        self,
        socket: WebSocket[Any, Any, Any],
        *,
        hub: LiveHub,
        supervisor: RunSupervisor,
        settings: Settings,
        principal: Principal,
        chat: Record,
    ) -> None:
        self.socket = socket
        self.hub = hub
        self.supervisor = supervisor
        self.settings = settings
        self.principal = principal
        self.chat = chat
        self.send_lock = asyncio.Lock()
        self.last_sent = 0
        self.last_heard = time.monotonic()
        self.overflow = asyncio.Event()

    async def send(self, payload: str) -> None:
        async with self.send_lock:
            await self.socket.send_data(payload, mode="text")

    async def serve(self, after: int) -> None:
        """Run until the client leaves or is closed; a disconnect never touches the chat's run."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.stream(after))
            group.create_task(self.receive())
            group.create_task(self.heartbeat())
            group.create_task(self.watch_overflow())

    async def watch_overflow(self) -> None:
        """Close a client the moment it falls too far behind, even while a send to it is blocked."""
        await self.overflow.wait()
        raise _Closed(CLOSE_SLOW, f"too slow; resume from seq {self.last_sent}")

    async def send_live(self, payload: str) -> None:
        """Send, but treat a client that takes longer than two heartbeats to take a frame as too slow."""
        try:
            async with asyncio.timeout(2 * self.settings.ws_heartbeat_s):  # a timer, not a task per frame
                await self.send(payload)
        except TimeoutError:
            raise Overflowed(self.last_sent) from None

    async def stream(self, after: int) -> None:
        replayed = 0
        self.last_sent = after
        try:
            async for item in self.hub.client_view(self.chat.chat_id, after, on_overflow=self.overflow.set):
                if isinstance(item, ReplayDone):
                    REPLAY_SIZE.observe(replayed)
                    await self.send(frame_text(ReplayDoneFrame(last_seq=item.last_seq)))
                    replayed = -1
                    continue
                await self.send_live(event_frame(item))
                if replayed >= 0:
                    replayed += 1
                self.last_sent = item.seq
        except Overflowed:
            raise _Closed(CLOSE_SLOW, f"too slow; resume from seq {self.last_sent}") from None

    async def receive(self) -> None:
        limit = self.settings.max_frame_bytes
        while True:
            raw = await self.socket.receive_data(mode="text")
            self.last_heard = time.monotonic()
            if len(raw) > limit:
                raise _Closed(CLOSE_TOO_BIG, f"frame over {limit} bytes")
            try:
                frame = _decode_client(raw)
            except msgspec.DecodeError as exc:
                await self.send(frame_text(ErrorFrame(code=codes.BAD_FRAME, message=f"{exc}")))
                continue
            await self.handle(frame)

    async def handle(self, frame: ClientFrame) -> None:
        supervisor = self.supervisor
        chat_id = self.chat.chat_id
        if isinstance(frame, Pong):
            return
        if not self.principal.can_control_chat(self.chat.user_id, self.chat.app_id):
            await self.send(
                frame_text(ErrorFrame(code=codes.FORBIDDEN, message="only the chat's own user may do that"))
            )
            return
        try:
            match frame:
                case UserMessage(text=text):
                    # A spent budget refuses a new turn (error frame `budget_exceeded`, as REST's 429).
                    first = self.chat
                    stream = StreamRef(
                        chat_id=chat_id, app_id=first.app_id, user_id=first.user_id, workflow=first.workflow
                    )
                    await refuse_over_budget(supervisor.orchestrator, stream)
                    await supervisor.send_message(chat_id, text)
                case InputResponse(request_id=request_id, text=text):
                    await supervisor.send_message(chat_id, text, request_id=request_id)
                case UiResponse(request_id=request_id, answer=answer):
                    await supervisor.answer_ui(chat_id, request_id, answer, self.principal.user_id)
                case ChatStop():
                    # The socket streams the run's end itself; waiting for it here would stop this loop
                    # reading (pongs too) and keep a closed client's connection open for up to STOP_WAIT_S.
                    await supervisor.stop(chat_id, by=self.principal.user_id, wait=False)
        except MozaiksError as exc:
            await self.send(frame_text(ErrorFrame(code=error_code(exc), message=str(exc))))

    async def heartbeat(self) -> None:
        interval = self.settings.ws_heartbeat_s
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self.last_heard > 2 * interval:
                raise _Closed(CLOSE_HEARTBEAT, f"no answer to heartbeats for {2 * interval:g} s")
            await self.send(frame_text(HeartbeatFrame(ts=now().isoformat().replace("+00:00", "Z"))))


def _chosen_subprotocol(socket: WebSocket[Any, Any, Any]) -> str | None:
    offered = list(socket.scope.get("subprotocols") or ())
    if PROTOCOL in offered:
        return PROTOCOL
    # A browser that offered only its token must get one of its offers back, or it drops the socket.
    return next((p for p in offered if p.startswith(SUBPROTOCOL_PREFIX)), None)


async def _refuse(socket: WebSocket[Any, Any, Any], code: int, error: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await socket.send_data(frame_text(ErrorFrame(code=error, message=message)), mode="text")
        await socket.close(code=code, reason=message[:120])
    WS_CLOSED.labels(error).inc()


@websocket("/ws/chats/{chat_id:str}")
async def chat_socket(
    socket: WebSocket[Any, Any, Any],
    chat_id: str,
    store: MongoEventStore,
    hub: LiveHub,
    supervisor: RunSupervisor,
    settings: Settings,
) -> None:
    """Stream a chat: replay after `after`, `replay.done`, then live events; accept client frames."""
    await socket.accept(subprotocols=_chosen_subprotocol(socket))
    raw_after = socket.query_params.get("after", "0")
    try:
        after = int(raw_after)
        if after < 0:
            raise ValueError
    except ValueError:
        await _refuse(
            socket, CLOSE_BAD_REQUEST, codes.BAD_REQUEST, f"after={raw_after!r} must be a whole number >= 0"
        )
        return
    try:
        principal = await authenticate(
            socket, "missing bearer token (bearer.<token> subprotocol or Authorization header)"
        )
    except NotAuthorizedException as exc:
        await _refuse(socket, CLOSE_UNAUTHORIZED, error_code(exc), str(exc.detail))
        return
    except IdentityUnavailable as exc:
        await _refuse(socket, CLOSE_TRY_AGAIN_LATER, codes.IDENTITY_UNAVAILABLE, str(exc))
        return
    first = await anext(store.read(chat_id, limit=1), None)
    if first is None:
        await _refuse(socket, CLOSE_UNKNOWN_CHAT, codes.UNKNOWN_CHAT, f"chat {chat_id} does not exist")
        return
    if not principal.can_read_chat(first.user_id, first.app_id):
        await _refuse(socket, CLOSE_FORBIDDEN, codes.FORBIDDEN, f"you may not read chat {chat_id}")
        return
    connection = ChatConnection(
        socket, hub=hub, supervisor=supervisor, settings=settings, principal=principal, chat=first
    )
    WS_CLIENTS.inc()
    try:
        await connection.serve(after)
    except* WebSocketDisconnect:
        pass
    except* _Closed as group:
        closed = group.exceptions[0]
        assert isinstance(closed, _Closed)
        WS_CLOSED.labels(str(closed.code)).inc()
        log.info("ws.closing", chat_id=chat_id, code=closed.code, reason=closed.reason)
        # The close frame waits behind what the client has not read yet: give it a moment, then drop it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(socket.close(code=closed.code, reason=closed.reason[:120]), CLOSE_WAIT_S)
    except* Exception as group:
        log.error("ws.failed", chat_id=chat_id, errors=[repr(e) for e in group.exceptions])
        raise
    finally:
        WS_CLIENTS.dec()
