"""Structured outputs at run time: ask the model for a schema, validate every reply, ask again with the errors.

An agent with a `structured_output` gets its schema as OpenAI's `response_format` (`json_schema`,
strict) on each model call. Its text replies are validated with `jsonschema`; an invalid one is
recorded as `output.invalid` (agent, attempt, errors with JSON paths) and the agent is asked again
with the errors, up to `max_retries` times; then the call raises `OutputRejected` and the run ends
`run.failed` with reason `output`. A valid reply reaches AG2 as usual, and its object is handed to
the recorder (`StructuredReply`), which puts it in the `message.agent`'s `data.structured`.

A structured agent's text is not streamed as `message.delta`s: a reply is only worth showing once
it is known to match (an invalid attempt would otherwise be left on screen as a broken message).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from app.runs.clients import Backend, Ledger, ModelRetryPolicy, TextChunk
from domain.errors import MozaiksError
from domain.events import OutputInvalid, SchemaViolation
from domain.manifest import StructuredOutputSpec
from domain.model_io import RecordMode
from domain.structured import json_path, strict_schema_problems

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletion  # a run loads the SDK; the server starts without it

# The JSON Schema dialect of structured outputs (OpenAI's strict mode is a subset of it).
Validator: Final = Draft202012Validator


def schema_problems(schema: dict[str, Any], root: str) -> list[tuple[str, str]]:
    """Why `schema` (at JSON path `root` of its manifest) cannot be a structured output: (path, detail)."""
    try:
        Validator.check_schema(schema)
    except SchemaError as exc:
        return [(json_path(exc.absolute_path, root), f"not a valid JSON Schema: {exc.message}")]
    return strict_schema_problems(schema, root)


def violations(validator: Any, value: Any) -> list[SchemaViolation]:
    """Every way `value` breaks the validator's schema, in document order, each with its JSON path."""
    errors = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    return [SchemaViolation(path=json_path(e.absolute_path), message=e.message) for e in errors]


class StructuredOutput:
    """One agent's structured output, its schema compiled once."""

    def __init__(self, spec: StructuredOutputSpec) -> None:
        self.spec = spec
        self.validator = Validator(spec.schema)

    def response_format(self) -> dict[str, Any]:
        """The schema as OpenAI's chat completions API takes it: `json_schema`, strict."""
        body: dict[str, Any] = {"name": self.spec.name, "schema": self.spec.schema, "strict": True}
        if self.spec.description:
            body["description"] = self.spec.description
        return {"type": "json_schema", "json_schema": body}

    def check(self, content: str | None) -> tuple[dict[str, Any] | None, list[SchemaViolation]]:
        """The reply's object when it matches the schema, else the violations (a non-JSON reply is one)."""
        if not content:
            return None, [
                SchemaViolation(path="$", message="the reply has no text; a JSON object was expected")
            ]
        try:
            value = json.loads(content)
        except json.JSONDecodeError as exc:
            return None, [SchemaViolation(path="$", message=f"the reply is not JSON: {exc}")]
        found = violations(self.validator, value)
        if found or not isinstance(value, dict):
            return None, found or [SchemaViolation(path="$", message="a JSON object was expected")]
        return value, []

    def retry_prompt(self, errors: list[SchemaViolation]) -> str:
        """What the agent is told after an invalid reply."""
        lines = "\n".join(f"- {e.path}: {e.message}" for e in errors)
        return (
            f"Your reply does not match the JSON schema {self.spec.name!r}:\n{lines}\n"
            "Answer again with only a JSON object that matches the schema."
        )


class StructuredReply(msgspec.Struct, frozen=True, kw_only=True):
    """A structured-output agent's valid reply: the recorder puts `value` in its `message.agent`."""

    agent: str
    value: dict[str, Any]


class OutputRejected(MozaiksError):
    """A structured-output agent's replies never matched its schema (the run fails with reason `output`)."""

    def __init__(self, agent: str, output: str, attempts: int, first: SchemaViolation) -> None:
        self.agent = agent
        self.first = first
        super().__init__(
            f"agent {agent}: no reply matched the structured output {output!r} in {attempts} "
            f"{'try' if attempts == 1 else 'tries'}; first error at {first.path}: {first.message}"
        )


class StructuredLedger(Ledger):
    """A run's ledger that asks structured-output agents for their schema and validates their replies."""

    def __init__(
        self,
        backend: Backend,
        outputs: Mapping[str, StructuredOutputSpec],
        report: Callable[[Any], None] | None = None,
        text: Callable[[TextChunk], None] | None = None,
        policy: ModelRetryPolicy | None = None,
        record_io: RecordMode = "full",
    ) -> None:
        super().__init__(backend, report=report, text=text, policy=policy, record_io=record_io)
        self.outputs = {agent: StructuredOutput(spec) for agent, spec in outputs.items()}

    def complete(
        self, agent: str, model: str, params: dict[str, Any], *, stream_text: bool = True
    ) -> ChatCompletion:
        """One completion; for a structured-output agent, one that matches its schema (or OutputRejected)."""
        output = self.outputs.get(agent)
        if output is None:
            return super().complete(agent, model, params, stream_text=stream_text)
        asked = {**params, "response_format": output.response_format()}
        messages = list(params.get("messages") or [])
        first: SchemaViolation | None = None
        attempts = output.spec.max_retries + 1
        for attempt in range(1, attempts + 1):
            response = super().complete(agent, model, {**asked, "messages": messages}, stream_text=False)
            message = response.choices[0].message if response.choices else None
            if message is not None and (message.tool_calls or message.function_call):
                return response  # a tool call is not the answer yet: only text replies are structured
            content = message.content if message is not None else None
            value, errors = output.check(content)
            if value is not None:
                self.record(StructuredReply(agent=agent, value=value))
                return response
            first = first or errors[0]
            self.record(
                OutputInvalid(
                    agent=agent,
                    output=output.spec.name,
                    attempt=attempt,
                    errors=errors,
                    content=content or "",
                )
            )
            messages += [
                {"role": "assistant", "content": content or ""},
                {"role": "user", "content": output.retry_prompt(errors)},
            ]
        assert first is not None
        raise OutputRejected(agent, output.spec.name, attempts, first)
