"""Workflow hooks, derived context variables and context handoffs at run time.

- `resolve_hooks` / `check_context`: the manifest checks (`mozaiks workflows validate` runs them).
- `HookRunner`: runs a workflow's hooks at the points of a run (before/after the chat, each agent's
  reply, each tool call) under `MOZAIKS_HOOK_TIMEOUT_S`, applies what they return to the context
  variables and derives variables from agents' text, tool results and user text. Everything it
  does is a note (`HookNote`, `ContextChange`) that becomes a record in the log.
- `Causes`: places each `context.updated` right after the record that caused it and fills in that
  record's seq (`cause`) when the batch is appended.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

import msgspec

from domain.errors import ManifestError
from domain.events import ContextUpdated, HookCalled, Pending, Record, StreamRef
from domain.hooks import HookCall, HookFailed, derivation_applies, derive
from domain.manifest import (
    AgentSpec,
    ContextVariablesManifest,
    Derived,
    HooksManifest,
    HookSpec,
    ToolsManifest,
)

if TYPE_CHECKING:
    from autogen import ConversableAgent
    from autogen.agentchat.agent import Agent
    from autogen.agentchat.group import ContextVariables

# AG2 is imported where it is used (a run, a context condition being checked), not at import time:
# the server starts without it (see app.runs.orchestrator.load_ag2).
HOOKS_FILE: Final = "hooks.json"
CONTEXT_FILE: Final = "context_variables.json"
AGENTS_FILE: Final = "agents.json"
# Sync hooks run here, so a slow one never holds the event loop or AG2's model-call pool.
_POOL: Final = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mozaiks-hook")


class Hook(msgspec.Struct, frozen=True, kw_only=True):
    """A hooks.json entry resolved to its function."""

    spec: HookSpec
    function: Callable[..., Any]
    is_async: bool


# (workflow, "tools.<module>:<fn>", file, JSON path, problems) -> the function, or None with a problem added.
Importer = Callable[[str, str, str, str, list[ManifestError]], Callable[..., Any] | None]


def resolve_hooks(
    name: str,
    manifest: HooksManifest,
    agents: list[AgentSpec],
    problems: list[ManifestError],
    import_function: Importer,
) -> list[Hook]:
    """hooks.json's entries with their functions; each problem (function, signature, agent) is added."""
    known = {agent.name for agent in agents}
    hooks: list[Hook] = []
    for i, spec in enumerate(manifest.hooks):
        where = f"$.hooks[{i}]"
        for j, agent in enumerate(spec.agents):
            if known and agent not in known:
                problems.append(
                    ManifestError(
                        name,
                        HOOKS_FILE,
                        f"{where}.agents[{j}]",
                        f"unknown agent {agent!r} (agents: {', '.join(sorted(known))})",
                    )
                )
        function = import_function(name, spec.function, HOOKS_FILE, f"{where}.function", problems)
        if function is None:
            continue
        try:
            inspect.signature(function).bind(object())
        except (TypeError, ValueError):
            problems.append(
                ManifestError(
                    name,
                    HOOKS_FILE,
                    f"{where}.function",
                    f"{spec.function} must take exactly one argument (the hook call), e.g. def {spec.function.partition(':')[2]}(call)",
                )
            )
            continue
        hooks.append(Hook(spec=spec, function=function, is_async=inspect.iscoroutinefunction(function)))
    return hooks


def check_context(
    name: str,
    manifest: ContextVariablesManifest,
    agents: list[AgentSpec],
    tools: ToolsManifest,
    problems: list[ManifestError],
) -> dict[str, Derived]:
    """The derived variables (regexes, agents, tools checked) and every context condition's expression."""
    agent_names = {agent.name for agent in agents}
    tool_names = {tool.name for tool in tools.tools}
    derived: dict[str, Derived] = {}
    for i, variable in enumerate(manifest.variables):
        spec = variable.derived
        if spec is None:
            continue
        where = f"$.variables[{i}].derived"
        try:
            groups = re.compile(spec.match).groups
        except re.error as exc:
            problems.append(
                ManifestError(name, CONTEXT_FILE, f"{where}.match", f"bad regular expression: {exc}")
            )
            continue
        wanted = [int(n) for n in re.findall(r"\$(\d+)", spec.value)] if isinstance(spec.value, str) else []
        if any(n > groups for n in wanted):
            problems.append(
                ManifestError(
                    name,
                    CONTEXT_FILE,
                    f"{where}.value",
                    f"refers to group ${max(wanted)} but the match has {groups}",
                )
            )
        if spec.agent is not None and spec.agent not in agent_names:
            problems.append(
                ManifestError(name, CONTEXT_FILE, f"{where}.agent", f"unknown agent {spec.agent!r}")
            )
        if spec.tool is not None and spec.tool not in tool_names:
            problems.append(ManifestError(name, CONTEXT_FILE, f"{where}.tool", f"unknown tool {spec.tool!r}"))
        derived[variable.name] = spec
    variables = {variable.name for variable in manifest.variables}
    group = {agent.name for agent in agents if agent.type != "user"}
    for i, agent in enumerate(agents):
        for j, condition in enumerate(agent.handoffs.context_conditions):
            where = f"$.agents[{i}].handoffs.context_conditions[{j}]"
            if condition.target not in group | {"terminate"}:
                problems.append(
                    ManifestError(
                        name,
                        AGENTS_FILE,
                        f"{where}.target",
                        f"unknown agent {condition.target!r} (agents: {', '.join(sorted(group))}; or terminate)",
                    )
                )
            from autogen.agentchat.group import ContextExpression

            try:
                expression = ContextExpression(condition.expression)
            except (SyntaxError, ValueError) as exc:
                problems.append(ManifestError(name, AGENTS_FILE, f"{where}.expression", str(exc)))
                continue
            unknown = [v for v in expression._variable_names if v not in variables]
            if unknown:
                problems.append(
                    ManifestError(
                        name,
                        AGENTS_FILE,
                        f"{where}.expression",
                        f"unknown context variable {unknown[0]!r} (declared in {CONTEXT_FILE}: {', '.join(sorted(variables)) or 'none'})",
                    )
                )
    return derived


class Cause(msgspec.Struct, frozen=True):
    """What caused a context change: a known seq, or the last / next record of (type, key) in the run."""

    type: str | None = None
    key: str | None = None
    next: bool = False
    seq: int | None = None


class HookNote(msgspec.Struct, frozen=True):
    """A hook ran (becomes `hook.called`)."""

    call: HookCalled
    agent: str | None


class ContextChange(msgspec.Struct, frozen=True):
    """One context variable changed (becomes `context.updated`)."""

    name: str
    old: Any
    new: Any
    cause: Cause


def cause_key(pending: Pending) -> tuple[str, str | None]:
    """The (type, key) a later context change can name as its cause."""
    tag = str(pending.event.__struct_config__.tag)
    match tag:
        case "message.agent":
            return tag, pending.agent
        case "tool.called" | "tool.result":
            return tag, getattr(pending.event, "tool", None)
        case "hook.called":
            return tag, getattr(pending.event, "function", None)
    return tag, None


class Causes:
    """Per run: orders context changes after their causes and resolves `cause` to a seq on append."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.last: dict[tuple[str, str | None], str] = {}
        self.held: list[ContextChange] = []
        # context.updated pending id -> the id of the pending that caused it
        self.wanted: dict[str, str] = {}
        self.seqs: dict[str, int] = {}

    def arrange(self, items: Iterable[Any]) -> list[Pending]:
        """Pendings and ContextChanges in order -> Pendings, each change right after its cause."""
        out: list[Pending] = []
        for item in items:
            if isinstance(item, ContextChange):
                cause = item.cause
                if cause.seq is not None or cause.type is None:
                    out.append(self.pending(item, None, cause.seq))
                elif cause.next:
                    self.held.append(item)
                else:
                    out.append(self.pending(item, self.last.get((cause.type, cause.key)), None))
                continue
            out.append(item)
            key = cause_key(item)
            self.last[key] = self.last[(key[0], None)] = item.id
            released = [c for c in self.held if (c.cause.type, c.cause.key) == key]
            if released:
                self.held = [c for c in self.held if c not in released]
                out.extend(self.pending(c, item.id, None) for c in released)
        return out

    def release(self) -> list[Pending]:
        """Changes whose cause never came (the run ended first): recorded without a cause."""
        held, self.held = self.held, []
        return [self.pending(c, None, None) for c in held]

    def pending(self, change: ContextChange, cause_id: str | None, seq: int | None) -> Pending:
        event = ContextUpdated(
            variables={change.name: change.new}, name=change.name, old=change.old, new=change.new, cause=seq
        )
        pending = Pending(event=event, run_id=self.run_id)
        if cause_id is not None:
            self.wanted[pending.id] = cause_id
        return pending

    def unresolved(self, pendings: list[Pending]) -> int | None:
        """Index of the first pending whose cause's seq is not known yet (its cause is before it)."""
        for i, pending in enumerate(pendings):
            cause = self.wanted.get(pending.id)
            if cause is not None and cause not in self.seqs:
                return i if any(p.id == cause for p in pendings[:i]) else None
        return None

    def appended(self, records: list[Record]) -> None:
        """Learn the seqs of appended records that are causes."""
        causes = set(self.wanted.values())
        for record in records:
            if record.id in causes:
                self.seqs[record.id] = record.seq

    def fill(self, pendings: list[Pending]) -> list[Pending]:
        """The pendings with each `context.updated`'s cause seq filled in."""
        out = []
        for pending in pendings:
            cause = self.wanted.pop(pending.id, None)
            if cause is not None and cause in self.seqs:
                event = msgspec.structs.replace(pending.event, cause=self.seqs[cause])
                pending = msgspec.structs.replace(pending, event=event)
            out.append(pending)
        return out


def text_of(message: Any) -> str | None:
    """The text of an AG2 message (a str, or a dict with `content`)."""
    if message is None or isinstance(message, str):
        return message
    if isinstance(message, dict):
        content = message.get("content")
        return content if isinstance(content, str) else None
    return None


class HookRunner:
    """Runs one run's hooks and derivations; notes go to `emit` (AG2's stream) or to the caller."""

    def __init__(
        self,
        *,
        stream: StreamRef,
        run_id: str,
        hooks: list[Hook],
        derived: dict[str, Derived],
        context: ContextVariables,
        timeout_s: float,
        on_failure: Callable[[HookFailed], None],
    ) -> None:
        self.stream = stream
        self.run_id = run_id
        self.hooks = hooks
        self.derived = derived
        self.context = context
        self.timeout_s = timeout_s
        self.on_failure = on_failure
        # The agent whose reply is being made (so a tool call knows who asked for it).
        self.speaker: str | None = None
        self.failure: HookFailed | None = None

    def wants(self, *events: str) -> bool:
        return any(hook.spec.event in events for hook in self.hooks)

    def derives(self, source: str) -> bool:
        return any(spec.source == source for spec in self.derived.values())

    async def fire(self, event: str, emit: Callable[[Any], None], **where: Any) -> str | None:
        """Run the hooks of `event` in order; returns a refusal reason (before_tool) or None.

        Raises HookFailed (after recording `hook.called` with outcome error) when a hook raises or times out.
        """
        agent = where.get("agent")
        if self.failure is not None:  # the run is ending: no more custom code runs in it
            raise self.failure
        for hook in self.hooks:
            if hook.spec.event != event or (hook.spec.agents and agent not in hook.spec.agents):
                continue
            call = HookCall(
                event=event,
                chat_id=self.stream.chat_id,
                run_id=self.run_id,
                app_id=self.stream.app_id,
                user_id=self.stream.user_id,
                workflow=self.stream.workflow,
                context=copy.deepcopy(self.context.data),
                **where,
            )
            started = time.perf_counter()
            error: str | None = None
            returned: Any = None
            try:
                if hook.is_async:
                    returned = await asyncio.wait_for(hook.function(call), self.timeout_s)
                else:
                    running = asyncio.get_running_loop().run_in_executor(_POOL, hook.function, call)
                    returned = await asyncio.wait_for(running, self.timeout_s)
                if returned is not None and not isinstance(returned, dict):
                    error = f"returned {type(returned).__name__}; a hook returns None or a dict of context updates"
            except TimeoutError:
                error = f"timed out after {self.timeout_s:g} s (MOZAIKS_HOOK_TIMEOUT_S)"
            except Exception as exc:  # noqa: BLE001 - whatever a hook raised ends the run, named
                error = f"{type(exc).__name__}: {exc}"

            called = functools.partial(
                HookCalled,
                event=event,
                function=hook.spec.function,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                tool=where.get("tool"),
            )
            if error is not None:
                emit(HookNote(called(outcome="error", error=error), agent))
                failure = self.failure = HookFailed(event, hook.spec.function, error)
                self.on_failure(failure)
                raise failure
            changes = self.apply(returned or {})
            refused = event == "before_tool" and call.refusal is not None
            outcome = "refused" if refused else "ok"
            reason = call.refusal if refused else None
            emit(
                HookNote(called(outcome=outcome, reason=reason, changes={n: v for n, _, v in changes}), agent)
            )
            for name, old, new in changes:
                emit(ContextChange(name, old, new, Cause("hook.called", hook.spec.function)))
            if refused:
                return call.refusal
        return None

    def apply(self, updates: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """Set variables (None removes one); returns (name, old, new) of those that changed."""
        data = self.context.data
        changes = []
        for name, value in updates.items():
            new = json.loads(json.dumps(value, default=str))
            old = data.get(name)
            if old == new:
                continue
            if new is None:
                data.pop(name, None)
            else:
                data[name] = new
            changes.append((str(name), old, new))
        return changes

    def derive(
        self,
        source: str,
        text: str | None,
        cause: Cause,
        *,
        agent: str | None = None,
        tool: str | None = None,
    ) -> list[ContextChange]:
        """Apply every derived variable fed by this text; the changes, each naming `cause`."""
        if not text:
            return []
        updates = {}
        for name, spec in self.derived.items():
            if derivation_applies(spec, source, agent, tool):
                found, value = derive(spec, text)
                if found:
                    updates[name] = value
        return [ContextChange(name, old, new, cause) for name, old, new in self.apply(updates)]

    def guard_tool(
        self, name: str, function: Callable[..., Any], emit: Callable[[Any], None]
    ) -> Callable[..., Any]:
        """The tool with before_tool/after_tool hooks around it and tool_result derivations after it."""
        if not self.wants("before_tool", "after_tool") and not self.derives("tool_result"):
            return function

        @functools.wraps(function)
        async def guarded(**arguments: Any) -> Any:
            agent = self.speaker
            refusal = await self.fire("before_tool", emit, agent=agent, tool=name, arguments=arguments)
            if refusal is not None:
                return f"Refused: {refusal}"
            result = function(**arguments)
            if inspect.isawaitable(result):
                result = await result
            text = result if isinstance(result, str) else json.dumps(result, default=str)
            await self.fire("after_tool", emit, agent=agent, tool=name, arguments=arguments, result=text)
            for change in self.derive(
                "tool_result", text, Cause("tool.result", name, next=True), agent=agent, tool=name
            ):
                emit(change)
            return result

        guarded.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
        return guarded

    def wrap_agents(self, agents: dict[str, ConversableAgent], emit: Callable[[Any], None]) -> None:
        """Around each agent's reply: before_agent and after_agent hooks, agent_text derivations."""
        if not self.wants("before_agent", "after_agent", "before_tool", "after_tool") and not self.derives(
            "agent_text"
        ):
            return
        from autogen.agentchat.agent import Agent

        for agent in agents.values():
            agent.register_reply([Agent, None], self.around_reply(agent.name, emit), position=0)

    def around_reply(
        self, name: str, emit: Callable[[Any], None]
    ) -> Callable[..., Awaitable[tuple[bool, Any]]]:
        async def around(
            recipient: ConversableAgent,
            messages: list[dict[str, Any]] | None = None,
            sender: Agent | None = None,
            config: Any = None,
        ) -> tuple[bool, Any]:
            last = text_of(messages[-1]) if messages else None
            await self.fire("before_agent", emit, agent=name, message=last)
            self.speaker = name
            reply = await recipient.a_generate_reply(messages=messages, sender=sender, exclude=[around])
            said = text_of(reply)
            await self.fire("after_agent", emit, agent=name, message=said)
            for change in self.derive(
                "agent_text", said, Cause("message.agent", name, next=True), agent=name
            ):
                emit(change)
            return True, reply

        return around


def expression_of(agents: list[AgentSpec], source: str | None, target: str) -> str | None:
    """The expression of `source`'s context condition that hands off to `target` (what AG2 fired)."""
    for agent in agents:
        if agent.name == source:
            for rule in agent.handoffs.context_conditions:
                if rule.target == target:
                    return rule.expression
    return None
