"""The runtime's own model clients: every LLM call goes through them and is reported to a run ledger.

AG2 sees one client class, `MozaiksModelClient`, registered with `register_model_client`. It wraps
a backend: `OpenAIBackend` (the `openai` SDK, any OpenAI-compatible base URL) or `ScriptedBackend`
(offline: plays a workflow's `fixtures/<Agent>.json` replies in order). Each call is reported as an
`LlmCallNote`, which the recorder turns into an `llm.call` record; AG2's own usage summaries are
never used for metrics because client rebuilds reset them.

Both backends stream: the reply text goes, piece by piece, to the call's `TextStream` (which the
run turns into `message.delta` records) while the backend assembles the one complete
ChatCompletion AG2 receives, tool calls included.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

import httpx
import msgspec
from httpx_sse import EventSource

from domain.errors import MozaiksError
from domain.events import LlmCall, new_id
from domain.manifest import ScriptedReply
from domain.model_io import Parts, RecordMode, split_call

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletion

# The `openai` SDK (a second of imports) is imported where a model call needs it: AG2 loads it with
# the first run anyway, and a server that has run nothing yet starts without it.

CLIENT_CLASS_NAME: Final = "MozaiksModelClient"
# Keys of an AG2 config entry that belong to us, not to the chat completions API.
_OWN_KEYS: Final = frozenset({"model_client_cls", "mozaiks_agent", "stream", "api_type"})
_OPENAI_KEYS: Final = frozenset(
    {
        "model",
        "messages",
        "tools",
        "tool_choice",
        "temperature",
        "max_tokens",
        "top_p",
        "parallel_tool_calls",
        "response_format",
        "stop",
        "seed",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "user",
        "max_completion_tokens",
    }
)


class ModelRetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a model call is retried (README: MOZAIKS_LLM_ATTEMPTS, MOZAIKS_LLM_BACKOFF_S, MOZAIKS_LLM_BACKOFF_MAX_S).

    Retried: 429 (after its Retry-After when given), 408, 409, 5xx, timeouts and broken
    connections (also mid-response). Each try is recorded as its own `llm.call` (status, attempt);
    after `attempts` tries, or at once for any other error, the call raises ModelUnavailable and
    the run fails with reason "model". Waits double from `first_delay_s`, capped at `max_delay_s`
    (a longer Retry-After is capped too).
    """

    attempts: int = 4
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait after failed try number `attempt`."""
        backoff = self.first_delay_s * 2 ** (attempt - 1)
        after = retry_after_s(exc)
        return min(after if after is not None else backoff, self.max_delay_s)


def retry_after_s(exc: BaseException) -> float | None:
    """The server's Retry-After (seconds or an HTTP date) on an API error, if it sent one."""
    response = getattr(exc, "response", None)
    raw = response.headers.get("retry-after") if isinstance(response, httpx.Response) else None
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        when = email.utils.parsedate_to_datetime(raw) if raw else None
        return max(0.0, when.timestamp() - time.time()) if when is not None else None


def fault_status(exc: BaseException) -> tuple[str, bool]:
    """What a failed model call's `llm.call.status` says, and whether trying again may help."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        return f"http_{code}", code in (408, 409, 429) or code >= 500
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return "timeout", True
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError | IncompleteStream):
        return "connection", True  # includes a connection reset or a stream cut in the middle of a response
    return "error", False


class ModelUnavailable(MozaiksError):
    """A model call failed for good (retries spent, or an error retrying cannot fix)."""

    def __init__(self, agent: str, attempts: int, cause: BaseException) -> None:
        self.agent = agent
        self.attempts = attempts
        self.cause = cause
        status, _ = fault_status(cause)
        super().__init__(
            f"model call for {agent} failed after {attempts} "
            f"{'try' if attempts == 1 else 'tries'} ({status}): {type(cause).__name__}: {cause}"
        )


class LlmCallNote(msgspec.Struct, frozen=True, kw_only=True):
    """One LLM call as the runtime's client saw it, and for which agent (becomes an `llm.call` record)."""

    agent: str
    call: LlmCall
    # The call's model I/O parts to store before its record (MOZAIKS_RECORD_MODEL_IO=full), else None.
    parts: Parts | None = None


def request_body(params: dict[str, Any], *, streamed: bool) -> dict[str, Any]:
    """The chat completions request a backend sends for AG2's `params` (what model I/O records)."""
    body = {k: v for k, v in params.items() if k in _OPENAI_KEYS and v is not None}
    if streamed:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def response_body(response: ChatCompletion) -> dict[str, Any]:
    """A completion as model I/O records it (text, tool calls and arguments, finish reason, usage)."""
    return response.model_dump(mode="json", exclude_none=True)


class IncompleteStream(ConnectionError):
    """The model's stream ended before the reply was complete (no chunk, or no finish reason)."""


class TextChunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of an agent's reply text as the model streamed it (recorded in a `message.delta`)."""

    agent: str
    message_id: str
    text: str


class TextStream:
    """Where one model call's reply text goes as it arrives, and when it arrived.

    A backend calls `begin()` when a stream starts, so every attempt (a retried call included) is
    a message of its own; `write` passes text on, `token` marks a token that is not text (tool-call
    arguments). Called from AG2's worker thread: `send` must hand chunks over thread-safely.
    """

    def __init__(self, agent: str, send: Callable[[TextChunk], None] | None = None) -> None:
        self.agent = agent
        self.send = send
        self.message_id = new_id()
        self.first: float | None = None
        self.last: float | None = None

    def begin(self) -> None:
        """A new stream (a new message) starts."""
        self.message_id = new_id()
        self.first = self.last = None

    def token(self) -> None:
        """A token arrived (text or not): times the first and the last."""
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last

    def write(self, text: str) -> None:
        """Reply text arrived."""
        if not text:
            return
        self.token()
        if self.send is not None:
            self.send(TextChunk(agent=self.agent, message_id=self.message_id, text=text))

    def timing(self, started: float) -> tuple[float | None, float | None]:
        """(time to first token, first → last token) in ms; (None, None) when nothing streamed."""
        if self.first is None or self.last is None:
            return None, None
        return round((self.first - started) * 1000, 3), round((self.last - self.first) * 1000, 3)


class Backend(Protocol):
    """Where completions come from."""

    offline: bool

    def complete(
        self, agent: str, params: dict[str, Any], stream: TextStream | None = None
    ) -> ChatCompletion: ...


class OpenAIBackend:
    """Chat completions through the official `openai` SDK (OpenAI or any compatible server), streamed."""

    offline = False

    def __init__(
        self, *, api_key: str | None, base_url: str | None, timeout_s: float = 120.0, max_calls: int = 256
    ) -> None:
        # Compatible servers often need no key, but the SDK insists on one.
        # The SDK's own retries are off: ModelRetryPolicy retries, and records every try.
        # A connection kept open for each call that may be in flight (MOZAIKS_MAX_CONCURRENT_LLM_CALLS):
        # with the SDK's default of 100, 200 concurrent chats opened and closed a connection per call.
        import openai

        limits = httpx.Limits(max_connections=max(1000, max_calls), max_keepalive_connections=max_calls)
        self.client = openai.OpenAI(
            api_key=api_key or "not-needed",
            base_url=base_url,
            timeout=timeout_s,
            max_retries=0,
            http_client=openai.DefaultHttpxClient(limits=limits),
        )

    def complete(
        self, agent: str, params: dict[str, Any], stream: TextStream | None = None
    ) -> ChatCompletion:
        """One streamed chat completion with the parameters the API knows, assembled whole.

        The SDK sends the request (base URL, key, timeout, its status errors); its streaming
        response is read as server-sent events (`httpx-sse`) whose chunks msgspec decodes: the
        SDK's own per-chunk model building cost ~170 µs a chunk, 10 times the rest, and at 50
        concurrent streams it was what kept the node behind the model. The reply text goes to
        `stream` chunk by chunk; the chunks (text, tool calls and their arguments, finish reason,
        usage) are assembled into the one ChatCompletion AG2 receives.
        """
        import openai

        stream = stream or TextStream(agent)
        stream.begin()
        assembly = Assembly()
        with self.client.chat.completions.with_streaming_response.create(**self.request(params)) as response:
            for event in EventSource(response.http_response).iter_sse():
                if event.data.startswith("[DONE]"):
                    break
                chunk = _CHUNK.decode(event.data)
                if chunk.error:  # as the SDK's own stream does with an error event
                    message = chunk.error.get("message") if isinstance(chunk.error, dict) else None
                    raise openai.APIError(
                        message
                        if isinstance(message, str) and message
                        else "An error occurred during streaming",
                        response.http_response.request,
                        body=chunk.error,
                    )
                assembly.add(chunk)
                for choice in chunk.choices or ():
                    if choice.index != 0 or choice.delta is None:
                        continue
                    if choice.delta.content:
                        stream.write(choice.delta.content)
                    elif choice.delta.tool_calls:
                        stream.token()
        return assembly.completion(agent)

    def request(self, params: dict[str, Any]) -> dict[str, Any]:
        """The request body this backend sends for `params` (streamed, usage included)."""
        return request_body(params, streamed=True)


class ChunkFunction(msgspec.Struct, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(msgspec.Struct, kw_only=True):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: ChunkFunction | None = None


class ChunkDelta(msgspec.Struct, kw_only=True):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: ChunkDelta | None = None
    finish_reason: str | None = None


class Chunk(msgspec.Struct, kw_only=True):
    """The part of a streamed `chat.completion.chunk` the runtime reads; unknown fields are ignored.

    Lenient like the SDK's own (non-validating) models: compatible servers leave fields out or null.
    """

    id: str | None = None
    created: int | float | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    choices: list[ChunkChoice] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


_CHUNK: Final = msgspec.json.Decoder(Chunk)


class Assembly:
    """The chunks of one streamed completion, put together as the ChatCompletion they stand for.

    The SDK has an accumulator (`ChatCompletionStreamState`), but it re-serialises the whole
    snapshot for every chunk: measured 0.7 to 1.7 ms per chunk over 400 to 2,000 chunks, which at
    zero model latency made it the stream's bottleneck. This keeps the pieces in lists instead.
    """

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        # choice index -> {"role", "content": [...], "refusal": [...], "tool_calls": {index: {...}}, "finish_reason"}
        self.choices: dict[int, dict[str, Any]] = {}

    def add(self, chunk: Chunk) -> None:
        """Take one chunk in."""
        if not self.head:
            self.head = {
                "id": chunk.id or "",
                "created": int(chunk.created or 0),
                "model": chunk.model or "",
                "system_fingerprint": chunk.system_fingerprint,
            }
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices or ():
            state = self.choices.setdefault(
                choice.index,
                {"role": "assistant", "content": [], "refusal": [], "tool_calls": {}, "finish_reason": None},
            )
            if choice.finish_reason:
                state["finish_reason"] = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            if delta.role:
                state["role"] = delta.role
            if delta.content:
                state["content"].append(delta.content)
            if delta.refusal:
                state["refusal"].append(delta.refusal)
            for call in delta.tool_calls or []:
                # As the SDK's own accumulator does: string fields arrive in pieces and are joined.
                held = state["tool_calls"].setdefault(
                    call.index, {"id": "", "type": "function", "name": "", "arguments": ""}
                )
                held["id"] += call.id or ""
                held["type"] = call.type or held["type"]
                if call.function is not None:
                    held["name"] += call.function.name or ""
                    held["arguments"] += call.function.arguments or ""

    def completion(self, agent: str) -> ChatCompletion:
        """The whole completion; raises IncompleteStream when the stream ended before the reply did."""
        if not self.head:
            raise IncompleteStream(f"the model's stream for {agent} ended without a single chunk")
        if not self.choices or any(state["finish_reason"] is None for state in self.choices.values()):
            # The connection closed mid-answer: a cut-off text must not pass for a whole reply.
            raise IncompleteStream(f"the model's stream for {agent} ended before its finish reason")
        choices = []
        for index, state in sorted(self.choices.items()):
            message: dict[str, Any] = {"role": state["role"], "content": "".join(state["content"]) or None}
            if state["refusal"]:
                message["refusal"] = "".join(state["refusal"])
            if state["tool_calls"]:
                message["tool_calls"] = [
                    {
                        "id": held["id"],
                        "type": held["type"],
                        "function": {"name": held["name"], "arguments": held["arguments"]},
                    }
                    for _, held in sorted(state["tool_calls"].items())
                ]
            choices.append({"index": index, "message": message, "finish_reason": state["finish_reason"]})
        from openai.types.chat import ChatCompletion

        return ChatCompletion.model_validate(
            {**self.head, "object": "chat.completion", "choices": choices, "usage": self.usage}
        )


# One chunk per word with the whitespace after it: the chunks concatenate to the exact text.
_WORDS: Final = re.compile(r"\S+\s*|\s+")


class ScriptedBackend:
    """Offline model: plays each agent's scripted replies in order (cycling), counting its own usage.

    Token counts are the fixture's when given, else about one token per 4 characters, so runs are
    deterministic; `prompt_tokens`/`completion_tokens`/`calls` are this client's own totals.
    """

    offline = True

    def __init__(
        self,
        fixtures: Mapping[str, list[ScriptedReply]],
        start: Mapping[str, int] | None = None,
        *,
        chunk_s: float = 0.0,
    ) -> None:
        self.fixtures = fixtures
        # Pause between streamed words, so offline runs stream at a visible pace.
        self.chunk_s = chunk_s
        self.cursor: dict[str, int] = dict(start or {})
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.calls = 0
        self._lock = threading.Lock()

    def request(self, params: dict[str, Any]) -> dict[str, Any]:
        """The request this backend answers for `params`: what would be sent, without stream flags."""
        return request_body(params, streamed=False)

    def complete(
        self, agent: str, params: dict[str, Any], stream: TextStream | None = None
    ) -> ChatCompletion:
        """The agent's next scripted reply, streamed word by word, as an OpenAI ChatCompletion."""
        with self._lock:
            index = self.cursor.get(agent, 0)
            self.cursor[agent] = index + 1
            script = self.fixtures.get(agent)
            step = (
                script[index % len(script)]
                if script
                else ScriptedReply(content=f"[offline] {agent} has no scripted reply")
            )
            content = step.content if step.structured is None else json.dumps(step.structured)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if step.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": f"call_{agent}_{index}_{j}",
                        "type": "function",
                        "function": {
                            "name": call.name,
                            "arguments": json.dumps(call.arguments, sort_keys=True),
                        },
                    }
                    for j, call in enumerate(step.tool_calls)
                ]
            prompt = (
                step.prompt_tokens
                if step.prompt_tokens is not None
                else _estimate(params.get("messages", []))
            )
            completion = (
                step.completion_tokens
                if step.completion_tokens is not None
                else _estimate([message["content"] or "", message.get("tool_calls", [])])
            )
            self.calls += 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion
        if stream is not None:
            stream.begin()
            for number, word in enumerate(_WORDS.findall(content or "")):
                if number and self.chunk_s > 0:
                    time.sleep(self.chunk_s)  # AG2's worker thread, never the event loop
                stream.write(word)
        from openai.types.chat import ChatCompletion

        return ChatCompletion.model_validate(
            {
                "id": f"offline-{agent}-{index}",
                "object": "chat.completion",
                "created": 0,
                "model": str(params.get("model") or "offline"),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if step.tool_calls else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )


def _estimate(value: Any) -> int:
    """About one token per four characters of the JSON text (deterministic, never zero)."""
    return max(1, math.ceil(len(json.dumps(value, default=str)) / 4))


class Ledger:
    """Per run: the backend every client of the run uses, and where each call is reported."""

    def __init__(
        self,
        backend: Backend,
        report: Callable[[Any], None] | None = None,
        text: Callable[[TextChunk], None] | None = None,
        policy: ModelRetryPolicy | None = None,
        record_io: RecordMode = "full",
    ) -> None:
        self.backend = backend
        self.policy = policy or ModelRetryPolicy()
        # MOZAIKS_RECORD_MODEL_IO: what of each call's exact request and response is kept.
        self.record_io = record_io
        self._report = report
        # Where streamed reply text goes (from AG2's worker threads).
        self.text = text
        self._lock = threading.Lock()
        # Set when the run is over: a call waiting to retry gives up instead of calling again.
        self.closed = threading.Event()
        # Called before each call with the agent's name; raises to refuse it (budgets, app/runs/budgets.py).
        self.gate: Callable[[str], None] | None = None

    def complete(
        self, agent: str, model: str, params: dict[str, Any], *, stream_text: bool = True
    ) -> ChatCompletion:
        """One completion under the retry policy; every try is recorded as an `llm.call`.

        `stream_text=False`: the reply's text is not handed on as it arrives (its timing still is).
        """
        if self.gate is not None:
            self.gate(agent)
        backend = self.backend
        # Each try streams as a message of its own (`begin`): a failed try's text stays an incomplete message.
        stream = TextStream(agent, self.text if stream_text else None)
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                response = backend.complete(agent, params, stream)
            except Exception as exc:
                status, retryable = fault_status(exc)
                ttft, streamed = stream.timing(started)
                call = LlmCall(
                    model=model,
                    latency_ms=_ms(started),
                    offline=backend.offline,
                    error=f"{type(exc).__name__}: {exc}",
                    status=status,
                    attempt=attempt,
                    ttft_ms=ttft,
                    stream_ms=streamed,
                )
                self.record(self.note(agent, call, params, None))
                if not retryable or attempt >= self.policy.attempts:
                    raise ModelUnavailable(agent, attempt, exc) from exc
                if self.closed.wait(self.policy.delay(attempt, exc)):
                    raise ModelUnavailable(agent, attempt, exc) from exc
                continue
            ttft, streamed = stream.timing(started)
            usage = response.usage
            call = LlmCall(
                model=response.model or model,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                latency_ms=_ms(started),
                finish_reason=response.choices[0].finish_reason if response.choices else None,
                offline=backend.offline,
                attempt=attempt,
                ttft_ms=ttft,
                stream_ms=streamed,
            )
            self.record(self.note(agent, call, params, response))
            return response

    def note(
        self, agent: str, call: LlmCall, params: dict[str, Any], response: ChatCompletion | None
    ) -> LlmCallNote:
        """The call's note, with its model I/O (hashes, and the parts to store) per `record_io`."""
        if self.record_io == "off":
            return LlmCallNote(agent=agent, call=call)
        body = getattr(self.backend, "request", None)
        request = body(params) if callable(body) else request_body(params, streamed=False)
        parts = split_call(request, response_body(response) if response is not None else None)
        call = msgspec.structs.replace(
            call, request=parts.request, response=parts.response, io=self.record_io
        )
        return LlmCallNote(agent=agent, call=call, parts=parts if self.record_io == "full" else None)

    def record(self, note: Any) -> None:
        """Hand a note (an LLM call, or another runtime record of the call) to the run's reporter (from any thread)."""
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

    RESPONSE_USAGE_KEYS: ClassVar[list[str]] = [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost",
        "model",
    ]
    ledger: ClassVar[Ledger]

    def __init__(self, config: dict[str, Any], **_: Any) -> None:
        # Which agent this client speaks for travels in the AG2 config entry (extra fields are allowed).
        self.agent = str(config.get("mozaiks_agent") or "chat_manager")
        self.model = str(config.get("model") or "")

    def create(self, params: dict[str, Any]) -> ChatCompletion:
        """Run one completion (retried per the run's policy) and record every try."""
        clean = {k: v for k, v in params.items() if k not in _OWN_KEYS}
        return self.ledger.complete(self.agent, self.model, clean)

    def message_retrieval(self, response: ChatCompletion) -> list[Any]:
        """Text replies as strings, tool-calling replies as the message object (what AG2 expects)."""
        return [
            choice.message
            if choice.message.tool_calls or choice.message.function_call
            else (choice.message.content or "")
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
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cost": 0.0,
            "model": response.model,
        }


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
