"""The recorder's mapping: every AG2 event of a run becomes exactly one Pending, typed when it can be.

The original AG2 event is kept whole as JSON text in `Pending.ag2`. Three AG2 events hold live
objects (agents, transition targets, the input `respond` callback) that pydantic cannot dump;
`ag2_json` serialises those objects itself: an agent as its name, a target as its type and fields,
a callable as null, an exception as its type and message.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import msgspec
from autogen.agentchat.agent import Agent
from autogen.agentchat.group.targets.transition_target import TransitionTarget
from autogen.code_utils import content_str
from pydantic import BaseModel

from app.runs.clients import LlmCallNote, TextChunk
from app.runs.ui import UiNote
from domain.events import (
    Ag2Event,
    AnyEvent,
    Handoff,
    InputRequested,
    MessageAgent,
    MessageDelta,
    Pending,
    SpeakerSelected,
    ToolCalled,
    ToolResult,
    new_id,
)

_HANDOFF_KINDS: Final = {
    "after_works_transition": "after_work",
    "on_condition_l_l_m_transition": "llm_condition",
    "on_context_condition_transition": "context_condition",
    "reply_result_transition": "reply_result",
}


def live_object(value: Any) -> Any:
    """JSON form of an object pydantic cannot serialise (pydantic's `fallback` hook)."""
    if isinstance(value, Agent):
        return value.name
    if isinstance(value, TransitionTarget):
        body: dict[str, Any] = {"target_type": type(value).__name__, "display_name": value.display_name()}
        try:
            body.update(json.loads(value.model_dump_json(fallback=live_object, serialize_as_any=True)))
        except Exception:  # noqa: BLE001 - a target with exotic fields still gets its type and name
            pass
        return body
    if isinstance(value, BaseException):
        return {"error_type": type(value).__name__, "message": str(value)}
    if isinstance(value, BaseModel):
        return json.loads(value.model_dump_json(fallback=live_object, serialize_as_any=True))
    if callable(value):
        return None  # e.g. InputRequestEvent.respond: a live callback, meaningless once stored
    return repr(value)


def ag2_json(event: BaseModel) -> str:
    """The AG2 event as exact JSON text (`{"type": ..., "content": {...}}`), live objects included."""
    # serialize_as_any: fields typed with a base class (TransitionTarget) keep their subclass's fields.
    return event.model_dump_json(fallback=live_object, serialize_as_any=True)


class OpenMessage:
    """A message being streamed: its text so far, and the part not yet in a `message.delta`."""

    def __init__(self, agent: str, message_id: str) -> None:
        self.agent = agent
        self.message_id = message_id
        self.text: list[str] = []
        self.unflushed: list[str] = []
        self.deltas = 0


class RunMapper:
    """Maps one run's AG2 events (and the runtime's LLM notes and streamed text) to Pendings.

    Agents of the workflow speak `message.agent`; the human's words are already in the log as
    `message.user`/`input.received`, so AG2's echo of them is kept as `ag2.event`.

    Streaming: text chunks of an agent's model call collect in an `OpenMessage`; `flush()` turns
    what collected into one `message.delta` per message. The agent's next `text` event completes
    the message: its `message.agent` carries the message id and, as content, exactly the streamed
    text (the deltas concatenate to it by construction; AG2's own event stays whole in `ag2`). A
    tool-calling reply that also streamed text completes it the same way. A message that never gets
    its `message.agent` (run stopped, failed or killed, or a retried call's abandoned attempt) is
    incomplete: its deltas stay in the log, nothing else marks it.
    """

    def __init__(
        self,
        *,
        run_id: str,
        group_agents: set[str],
        visual_agents: frozenset[str],
        user_agent: str | None,
    ) -> None:
        self.run_id = run_id
        self.group_agents = group_agents
        self.visual_agents = visual_agents
        self.user_agent = user_agent
        # call_id -> (agent, arguments exactly as the model wrote them), from the tool_call events.
        self.calls: dict[str, tuple[str, str]] = {}
        # tool name -> the id of its latest call being executed (a UI tool's request names it).
        self.executing: dict[str, str] = {}
        # agent -> the message its model call is streaming (group agents only).
        self.open: dict[str, OpenMessage] = {}
        # The last visible agent message's text: `run.completed.summary` (never a hidden agent's words).
        self.summary: str | None = None
        # agent -> its last validated structured reply, for the `message.agent` that follows.
        self.structured: dict[str, dict[str, Any]] = {}

    @property
    def unflushed(self) -> bool:
        """Whether streamed text is waiting for its `message.delta`."""
        return any(message.unflushed for message in self.open.values())

    def map_chunk(self, chunk: TextChunk) -> list[Pending]:
        """Collect a chunk; returns the last delta of an abandoned attempt when a new one starts."""
        out: list[Pending] = []
        message = self.open.get(chunk.agent)
        if message is None or message.message_id != chunk.message_id:
            if message is not None:
                out = self._flush(message)  # a retried call: the earlier attempt stays incomplete
            message = self.open[chunk.agent] = OpenMessage(chunk.agent, chunk.message_id)
        message.text.append(chunk.text)
        message.unflushed.append(chunk.text)
        return out

    def flush(self) -> list[Pending]:
        """One `message.delta` per message with text not yet recorded."""
        return [pending for message in self.open.values() for pending in self._flush(message)]

    def _flush(self, message: OpenMessage) -> list[Pending]:
        if not message.unflushed:
            return []
        text = "".join(message.unflushed)
        message.unflushed.clear()
        delta = MessageDelta(message_id=message.message_id, index=message.deltas, text=text)
        message.deltas += 1
        return [self.pending(delta, message.agent, None)]

    def complete(self, agent: str, content: str, recipient: str | None, raw: str | None) -> Pending:
        """The `message.agent` of an agent's reply: the streamed message's id and text when it streamed."""
        message = self.open.pop(agent, None)
        structured = self.structured.pop(agent, None)
        if message is None:
            return self.pending(
                MessageAgent(
                    content=content, recipient=recipient, message_id=new_id(), structured=structured
                ),
                agent,
                raw,
            )
        text = "".join(message.text)
        return self.pending(
            MessageAgent(
                content=text, recipient=recipient, message_id=message.message_id, structured=structured
            ),
            agent,
            raw,
        )

    def visible(self, agent: str | None, typed: bool, named: tuple[str, ...] = ()) -> bool:
        """Whether users see a record: the one place the runtime decides it.

        Typed events show when their agent is visual (or none) and no other agent they name (a
        handoff's target, a random choice's candidates) is a hidden one; raw `ag2.event`s never show.
        Auditors read every record whatever this says.
        """
        if not typed:
            return False
        if agent is not None and agent not in self.visual_agents and agent != self.user_agent:
            return False
        return not any(name in self.group_agents and name not in self.visual_agents for name in named)

    def unnamed(self, text: str) -> str:
        """`text` for a record users read (a failed run's error): hidden agents' names replaced."""
        hidden = sorted(self.group_agents - self.visual_agents, key=len, reverse=True)
        if not hidden:
            return text
        return re.sub(rf"\b(?:{'|'.join(map(re.escape, hidden))})\b", "a hidden agent", text)

    def pending(
        self,
        event: AnyEvent,
        agent: str | None,
        ag2: str | None,
        *,
        typed: bool = True,
        named: tuple[str, ...] = (),
    ) -> Pending:
        """A Pending of this run; `named`: the other agents the event names (see `visible`)."""
        visible = self.visible(agent, typed, named)
        if visible and isinstance(event, MessageAgent) and event.content:
            self.summary = event.content  # what run.completed reports: the last words users saw
        return Pending(event=event, agent=agent, visible=visible, run_id=self.run_id, ag2=ag2)

    def map_note(self, note: LlmCallNote) -> Pending:
        """The runtime's own `llm.call` record."""
        return self.pending(note.call, note.agent, None)

    def map_event(self, event: Any) -> list[Pending]:
        """The Pendings of one AG2 event: exactly one, after the `message.agent` of text it streamed."""
        kind = str(getattr(event, "type", type(event).__name__))
        sender = getattr(getattr(event, "content", event), "sender", None)
        streamed = self.open.get(sender) if isinstance(sender, str) else None
        if kind == "tool_call" and streamed is not None:
            # A tool-calling reply that also said something: that text is a message of its own.
            recipient = getattr(event.content, "recipient", None)
            said = [self.complete(streamed.agent, "", recipient, None)] if streamed.text else []
            self.open.pop(streamed.agent, None)
            return [*said, self.map_one(event)]
        return [self.map_one(event)]

    def map_one(self, event: Any) -> Pending:
        """Exactly one Pending for one AG2 event."""
        raw = (
            ag2_json(event)
            if isinstance(event, BaseModel)
            else json.dumps({"type": type(event).__name__, "repr": repr(event)})
        )
        kind = str(getattr(event, "type", type(event).__name__))
        c: Any = getattr(event, "content", event)
        match kind:
            case "text" if c.sender in self.group_agents:
                return self.complete(
                    c.sender, content_str(c.content) if c.content is not None else "", c.recipient, raw
                )
            case "tool_call":
                for call in c.tool_calls:
                    if call.id:
                        self.calls[call.id] = (c.sender, call.function.arguments or "{}")
                return self.pending(Ag2Event(name=kind), c.sender, raw, typed=False)
            case "execute_function":
                agent, arguments = self.calls.get(c.call_id or "", (c.recipient, json.dumps(c.arguments)))
                self.executing[c.func_name] = c.call_id or ""
                return self.pending(
                    ToolCalled(tool=c.func_name, call_id=c.call_id or "", arguments=arguments), agent, raw
                )
            case "executed_function":
                agent = self.calls.get(c.call_id or "", (c.recipient, ""))[0]
                result = ToolResult(
                    tool=c.func_name,
                    call_id=c.call_id or "",
                    content=content_str(c.content) if isinstance(c.content, (str, list)) else str(c.content),
                    is_error=not c.is_exec_success,
                )
                return self.pending(result, agent, raw)
            case "group_chat_run_chat":
                return self.pending(SpeakerSelected(speaker=c.speaker), c.speaker, raw)
            case "input_request":
                return self.pending(InputRequested(request_id=str(c.uuid), prompt=c.prompt), None, raw)
            case _ if kind in _HANDOFF_KINDS:
                source = c.source_agent.name if isinstance(c.source_agent, Agent) else str(c.source_agent)
                target = c.transition_target
                if hasattr(target, "agent_names"):
                    # A random target is drawn only after this event: record the choice set instead.
                    named = tuple(target.agent_names)
                    name, reason = "random", f"random choice among {', '.join(named)}"
                else:
                    name, reason = getattr(target, "agent_name", None) or target.display_name(), str(target)
                    named = (name,)
                return self.pending(
                    Handoff(source=source, target=name, kind=_HANDOFF_KINDS[kind], reason=reason),
                    source,
                    raw,
                    named=named,
                )
            case _:
                agent = getattr(c, "sender", None)
                agent = (
                    agent
                    if isinstance(agent, str) and (agent in self.group_agents or agent == self.user_agent)
                    else None
                )
                return self.pending(Ag2Event(name=kind), agent, raw, typed=False)

    def map_ui(self, note: UiNote) -> Pending:
        """The `ui.requested` of a UI tool's call: after its `tool.called`, always visible (the user answers it)."""
        call_id = self.executing.get(note.request.tool, "")
        agent = self.calls.get(call_id, (None, ""))[0]
        request = msgspec.structs.replace(note.request, tool_call_id=call_id)
        return Pending(event=request, agent=agent, visible=True, run_id=self.run_id)
