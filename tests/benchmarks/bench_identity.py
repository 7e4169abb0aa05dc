"""Benchmark: what an OIDC token costs per request against an HS256 one, and what a run's trace costs to build.

    .venv/bin/python tests/benchmarks/bench_identity.py [--tokens 2000]

- tokens: `TokenVerifier.principal` on the same valid token N times, RS256 / PS256 / ES256 (keys served
  by a local JWKS server, cached after the first fetch) vs HS256 against the secret (the baseline);
- traces: `run_spans` over a run of the Analyzer shape (38 records, 13 spans) vs decoding those
  records' payloads (`Record.event`, the least any reader of the log does).
Each figure is the median of 5 rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app.http.auth import TokenVerifier, issue_token
from app.settings import Settings
from app.telemetry import run_spans, trace_resource
from domain.events import Record, now
from tests.nodes import QuietHandler, http_server

SECRET = "s" * 32


def median_of(rounds: int, work: Callable[[], Any]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def amedian_of(rounds: int, work: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def records_of_a_run() -> list[Record]:
    base = now()
    shapes: list[tuple[str, str | None, dict[str, Any]]] = [
        ("run.started", None, {"pattern": "RoundRobin", "max_turns": 8})
    ]
    for agent in ("Collector", "Analyst", "Summarizer"):
        shapes += [
            ("speaker.selected", agent, {"speaker": agent}),
            (
                "llm.call",
                agent,
                {
                    "model": "gpt-4o-mini",
                    "prompt_tokens": 50,
                    "completion_tokens": 40,
                    "latency_ms": 9.0,
                    "finish_reason": "tool_calls",
                },
            ),
            ("tool.called", agent, {"tool": "t", "call_id": f"c-{agent}", "arguments": "{}"}),
            ("tool.result", agent, {"tool": "t", "call_id": f"c-{agent}", "content": "ok"}),
            ("speaker.selected", agent, {"speaker": agent}),
            *[("message.delta", agent, {"message_id": agent, "index": i, "text": "word "}) for i in range(5)],
            (
                "llm.call",
                agent,
                {
                    "model": "gpt-4o-mini",
                    "prompt_tokens": 90,
                    "completion_tokens": 20,
                    "latency_ms": 7.0,
                    "finish_reason": "stop",
                    "ttft_ms": 2.0,
                },
            ),
            ("message.agent", agent, {"content": "words", "message_id": agent}),
        ]
    shapes.append(("run.completed", None, {"summary": "done"}))
    return [
        Record(id=str(seq), chat_id="c", seq=seq, type=type_, ts=base + timedelta(milliseconds=seq), app_id="a", user_id="u",
               workflow="Analyzer", run_id="r", agent=agent, visible=True, data=data, prev_hash="", hash="")
        for seq, (type_, agent, data) in enumerate(shapes, start=1)
    ]  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    keys = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "PS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
    }

    def jwk(alg: str) -> dict[str, Any]:
        make = ECAlgorithm if alg == "ES256" else RSAAlgorithm
        return {**make.to_jwk(keys[alg].public_key(), as_dict=True), "kid": alg, "alg": alg, "use": "sig"}

    class Jwks(QuietHandler):
        def do_GET(self) -> None:
            self.reply(json.dumps({"keys": [jwk(alg) for alg in keys]}).encode(), "application/json")

    with http_server(Jwks) as url:
        settings = Settings(
            auth_secret=SECRET, oidc_issuer="https://id.example.com", oidc_audience="rt", jwks_url=url
        )
        verifier = TokenVerifier(settings)
        assert await verifier.ready() == "ok"
        exp = int(time.time()) + 3600
        claims = {"iss": "https://id.example.com", "aud": "rt", "sub": "ann", "app_id": "shop", "exp": exp}
        tokens = {
            alg: jwt.encode(claims, key, algorithm=alg, headers={"kid": alg}) for alg, key in keys.items()
        }
        tokens["HS256"] = issue_token(SECRET, "ann", "shop", ["user"])

        async def verify(token: str) -> None:
            for _ in range(args.tokens):
                await verifier.principal(token)

        seconds = {alg: await amedian_of(5, lambda t=token: verify(t)) for alg, token in tokens.items()}  # type: ignore[misc]
    base = seconds["HS256"]
    print(f"token checks ({args.tokens} per round, median of 5):")
    for alg, took in seconds.items():
        print(f"  {alg}: {took / args.tokens * 1e6:7.1f} µs per token, ÷ HS256 {took / base:5.1f}×")

    records = records_of_a_run()
    resource = trace_resource()
    n = 500
    built = median_of(5, lambda: [run_spans(records, "r", resource) for _ in range(n)])
    decoded = median_of(5, lambda: [[r.event for r in records] for _ in range(n)])
    spans = len(run_spans(records, "r", resource))
    print(f"trace of a run ({len(records)} records, {spans} spans, {n} per round, median of 5):")
    print(f"  run_spans {built / n * 1e6:7.1f} µs per run ÷ decoding its records {built / decoded:5.1f}×")


if __name__ == "__main__":
    asyncio.run(main())
