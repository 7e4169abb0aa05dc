"""The workflow manager: discovers `<path>/*/workflow.json` and loads each workflow's manifests.

Loading never stops at the first problem: every workflow is checked as far as its files allow, every
problem becomes a `ManifestError` naming the workflow, the file and the JSON path, and one broken
workflow never keeps the others from loading (`manager.workflows` vs `manager.errors`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec

from app.runs.hooks import Hook, check_context, resolve_hooks
from app.runs.structured import schema_problems
from domain.errors import ManifestError, MozaiksError
from domain.manifest import (
    AFTER_WORK_KEYWORDS,
    AgentsManifest,
    AgentSpec,
    ContextVariablesManifest,
    Derived,
    Fixture,
    HooksManifest,
    ScriptedReply,
    StructuredOutputsManifest,
    StructuredOutputSpec,
    ToolsManifest,
    ToolSpec,
    WorkflowManifest,
    decode_manifest,
)

WORKFLOW_FILE: Final = "workflow.json"
AGENTS_FILE: Final = "agents.json"
TOOLS_FILE: Final = "tools.json"
CONTEXT_FILE: Final = "context_variables.json"
HOOKS_FILE: Final = "hooks.json"
OUTPUTS_FILE: Final = "structured_outputs.json"
FIXTURES_DIR: Final = "fixtures"
# The AG2 group manager's name: its fixture (fixtures/chat_manager.json) scripts Auto speaker choices.
GROUP_MANAGER: Final = "chat_manager"


class UnknownWorkflow(MozaiksError):
    """No loaded workflow has this name."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"workflow {name!r} is not loaded (loaded: {', '.join(known) or 'none'})")


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    """A tool of tools.json resolved to its Python function."""

    spec: ToolSpec
    # None only for a UI tool without a function (its result is the user's answer itself).
    function: Callable[..., Any] | None

    @property
    def description(self) -> str:
        """The manifest's description, else the first line of the function's docstring."""
        doc = (inspect.getdoc(self.function) or "") if self.function is not None else ""
        return self.spec.description or (doc.splitlines()[0] if doc else self.spec.name)


class Workflow(msgspec.Struct, frozen=True, kw_only=True):
    """One loaded, cross-checked workflow: manifests, prompts, resolved tools, defaults and fixtures."""

    name: str
    path: Path
    manifest: WorkflowManifest
    agents: list[AgentSpec]
    prompts: dict[str, str]
    tools: dict[str, Tool]
    context: dict[str, Any]
    fixtures: dict[str, list[ScriptedReply]]
    # hooks.json resolved (app/runs/hooks.py runs them) and the derived context variables by name.
    hooks: list[Hook] = []
    derived: dict[str, Derived] = {}
    # agent -> its structured output (inline in agents.json, or named from structured_outputs.json).
    outputs: dict[str, StructuredOutputSpec] = {}

    @property
    def pattern(self) -> str:
        """The AG2 orchestration pattern name (Default, Auto, RoundRobin, Random)."""
        return self.manifest.orchestration_pattern

    @property
    def max_turns(self) -> int:
        """AG2's max_rounds for a run of this workflow."""
        return self.manifest.max_turns

    @property
    def visual_agents(self) -> frozenset[str]:
        """Agents whose events the ChatUI shows; the others are recorded but hidden."""
        return frozenset(self.manifest.visual_agents)

    @property
    def agent_driven(self) -> bool:
        """Whether a chat's run starts on creation, with no user message (`startup_mode` AgentDriven)."""
        return self.manifest.startup_mode == "AgentDriven"

    def agent(self, name: str) -> AgentSpec:
        """The agent spec by name (KeyError when absent)."""
        for spec in self.agents:
            if spec.name == name:
                return spec
        raise KeyError(name)


class WorkflowManager:
    """Discovers and loads every workflow folder under `path`; see `workflows` and `errors`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.workflows: dict[str, Workflow] = {}
        self.errors: list[ManifestError] = []
        self.load()

    def load(self) -> None:
        """(Re)load all workflows; problems are collected in `errors`, never raised."""
        workflows: dict[str, Workflow] = {}
        errors: list[ManifestError] = []
        if not self.path.is_dir():
            errors.append(
                ManifestError(self.path.name or str(self.path), str(self.path), "", "is not a directory")
            )
        else:
            for manifest in sorted(self.path.glob(f"*/{WORKFLOW_FILE}")):
                workflow, problems = load_workflow(manifest.parent)
                errors.extend(problems)
                if workflow is not None and not problems:
                    workflows[workflow.name] = workflow
            _check_child_workflows(workflows, errors)
        self.workflows, self.errors = workflows, errors

    def get(self, name: str) -> Workflow:
        """The loaded workflow `name`; raises UnknownWorkflow (also when it failed to load)."""
        try:
            return self.workflows[name]
        except KeyError:
            raise UnknownWorkflow(name, sorted(self.workflows)) from None

    def names(self) -> list[str]:
        """Names of the loaded workflows, sorted."""
        return sorted(self.workflows)


def load_workflow(folder: Path) -> tuple[Workflow | None, list[ManifestError]]:
    """Load one workflow folder; returns the workflow (None if unusable) and every problem found."""
    name = folder.name
    problems: list[ManifestError] = []

    def read(file: str, kind: Any, required: bool) -> Any:
        path = folder / file
        if not path.is_file():
            if required:
                problems.append(ManifestError(name, file, "", "file is missing"))
            return None
        try:
            return decode_manifest(name, file, path.read_bytes(), kind)
        except ManifestError as exc:
            problems.append(exc)
            return None

    manifest: WorkflowManifest | None = read(WORKFLOW_FILE, WorkflowManifest, True)
    agents_manifest: AgentsManifest | None = read(AGENTS_FILE, AgentsManifest, True)
    tools_manifest: ToolsManifest = read(TOOLS_FILE, ToolsManifest, False) or ToolsManifest()
    context_manifest: ContextVariablesManifest = (
        read(CONTEXT_FILE, ContextVariablesManifest, False) or ContextVariablesManifest()
    )
    outputs_manifest: StructuredOutputsManifest = (
        read(OUTPUTS_FILE, StructuredOutputsManifest, False) or StructuredOutputsManifest()
    )

    hooks_manifest: HooksManifest = read(HOOKS_FILE, HooksManifest, False) or HooksManifest()

    if manifest is not None and manifest.name != name:
        problems.append(
            ManifestError(
                name, WORKFLOW_FILE, "$.name", f"name {manifest.name!r} differs from its folder {name!r}"
            )
        )

    tools = _resolve_tools(name, tools_manifest, problems)
    context = _context_defaults(name, context_manifest, problems)
    agents = agents_manifest.agents if agents_manifest is not None else []
    prompts = _check_agents(name, folder, agents, tools_manifest, problems)
    outputs = _resolve_outputs(name, agents, outputs_manifest, problems)
    if manifest is not None and agents_manifest is not None:
        _check_workflow_refs(name, manifest, agents, problems)
    # Without a readable agents.json, fixture names cannot be checked: say nothing rather than noise.
    fixtures = _load_fixtures(name, folder, agents, problems) if agents_manifest is not None else {}
    hooks = resolve_hooks(name, hooks_manifest, agents, problems, import_function)
    derived = check_context(name, context_manifest, agents, tools_manifest, problems)

    if manifest is None or agents_manifest is None:
        return None, problems
    workflow = Workflow(
        name=manifest.name,
        path=folder,
        manifest=manifest,
        agents=list(agents),
        prompts=prompts,
        tools=tools,
        context=context,
        fixtures=fixtures,
        hooks=hooks,
        derived=derived,
        outputs=outputs,
    )
    return workflow, problems


def _resolve_tools(name: str, manifest: ToolsManifest, problems: list[ManifestError]) -> dict[str, Tool]:
    tools: dict[str, Tool] = {}
    for i, spec in enumerate(manifest.tools):
        where = f"$.tools[{i}]"
        if spec.name in tools:
            problems.append(
                ManifestError(name, TOOLS_FILE, f"{where}.name", f"tool {spec.name!r} is declared twice")
            )
            continue
        if spec.workflow is not None:
            if spec.function:
                problems.append(
                    ManifestError(
                        name, TOOLS_FILE, where, "a tool names a 'function' or a 'workflow', not both"
                    )
                )
            else:
                tools[spec.name] = Tool(spec=spec, function=_child_workflow_tool)
            continue
        if not spec.function:
            if spec.ui is None:
                problems.append(
                    ManifestError(
                        name,
                        TOOLS_FILE,
                        f"{where}.function",
                        "a tool needs a function (or a `workflow` or a `ui`)",
                    )
                )
            else:
                tools[spec.name] = Tool(spec=spec, function=None)
            continue
        function = _import_tool(name, spec, f"{where}.function", problems)
        if function is not None:
            tools[spec.name] = Tool(spec=spec, function=function)
    return tools


def _child_workflow_tool(message: str) -> str:
    """Start the tool's workflow with `message` and answer with its result (bound per run, children.py)."""
    raise RuntimeError("a child-workflow tool runs only inside a supervised run (mozaiks serve)")


def _check_child_workflows(workflows: dict[str, Workflow], errors: list[ManifestError]) -> None:
    """Drop every workflow whose child-workflow tool names a workflow that is not loaded (until none does)."""
    while True:
        broken = False
        for workflow in list(workflows.values()):
            for i, spec in enumerate(t.spec for t in workflow.tools.values()):
                if spec.workflow is not None and spec.workflow not in workflows:
                    known = ", ".join(sorted(workflows)) or "none"
                    errors.append(
                        ManifestError(
                            workflow.name,
                            TOOLS_FILE,
                            f"$.tools[{i}].workflow",
                            f"tool {spec.name!r} starts workflow {spec.workflow!r}, which is not loaded"
                            f" (loaded: {known})",
                        )
                    )
                    workflows.pop(workflow.name, None)
                    broken = True
                    break
        if not broken:
            return


def _import_tool(
    name: str, spec: ToolSpec, where: str, problems: list[ManifestError]
) -> Callable[..., Any] | None:
    return import_function(name, spec.function, TOOLS_FILE, where, problems)


def import_function(
    name: str, reference: str, file: str, where: str, problems: list[ManifestError]
) -> Callable[..., Any] | None:
    """The function `tools.<module>:<fn>` names, or None with the problem added (file and path named)."""
    module_name, _, attr = reference.partition(":")
    what = "tool" if file == TOOLS_FILE else "function"
    # Workflows are data: they may only name functions of the runtime's own `tools` package.
    if (
        not (module_name == "tools" or module_name.startswith("tools."))
        or not attr
        or not attr.isidentifier()
    ):
        problems.append(
            ManifestError(name, file, where, f"{reference!r} must be 'tools.<module>:<function>'")
        )
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        problems.append(
            ManifestError(name, file, where, f"{what} not found: cannot import {module_name}: {exc}")
        )
        return None
    function = getattr(module, attr, None)
    if not callable(function):
        problems.append(
            ManifestError(name, file, where, f"{what} not found: {module_name} has no function {attr!r}")
        )
        return None
    return function  # type: ignore[no-any-return]


def _resolve_outputs(
    name: str, agents: list[AgentSpec], manifest: StructuredOutputsManifest, problems: list[ManifestError]
) -> dict[str, StructuredOutputSpec]:
    """Each agent's structured output (a named one looked up in structured_outputs.json), schemas checked."""
    declared: dict[str, StructuredOutputSpec] = {}
    for i, spec in enumerate(manifest.outputs):
        where = f"$.outputs[{i}]"
        if spec.name in declared:
            problems.append(
                ManifestError(name, OUTPUTS_FILE, f"{where}.name", f"output {spec.name!r} is declared twice")
            )
        declared[spec.name] = spec
        for path, detail in schema_problems(spec.schema, f"{where}.schema"):
            problems.append(ManifestError(name, OUTPUTS_FILE, path, detail))
    outputs: dict[str, StructuredOutputSpec] = {}
    for i, agent in enumerate(agents):
        where = f"$.agents[{i}].structured_output"
        wanted = agent.structured_output
        if wanted is None:
            continue
        if agent.type == "user":
            problems.append(
                ManifestError(
                    name, AGENTS_FILE, where, "a 'user' agent stands for the human: no structured output"
                )
            )
        elif isinstance(wanted, str):
            if wanted in declared:
                outputs[agent.name] = declared[wanted]
            else:
                problems.append(
                    ManifestError(
                        name,
                        AGENTS_FILE,
                        where,
                        f"unknown structured output {wanted!r} (declared in {OUTPUTS_FILE}: "
                        f"{', '.join(sorted(declared)) or 'none'})",
                    )
                )
        else:
            outputs[agent.name] = wanted
            for path, detail in schema_problems(wanted.schema, f"{where}.schema"):
                problems.append(ManifestError(name, AGENTS_FILE, path, detail))
    return outputs


def _context_defaults(
    name: str, manifest: ContextVariablesManifest, problems: list[ManifestError]
) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for i, variable in enumerate(manifest.variables):
        if variable.name in defaults:
            problems.append(
                ManifestError(
                    name,
                    CONTEXT_FILE,
                    f"$.variables[{i}].name",
                    f"variable {variable.name!r} is declared twice",
                )
            )
        defaults[variable.name] = variable.default
    return defaults


def _check_agents(
    name: str, folder: Path, agents: list[AgentSpec], tools: ToolsManifest, problems: list[ManifestError]
) -> dict[str, str]:
    """Per-agent checks (names, prompts, tools, handoff targets); returns the loaded prompts."""
    prompts: dict[str, str] = {}
    declared_tools = {spec.name for spec in tools.tools}
    names = [agent.name for agent in agents]
    group = {agent.name for agent in agents if agent.type != "user"}
    users = [agent.name for agent in agents if agent.type == "user"]
    root = folder.resolve()
    for i, agent in enumerate(agents):
        where = f"$.agents[{i}]"
        if names.index(agent.name) != i:
            problems.append(
                ManifestError(name, AGENTS_FILE, f"{where}.name", f"agent {agent.name!r} is declared twice")
            )
        if agent.name == GROUP_MANAGER:
            problems.append(
                ManifestError(
                    name,
                    AGENTS_FILE,
                    f"{where}.name",
                    f"{GROUP_MANAGER!r} is reserved for AG2's group manager",
                )
            )
        if agent.type == "user":
            if users.index(agent.name) > 0:
                problems.append(
                    ManifestError(name, AGENTS_FILE, f"{where}.type", "only one agent may be of type 'user'")
                )
            if agent.human_input_mode != "ALWAYS":
                problems.append(
                    ManifestError(
                        name, AGENTS_FILE, f"{where}.human_input_mode", "a 'user' agent must use 'ALWAYS'"
                    )
                )
            if agent.tools or agent.llm_config or agent.system_message_file:
                problems.append(
                    ManifestError(
                        name,
                        AGENTS_FILE,
                        where,
                        "a 'user' agent stands for the human: no tools, llm_config or prompt",
                    )
                )
        if agent.system_message_file is not None:
            prompt = _read_prompt(root, agent.system_message_file)
            if isinstance(prompt, str) and prompt.startswith("\0"):
                problems.append(ManifestError(name, AGENTS_FILE, f"{where}.system_message_file", prompt[1:]))
            else:
                prompts[agent.name] = prompt
        for j, tool in enumerate(agent.tools):
            if tool not in declared_tools:
                problems.append(
                    ManifestError(
                        name,
                        AGENTS_FILE,
                        f"{where}.tools[{j}]",
                        f"tool not found: {tool!r} is not declared in {TOOLS_FILE}",
                    )
                )
        targets = group | AFTER_WORK_KEYWORDS - {"stay"}
        for j, condition in enumerate(agent.handoffs.llm_conditions):
            if condition.target not in targets:
                problems.append(
                    ManifestError(
                        name,
                        AGENTS_FILE,
                        f"{where}.handoffs.llm_conditions[{j}].target",
                        f"unknown agent {condition.target!r} (agents: {', '.join(sorted(group))}; or terminate, user, group_manager)",
                    )
                )
        after = agent.handoffs.after_work
        if after is not None and after not in group | AFTER_WORK_KEYWORDS:
            problems.append(
                ManifestError(
                    name,
                    AGENTS_FILE,
                    f"{where}.handoffs.after_work",
                    f"unknown agent {after!r} (agents: {', '.join(sorted(group))}; or terminate, user, group_manager, stay)",
                )
            )
        if ("user" in {after} | {c.target for c in agent.handoffs.llm_conditions}) and not users:
            problems.append(
                ManifestError(
                    name, AGENTS_FILE, f"{where}.handoffs", "hands off to 'user' but no agent has type 'user'"
                )
            )
    return prompts


def _read_prompt(root: Path, relative: str) -> str:
    """The prompt text, or "\\0" + the problem (prompts must stay inside the workflow folder)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        return f"\0prompt file {relative!r} is outside the workflow folder"
    if not path.is_file():
        return f"\0prompt file {relative!r} not found"
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        return f"\0prompt file {relative!r} is not UTF-8: {exc}"


def _check_workflow_refs(
    name: str, manifest: WorkflowManifest, agents: list[AgentSpec], problems: list[ManifestError]
) -> None:
    group = [agent.name for agent in agents if agent.type != "user"]
    everyone = {agent.name for agent in agents}
    if manifest.entry_agent not in group:
        problems.append(
            ManifestError(
                name,
                WORKFLOW_FILE,
                "$.entry_agent",
                f"unknown agent {manifest.entry_agent!r} (agents: {', '.join(group)})",
            )
        )
    for i, visual in enumerate(manifest.visual_agents):
        if visual not in everyone:
            problems.append(
                ManifestError(
                    name,
                    WORKFLOW_FILE,
                    f"$.visual_agents[{i}]",
                    f"unknown agent {visual!r} (agents: {', '.join(sorted(everyone))})",
                )
            )
    if len(group) < 1:
        problems.append(ManifestError(name, AGENTS_FILE, "$.agents", "at least one non-user agent is needed"))
    if manifest.startup_mode == "AgentDriven" and not manifest.initial_message:
        # AG2 starts a group chat from a first message: an agent-driven chat needs one it never shows.
        problems.append(
            ManifestError(
                name,
                WORKFLOW_FILE,
                "$.initial_message",
                "an AgentDriven workflow needs an initial_message (sent hidden as the chat's first message)",
            )
        )


def _load_fixtures(
    name: str, folder: Path, agents: list[AgentSpec], problems: list[ManifestError]
) -> dict[str, list[ScriptedReply]]:
    fixtures: dict[str, list[ScriptedReply]] = {}
    scripted = {agent.name for agent in agents if agent.type != "user"} | {GROUP_MANAGER}
    for path in sorted((folder / FIXTURES_DIR).glob("*.json")):
        file = f"{FIXTURES_DIR}/{path.name}"
        if path.stem not in scripted:
            problems.append(
                ManifestError(
                    name,
                    file,
                    "",
                    f"fixture for unknown agent {path.stem!r} (agents: {', '.join(sorted(scripted))})",
                )
            )
            continue
        try:
            fixtures[path.stem] = decode_manifest(name, file, path.read_bytes(), Fixture)
        except ManifestError as exc:
            problems.append(exc)
    return fixtures
