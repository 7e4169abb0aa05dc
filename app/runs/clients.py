"""The runtime's own model clients: every LLM call goes through them and is reported to a run ledger.

AG2 sees one client class, `MozaiksModelClient`, registered with `register_model_client`. It wraps
a backend: `OpenAIBackend` (the `openai` SDK, any OpenAI-compatible base URL) or `ScriptedBackend`
(offline: plays a workflow's `fixtures/<Agent>.json` replies in order). Each call is reported as an
`LlmCallNote`, which the recorder turns into an `llm.call` record; AG2's own usage summaries are
never used for metrics because client rebuilds reset them.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Protocol

import msgspec
from openai import OpenAI
from openai.types.chat import ChatCompletion

from domain.events import LlmCall
from domain.manifest import ScriptedReply

CLIENT_CLASS_NAME: Final = "MozaiksModelClient"
# Keys of an AG2 config entry that belong to us, not to the chat completions API.
_OWN_KEYS: Final = frozenset({"model_client_cls", "mozaiks_agent", "stream", "api_type"})
_OPENAI_KEYS: Final = frozenset(
    {"model", "messages", "tools", "tool_choice", "temperature", "max_tokens", "top_p", "parallel_tool_calls",
     "response_format", "stop", "seed", "n", "presence_penalty", "frequency_penalty", "user", "max_completion_tokens"}
)


class LlmCallNote(msgspec.Struct, frozen=True, kw_only=True):
    """One LLM call as the runtime's client saw it, and for which agent (becomes an `llm.call` record)."""

    agent: str
    call: LlmCall


class Backend(Protocol):
    """Where completions come from."""

    offline: bool

    def complete(self, agent: str, params: dict[str, Any]) -> ChatCompletion: ...


class OpenAIBackend:
    """Chat completions through the official `openai` SDK (OpenAI or any compatible server)."""

    offline = False

    def __init__(self, *, api_key: str | None, base_url: str | None, timeout_s: float = 120.0) -> None:
        # Compatible servers often need no key, but the SDK insists on one.
        self.client = OpenAI(api_key=api_key or "not-needed", base_url=base_url, timeout=timeout_s, max_retries=1)

    def complete(self, agent: str, params: dict[str, Any]) -> ChatCompletion:
        """One chat completion (non-streaming) with the parameters the API knows."""
        kwargs = {k: v for k, v in params.items() if k in _OPENAI_KEYS and v is not None}
        completion: ChatCompletion = self.client.chat.completions.create(**kwargs)
        return completion


class ScriptedBackend:
    """Offline model: plays each agent's scripted replies in order (cycling), counting its own usage.

    Token counts are the fixture's when given, else about one token per 4 characters, so runs are
    deterministic; `prompt_tokens`/`completion_tokens`/`calls` are this client's own totals.
    """

    offline = True

    def __init__(self, fixtures: Mapping[str, list[ScriptedReply]], start: Mapping[str, int] | None = None) -> None:
        self.fixtures = fixtures
        self.cursor: dict[str, int] = dict(start or {})
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.calls = 0
        self._lock = threading.Lock()

    def complete(self, agent: str, params: dict[str, Any]) -> ChatCompletion:
        """The agent's next scripted reply as an OpenAI ChatCompletion."""
        with self._lock:
            index = self.cursor.get(agent, 0)
            self.cursor[agent] = index + 1
            script = self.fixtures.get(agent)
            step = script[index % len(script)] if script else ScriptedReply(content=f"[offline] {agent} has no scripted reply")
            message: dict[str, Any] = {"role": "assistant", "content": step.content}
            if step.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": f"call_{agent}_{index}_{j}",
                        "type": "function",
                        "function": {"name": call.name, "arguments": json.dumps(call.arguments, sort_keys=True)},
                    }
                    for j, call in enumerate(step.tool_calls)
                ]
            prompt = step.prompt_tokens if step.prompt_tokens is not None else _estimate(params.get("messages", []))
            completion = (
                step.completion_tokens
                if step.completion_tokens is not None
                else _estimate([message["content"] or "", message.get("tool_calls", [])])
            )
            self.calls += 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion
        return ChatCompletion.model_validate(
            {
                "id": f"offline-{agent}-{index}",
                "object": "chat.completion",
                "created": 0,
                "model": str(params.get("model") or "offline"),
                "choices": [
                    {"index": 0, "message": message, "finish_reason": "tool_calls" if step.tool_calls else "stop"}
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            }
        )


def _estimate(value: Any) -> int:
    """About one token per four characters of the JSON text (deterministic, never zero)."""
    return max(1, math.ceil(len(json.dumps(value, default=str)) / 4))


class Ledger:
    """Per run: the backend every client of the run uses, and where each call is reported."""

    def __init__(self, backend: Backend, report: Callable[[LlmCallNote], None] | None = None) -> None:
        self.backend = backend
        self._report = report

    def record(self, note: LlmCallNote) -> None:
        """Hand the note to the run's reporter (from any thread)."""
        if self._report is not None:
            self._report(note)

    def client_class(self) -> type[MozaiksModelClient]:
        """A `MozaiksModelClient` class bound to this ledger.

        AG2 instantiates registered client classes itself (the Auto pattern's speaker selector with
        no arguments), so the ledger travels on a per-run subclass that keeps the registered name.
        """
        return type(CLIENT_CLASS_NAME, (MozaiksModelClient,), {"ledger": self})


class MozaiksModelClient:
    """AG2 ModelClient that forwards to the run's backend and records every call in its ledger."""

    RESPONSE_USAGE_KEYS: ClassVar[list[str]] = ["prompt_tokens", "completion_tokens", "total_tokens", "cost", "model"]
    ledger: ClassVar[Ledger]

    def __init__(self, config: dict[str, Any], **_: Any) -> None:
        # Which agent this client speaks for travels in the AG2 config entry (extra fields are allowed).
        self.agent = str(config.get("mozaiks_agent") or "chat_manager")
        self.model = str(config.get("model") or "")

    def create(self, params: dict[str, Any]) -> ChatCompletion:
        """Run one completion and record it (also when it fails)."""
        backend = self.ledger.backend
        clean = {k: v for k, v in params.items() if k not in _OWN_KEYS}
        started = time.perf_counter()
        try:
            response = backend.complete(self.agent, clean)
        except Exception as exc:
            self.ledger.record(
                LlmCallNote(
                    agent=self.agent,
                    call=LlmCall(
                        model=self.model, latency_ms=_ms(started), offline=backend.offline,
                        error=f"{type(exc).__name__}: {exc}",
                    ),
                )
            )
            raise
        usage = response.usage
        self.ledger.record(
            LlmCallNote(
                agent=self.agent,
                call=LlmCall(
                    model=response.model or self.model,
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    completion_tokens=usage.completion_tokens if usage else 0,
                    latency_ms=_ms(started),
                    finish_reason=response.choices[0].finish_reason if response.choices else None,
                    offline=backend.offline,
                ),
            )
        )
        return response

    def message_retrieval(self, response: ChatCompletion) -> list[Any]:
        """Text replies as strings, tool-calling replies as the message object (what AG2 expects)."""
        return [
            choice.message if choice.message.tool_calls or choice.message.function_call else (choice.message.content or "")
            for choice in response.choices
        ]

    def cost(self, response: ChatCompletion) -> float:
        """Always 0: cost is computed from the recorded tokens with the versioned price table."""
        return 0.0

    @staticmethod
    def get_usage(response: ChatCompletion) -> dict[str, Any]:
        """Usage in AG2's shape (only AG2's own summaries read it)."""
        usage = response.usage
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        return {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "cost": 0.0, "model": response.model,
        }


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
