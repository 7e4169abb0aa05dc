"""Two chats compared turn by turn (`mozaiks diff`, `GET /api/chats/{a}/diff/{b}`).

A turn is what one party did in one go: a user message (or input answer), or one answered model
call of an agent with the message, tool calls and tool results that followed it. Turns are aligned
by position. A turn has changed when its agent, text, tool calls, tool results or tokens differ;
cost and latency are reported as deltas and never make two chats differ (a replay is never as fast).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from itertools import zip_longest

import msgspec

from domain.events import LlmCall, Record
from projections.prices import PriceTable

# Fields of a turn that make two chats differ.
COMPARED = ("agent", "text", "tool_calls", "tool_results", "tokens")


class Turn(msgspec.Struct, kw_only=True):
    """One turn of a chat."""

    seq: int
    agent: str
    text: str = ""
    # [tool name, arguments as the model wrote them]
    tool_calls: list[list[str]] = []
    tool_results: list[str] = []
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    latency_ms: float = 0.0

    @property
    def tokens(self) -> tuple[int, int]:
        return self.prompt_tokens, self.completion_tokens


class TurnDiff(msgspec.Struct, frozen=True, kw_only=True):
    """One aligned pair of turns (either side None past the shorter chat) and what changed."""

    index: int
    a: Turn | None
    b: Turn | None
    changed: list[str]
    text_diff: str = ""


class DiffSummary(msgspec.Struct, frozen=True, kw_only=True):
    turns_a: int
    turns_b: int
    turns_changed: int
    tokens_a: int
    tokens_b: int
    tokens_delta: int
    cost_a_usd: float
    cost_b_usd: float
    cost_delta_usd: float
    latency_delta_ms: float


class ChatDiff(msgspec.Struct, frozen=True, kw_only=True):
    """`a` and `b` aligned turn by turn; `same` when no turn changed."""

    a: str
    b: str
    same: bool
    summary: DiffSummary
    turns: list[TurnDiff]


def turns_of(records: Sequence[Record], prices: PriceTable | None = None) -> list[Turn]:
    """The chat's turns in log order."""
    turns: list[Turn] = []
    current: Turn | None = None
    for record in records:
        match record.type:
            case "message.user" | "input.received":
                text = record.data.get("content", record.data.get("text", ""))
                turns.append(Turn(seq=record.seq, agent="user", text=str(text)))
                current = None
            case "llm.call" if record.data.get("status", "ok") == "ok":
                call = record.event
                assert isinstance(call, LlmCall)
                current = Turn(
                    seq=record.seq,
                    agent=record.agent or "",
                    prompt_tokens=call.prompt_tokens,
                    completion_tokens=call.completion_tokens,
                    cost_usd=_cost(prices, record, call),
                    latency_ms=call.latency_ms,
                )
                turns.append(current)
            case "message.agent" if current is not None:
                current.text += str(record.data["content"])
            case "tool.called" if current is not None:
                current.tool_calls.append([str(record.data["tool"]), str(record.data["arguments"])])
            case "tool.result" if current is not None:
                current.tool_results.append(str(record.data["content"]))
    return turns


def _cost(prices: PriceTable | None, record: Record, call: LlmCall) -> float | None:
    if call.offline or prices is None:
        return 0.0
    nano = prices.cost_nanousd(call.model, call.prompt_tokens, call.completion_tokens, record.ts)
    return None if nano is None else nano / 1e9


def diff_chats(
    a: str, records_a: Sequence[Record], b: str, records_b: Sequence[Record], prices: PriceTable | None = None
) -> ChatDiff:
    """Chats `a` and `b` aligned turn by turn, with what changed in each turn and a summary."""
    turns_a, turns_b = turns_of(records_a, prices), turns_of(records_b, prices)
    pairs: list[TurnDiff] = []
    for index, (left, right) in enumerate(zip_longest(turns_a, turns_b)):
        if left is None or right is None:
            changed = list(COMPARED)
        else:
            changed = [name for name in COMPARED if getattr(left, name) != getattr(right, name)]
        text_diff = ""
        if "text" in changed:
            text_diff = "\n".join(
                difflib.unified_diff(
                    (left.text if left else "").splitlines(),
                    (right.text if right else "").splitlines(),
                    fromfile=f"{a} turn {index + 1}",
                    tofile=f"{b} turn {index + 1}",
                    lineterm="",
                )
            )
        pairs.append(TurnDiff(index=index + 1, a=left, b=right, changed=changed, text_diff=text_diff))
    tokens_a = sum(sum(t.tokens) for t in turns_a)
    tokens_b = sum(sum(t.tokens) for t in turns_b)
    cost_a = sum(t.cost_usd or 0.0 for t in turns_a)
    cost_b = sum(t.cost_usd or 0.0 for t in turns_b)
    changed_turns = sum(1 for pair in pairs if pair.changed)
    summary = DiffSummary(
        turns_a=len(turns_a),
        turns_b=len(turns_b),
        turns_changed=changed_turns,
        tokens_a=tokens_a,
        tokens_b=tokens_b,
        tokens_delta=tokens_b - tokens_a,
        cost_a_usd=cost_a,
        cost_b_usd=cost_b,
        cost_delta_usd=cost_b - cost_a,
        latency_delta_ms=round(sum(t.latency_ms for t in turns_b) - sum(t.latency_ms for t in turns_a), 3),
    )
    return ChatDiff(a=a, b=b, same=changed_turns == 0, summary=summary, turns=pairs)


def as_text(result: ChatDiff) -> str:
    """The diff for a terminal: one block per changed turn, then the summary line."""
    lines: list[str] = []
    for pair in result.turns:
        if not pair.changed:
            continue
        who = pair.a.agent if pair.a else pair.b.agent if pair.b else "?"
        lines.append(f"turn {pair.index} ({who}): {', '.join(pair.changed)} changed")
        if pair.text_diff:
            lines.extend(f"  {line}" for line in pair.text_diff.splitlines())
        for name in ("tool_calls", "tool_results"):
            if name in pair.changed:
                lines.append(f"  {name}: {getattr(pair.a, name, None)} -> {getattr(pair.b, name, None)}")
        if "tokens" in pair.changed:
            lines.append(
                f"  tokens: {pair.a.tokens if pair.a else None} -> {pair.b.tokens if pair.b else None}"
            )
    s = result.summary
    lines.append(
        f"{'same' if result.same else 'DIFFERENT'}: {s.turns_changed} of {max(s.turns_a, s.turns_b)} turns changed · "
        f"tokens {s.tokens_a} -> {s.tokens_b} ({s.tokens_delta:+d}) · cost {s.cost_delta_usd:+.6f} USD · "
        f"latency {s.latency_delta_ms:+.0f} ms"
    )
    return "\n".join(lines)
