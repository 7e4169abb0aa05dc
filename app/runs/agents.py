"""Agent factory: AG2 ConversableAgents, handoffs and the workflow's pattern, from a loaded Workflow."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

import msgspec
from autogen import ConversableAgent, LLMConfig
from autogen.agentchat.group import (
    AgentTarget,
    ContextExpression,
    ContextVariables,
    ExpressionContextCondition,
    OnCondition,
    OnContextCondition,
    RevertToUserTarget,
    StayTarget,
    StringLLMCondition,
    TerminateTarget,
)
from autogen.agentchat.group.patterns import AutoPattern, DefaultPattern, RandomPattern, RoundRobinPattern
from autogen.agentchat.group.patterns.pattern import Pattern
from autogen.agentchat.group.speaker_selection_result import SpeakerSelectionResult
from autogen.agentchat.group.targets.group_manager_target import GroupManagerTarget
from autogen.agentchat.group.targets.transition_target import RandomAgentTarget, TransitionTarget
from autogen.agentchat.groupchat import GroupChat
from autogen.oai.client import PlaceHolderClient
from pydantic import PrivateAttr

from app.runs.clients import CLIENT_CLASS_NAME, MozaiksModelClient
from app.runs.files import ChatFiles, bind_uploads
from app.runs.ui import UiDesk, register_ui_tool
from app.runs.workflows import GROUP_MANAGER, Tool, Workflow
from domain.manifest import AgentSpec


class Team:
    """The AG2 objects of one run: agents by name, the user agent (if any) and the pattern."""

    def __init__(
        self, agents: dict[str, ConversableAgent], user: ConversableAgent | None, pattern: Pattern
    ) -> None:
        self.agents = agents
        self.user = user
        self.pattern = pattern


def llm_entry(spec: AgentSpec | None, default_model: str, agent: str) -> dict[str, Any]:
    """The AG2 config entry of an agent: the runtime's client, tagged with the agent's name."""
    entry: dict[str, Any] = {
        "model": default_model,
        "model_client_cls": CLIENT_CLASS_NAME,
        "mozaiks_agent": agent,
    }
    if spec is not None and spec.llm_config is not None:
        settings = spec.llm_config
        entry["model"] = settings.model or default_model
        for key in ("temperature", "max_tokens", "top_p"):
            value = getattr(settings, key)
            if value is not None:
                entry[key] = value
    return entry


def keep_client_registered(agent: ConversableAgent, client_cls: type[MozaiksModelClient]) -> None:
    """Register the runtime's client now and again whenever AG2 has rebuilt the agent's client.

    AG2 rebuilds `agent.client` (e.g. when handoff functions are re-registered before each turn),
    which drops registered custom clients; the `process_all_messages_before_reply` hook runs after
    those rebuilds and right before the reply, so re-registering there never misses a call.
    """

    def reregister(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        client = agent.client
        if client is not None and any(isinstance(c, PlaceHolderClient) for c in client._clients):
            agent.register_model_client(client_cls)  # type: ignore[arg-type]  # AG2 types the class as an instance
        return messages

    agent.register_model_client(client_cls)  # type: ignore[arg-type]  # AG2 types the class as an instance
    agent.register_hook("process_all_messages_before_reply", reregister)


class ContextNote(msgspec.Struct, frozen=True):
    """Context variables a tool changed (becomes a `context.updated` record); None = removed."""

    variables: dict[str, Any]
    # The values before the tool ran (None: absent).
    old: dict[str, Any] = {}


def bind_tool(
    tool: Tool, context: ContextVariables, emit: Callable[[Any], None] | None = None
) -> Callable[..., Any]:
    """The tool's function as AG2 should call it: a `context` parameter gets the chat's variables.

    The parameter is hidden from the model's schema; the tool sees `context.data` itself, and what it
    changed is emitted as a ContextNote right after the call (so before AG2's tool-result event).
    """
    function = tool.function
    assert function is not None  # UI tools are registered by `register_ui_tool`
    signature = inspect.signature(function)
    if "context" not in signature.parameters:
        return function

    @functools.wraps(function)
    def with_context(*args: Any, **kwargs: Any) -> Any:
        before = _snapshot(context.data)
        try:
            return function(*args, context=context.data, **kwargs)
        finally:
            after = _snapshot(context.data)
            changed = {k: v for k, v in after.items() if k not in before or before[k] != v}
            changed.update({k: None for k in before if k not in after})
            if changed and emit is not None:
                emit(ContextNote(changed, {k: before.get(k) for k in changed}))

    with_context.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in signature.parameters.items() if name != "context"]
    )
    return with_context


def _snapshot(data: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe deep copy of the context variables."""
    return json.loads(json.dumps(data, default=str))  # type: ignore[no-any-return]


class _ChosenAgentTarget(RandomAgentTarget):
    """A random after-work target whose choice is made by the run (a replay plays the original's choices)."""

    _choose: Callable[[list[str]], str] | None = PrivateAttr(default=None)

    def resolve(
        self, groupchat: GroupChat, current_agent: ConversableAgent, user_agent: ConversableAgent | None
    ) -> SpeakerSelectionResult:
        if self._choose is None:
            return super().resolve(groupchat, current_agent, user_agent)
        self.nominated_name = self._choose([name for name in self.agent_names if name != current_agent.name])
        return SpeakerSelectionResult(agent_name=self.nominated_name)


class _ChosenRandomPattern(RandomPattern):
    """RandomPattern whose random choices a chooser makes (replays), so a replay follows its original."""

    def __init__(self, choose: Callable[[list[str]], str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._choose = choose

    def _generate_handoffs(
        self,
        initial_agent: ConversableAgent,
        agents: list[ConversableAgent],
        user_agent: ConversableAgent | None,
    ) -> None:
        agent_list = agents + ([user_agent] if user_agent is not None else [])
        for agent in agent_list:
            # AG2's own __init__ takes `agents` (mypy's pydantic view sees only the fields).
            target = _ChosenAgentTarget(agents=[a for a in agent_list if a != agent])  # type: ignore[call-arg]
            target._choose = self._choose
            agent.handoffs.set_after_work(target=target)


class _AutoPattern(AutoPattern):
    """AutoPattern whose group manager picks speakers through the runtime's client.

    AG2 builds a fresh internal speaker-selection agent for every choice and registers a custom
    client on it only from `GroupChat.select_speaker_auto_*`; the manager keeps its own copy of the
    GroupChat as reply config, so both copies get the settings.
    """

    def __init__(
        self, *args: Any, selector_config: dict[str, Any], client_cls: type[MozaiksModelClient], **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self._selector_config = selector_config
        self._client_cls = client_cls

    def prepare_group_chat(self, max_rounds: int, messages: list[dict[str, Any]] | str) -> Any:
        components = super().prepare_group_chat(max_rounds=max_rounds, messages=messages)
        groupchat, manager = components[7], components[8]
        chats = [groupchat] + [
            t["config"] for t in manager._reply_func_list if isinstance(t["config"], GroupChat)
        ]
        for chat in chats:
            chat.select_speaker_auto_llm_config = self._selector_config
            chat.select_speaker_auto_model_client_cls = self._client_cls  # type: ignore[assignment]  # as above
        return components


def build_team(
    workflow: Workflow,
    *,
    client_cls: type[MozaiksModelClient],
    context: ContextVariables,
    default_model: str,
    emit: Callable[[Any], None] | None = None,
    files: ChatFiles | None = None,
    guard_tool: Callable[[str, Callable[..., Any]], Callable[..., Any]] | None = None,
    children: Callable[[Tool], Callable[..., Any]] | None = None,
    choose: Callable[[list[str]], str] | None = None,
    ui: UiDesk | None = None,
) -> Team:
    """Build the workflow's agents (tools only from tools.json), handoffs and AG2 pattern.

    `guard_tool(name, function)` may wrap each tool (the workflow's hooks, app/runs/hooks.py).
    `choose` makes the Random pattern's choices (a replay's: the original's speakers), else AG2 does.
    """
    agents: dict[str, ConversableAgent] = {}
    user: ConversableAgent | None = None
    for spec in workflow.agents:
        if spec.type == "user":
            user = ConversableAgent(
                spec.name,
                description=spec.description or "The human user.",
                human_input_mode="ALWAYS",
                llm_config=False,
                code_execution_config=False,
            )
            continue
        agent = ConversableAgent(
            spec.name,
            system_message=workflow.prompts.get(spec.name, "You are a helpful AI assistant."),
            description=spec.description or f"Agent {spec.name}",
            llm_config=LLMConfig(llm_entry(spec, default_model, spec.name)),
            human_input_mode=spec.human_input_mode,
            code_execution_config=False,
        )
        keep_client_registered(agent, client_cls)
        for name in spec.tools:
            tool = workflow.tools[name]
            if tool.spec.ui is not None:
                if ui is not None:
                    register_ui_tool(agent, tool, ui)
                continue
            # A child-workflow tool (tools.json `workflow`) is bound to the run (app/runs/children.py).
            function = (
                children(tool)
                if tool.spec.workflow and children
                else bind_uploads(bind_tool(tool, context, emit), files)
            )
            agent.register_for_llm(name=name, description=tool.description, silent_override=True)(
                guard_tool(name, function) if guard_tool is not None else function
            )
        agents[spec.name] = agent

    def target(name: str) -> TransitionTarget:
        match name:
            case "terminate":
                return TerminateTarget()
            case "user":
                return RevertToUserTarget()
            case "group_manager":
                return GroupManagerTarget()
            case "stay":
                return StayTarget()
            case _:
                return AgentTarget(agents[name])

    for spec in workflow.agents:
        if spec.type == "user":
            continue
        agent = agents[spec.name]
        for rule in spec.handoffs.context_conditions:
            agent.handoffs.add_context_condition(
                OnContextCondition(
                    target=target(rule.target),
                    condition=ExpressionContextCondition(expression=ContextExpression(rule.expression)),
                )
            )
        for condition in spec.handoffs.llm_conditions:
            agent.handoffs.add_llm_condition(
                OnCondition(
                    target=target(condition.target), condition=StringLLMCondition(prompt=condition.condition)
                )
            )
        if spec.handoffs.after_work is not None:
            agent.handoffs.set_after_work(target(spec.handoffs.after_work))

    manager_entry = llm_entry(None, default_model, GROUP_MANAGER)
    common: dict[str, Any] = {
        "initial_agent": agents[workflow.manifest.entry_agent],
        "agents": list(agents.values()),
        "user_agent": user,
        "context_variables": context,
        "group_manager_args": {"llm_config": LLMConfig(manager_entry)},
    }
    pattern: Pattern
    match workflow.pattern:
        case "Default":
            pattern = DefaultPattern(**common)
        case "Auto":
            pattern = _AutoPattern(
                **common, selector_config={"config_list": [manager_entry]}, client_cls=client_cls
            )
        case "RoundRobin":
            pattern = RoundRobinPattern(**common)
        case "Random":
            pattern = RandomPattern(**common) if choose is None else _ChosenRandomPattern(choose, **common)
        case other:  # pragma: no cover - the manifest type admits only the four
            raise ValueError(f"unknown orchestration pattern {other!r}")
    return Team(agents, user, pattern)
