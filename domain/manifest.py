"""Workflow manifest types (workflow.json, agents.json, tools.json, context_variables.json,
structured_outputs.json, fixtures).

Every manifest decodes through `Manifest`, which forbids unknown fields, so a typo fails at load
time; `decode_manifest` turns msgspec's errors into `ManifestError`s naming the workflow, the file
and the JSON path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from domain.errors import ManifestError

Pattern = Literal["Default", "Auto", "RoundRobin", "Random"]
HumanInputMode = Literal["NEVER", "ALWAYS", "TERMINATE"]
AgentType = Literal["assistant", "orchestrator", "user"]
# UserDriven: a chat's first run waits for the user's first message; AgentDriven: it starts on creation.
StartupMode = Literal["UserDriven", "AgentDriven"]
# A name AG2 accepts for an agent or a tool (it is sent to the model as a function/agent name).
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")]
# After-work keywords besides an agent name.
AFTER_WORK_KEYWORDS: Final = frozenset({"terminate", "user", "group_manager", "stay"})


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every manifest struct: unknown fields are errors, never ignored."""


class Budget(Manifest, frozen=True, kw_only=True):
    """Spend limits (of a chat, or of an app or user per UTC day): tokens and/or US dollars."""

    max_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_cost_usd: Annotated[float, msgspec.Meta(ge=0)] | None = None


class WorkflowManifest(Manifest, frozen=True, kw_only=True):
    """workflow.json: what the workflow is and how its agents take turns."""

    name: Name
    description: str = ""
    orchestration_pattern: Pattern = "Default"
    max_turns: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    visual_agents: list[str] = []
    entry_agent: str
    # Per chat: the run stops before a model call once the chat's spend reached a limit.
    budget: Budget | None = None
    startup_mode: StartupMode = "UserDriven"
    # Sent as a chat's first message, recorded hidden (`message.user`, data.origin "initial_message").
    initial_message: str | None = None


class LlmConfig(Manifest, frozen=True, kw_only=True):
    """An agent's model settings; the model defaults to `OPENAI_MODEL`."""

    model: str | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None


class LlmCondition(Manifest, frozen=True, kw_only=True):
    """Hand off to `target` when the model decides `condition` holds (AG2 OnCondition + StringLLMCondition)."""

    target: str
    condition: str


class ContextCondition(Manifest, frozen=True, kw_only=True):
    """Hand off to `target` without asking the model when `expression` holds (AG2 ExpressionContextCondition)."""

    target: str
    # AG2's ContextExpression syntax: "${var} == 'value'", and/or/not, len(${var}).
    expression: str


class Handoffs(Manifest, frozen=True, kw_only=True):
    """An agent's handoffs: context conditions (checked first), LLM-decided ones, then after its turn."""

    context_conditions: list[ContextCondition] = []
    llm_conditions: list[LlmCondition] = []
    # An agent name, or one of: terminate, user, group_manager, stay.
    after_work: str | None = None


class StructuredOutputSpec(Manifest, frozen=True, kw_only=True):
    """A structured output: a JSON Schema the agent's replies must match (OpenAI strict `json_schema`)."""

    name: Name
    # A JSON Schema object; checked at load (a valid schema, and one OpenAI's strict mode accepts).
    schema: dict[str, Any]
    # How often the agent is asked again, with the errors, after a reply that does not match.
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2
    description: str = ""


class StructuredOutputsManifest(Manifest, frozen=True, kw_only=True):
    """structured_outputs.json: outputs agents name in their `structured_output`."""

    outputs: list[StructuredOutputSpec] = []


class AgentSpec(Manifest, frozen=True, kw_only=True):
    """One entry of agents.json."""

    name: Name
    type: AgentType = "assistant"
    description: str = ""
    llm_config: LlmConfig | None = None
    system_message_file: str | None = None
    tools: list[Name] = []
    handoffs: Handoffs = msgspec.field(default_factory=Handoffs)
    human_input_mode: HumanInputMode = "NEVER"
    # The agent answers in this structure: inline, or the name of an entry of structured_outputs.json.
    structured_output: StructuredOutputSpec | Name | None = None


class AgentsManifest(Manifest, frozen=True, kw_only=True):
    """agents.json."""

    agents: Annotated[list[AgentSpec], msgspec.Meta(min_length=1)]


UiComponent = Literal["form", "choice", "confirm", "artifact"]
UiMode = Literal["inline", "artifact"]


class UiSpec(Manifest, frozen=True, kw_only=True):
    """A UI tool's component: the user answers the call (form, choice, confirm) or sees it (artifact)."""

    component: UiComponent
    mode: UiMode = "inline"
    # Seconds an unanswered request waits before it expires (`ui.expired`); None: it waits for ever.
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None


class ToolSpec(Manifest, frozen=True, kw_only=True):
    """One entry of tools.json: a function of the `tools` package, by `module:function`, a child
    workflow (`workflow`: the agent starts a chat of that workflow with a `message`; see children.py),
    or a UI tool (`ui`)."""

    name: Name
    # "tools.<module>:<function>"; checked (and imported) by the workflow manager. Optional for a UI
    # tool, where it is applied to the user's answer (its result is the tool's result).
    function: str = ""
    description: str = ""
    # A child-workflow tool: the loaded workflow it starts (checked at load); excludes `function`.
    workflow: Name | None = None
    # False: the result may change between calls (time, network); a recorded replay plays the recorded result.
    deterministic: bool = True
    ui: UiSpec | None = None


class ToolsManifest(Manifest, frozen=True, kw_only=True):
    """tools.json."""

    tools: list[ToolSpec] = []


class Derived(Manifest, frozen=True, kw_only=True):
    """Where a derived context variable takes its value: the first `match` in a record's text.

    `value` may hold "$0" (the whole match) or "$1", "$2" ... (its groups); None means "$0".
    """

    # "from" is a Python keyword: the field is `source`, spelled "from" in the file.
    source: Literal["agent_text", "user_text", "tool_result"] = msgspec.field(name="from")
    agent: str | None = None
    tool: str | None = None
    match: str
    value: Any = None


class ContextVariable(Manifest, frozen=True, kw_only=True):
    """One context variable with its default value (or derived from what the chat says)."""

    name: Name
    default: Any = None
    description: str = ""
    derived: Derived | None = None


class ContextVariablesManifest(Manifest, frozen=True, kw_only=True):
    """context_variables.json."""

    variables: list[ContextVariable] = []


HookEvent = Literal["before_chat", "after_chat", "before_agent", "after_agent", "before_tool", "after_tool"]


class HookSpec(Manifest, frozen=True, kw_only=True):
    """One entry of hooks.json: run `function` (tools.<module>:<fn>) at `event`, for `agents` (all if empty)."""

    event: HookEvent
    function: str
    agents: list[str] = []


class HooksManifest(Manifest, frozen=True, kw_only=True):
    """hooks.json."""

    hooks: list[HookSpec] = []


class ScriptedToolCall(Manifest, frozen=True, kw_only=True):
    """A tool call a scripted model makes: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any] = {}


class ScriptedReply(Manifest, frozen=True, kw_only=True):
    """One scripted model reply: text, tool calls, or both; usage is counted when not given."""

    content: str | None = None
    # A structured reply: played as this value's JSON text (valid for the agent's schema or not).
    structured: Any = None
    tool_calls: list[ScriptedToolCall] = []
    prompt_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    completion_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None


# fixtures/<Agent>.json: that agent's replies, played in order.
Fixture = Annotated[list[ScriptedReply], msgspec.Meta(min_length=1)]

M = TypeVar("M")
_PATH_SUFFIX: Final = re.compile(r"\s+-\s+at\s+`(\$[^`]*)`$")


def decode_manifest(workflow: str, file: str, raw: bytes, kind: type[M] | Any) -> M:
    """Decode one manifest file, raising ManifestError(workflow, file, JSON path, detail) on any problem."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        detail, path = split_error_path(str(exc))
        if "matching regex" in detail:
            # The regex itself helps nobody: say what a valid name looks like.
            detail = "expected a name of letters, digits, '_' or '-' starting with a letter or '_' (max 64)"
        raise ManifestError(workflow, file, path, detail) from None
    except msgspec.DecodeError as exc:
        raise ManifestError(workflow, file, "$", f"invalid JSON: {describe_decode_error(raw, exc)}") from None


def split_error_path(message: str) -> tuple[str, str]:
    """Split msgspec's "detail - at `$.a[0].b`" into (detail, "$.a[0].b"); the root is "$"."""
    match = _PATH_SUFFIX.search(message)
    if match is None:
        return message, "$"
    return message[: match.start()], match.group(1)


def describe_decode_error(raw: bytes, exc: msgspec.DecodeError) -> str:
    """msgspec's decode error with the byte offset turned into a line and column."""
    message = str(exc)
    match = re.search(r"\(byte (\d+)\)", message)
    if match is None:
        return message
    offset = int(match.group(1))
    head = raw[:offset]
    line = head.count(b"\n") + 1
    column = offset - (head.rfind(b"\n") + 1) + 1
    return f"{message[: match.start()].rstrip()} (line {line}, column {column})"
