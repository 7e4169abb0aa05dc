"""The reliability report: every fault scenario the suite runs, and what it counted.

Each fault test declares its scenario with `SCENARIOS[...]` (what it injects, what it verifies) and
adds its counts through the session's `Report`. At the end of the session the report is written to
`test-artifacts/reliability.json` and rendered to `test-artifacts/RELIABILITY.md`;
`python -m tests.faults.report` copies that rendering to the repository's RELIABILITY.md.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from tests.faults.checks import Soundness

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
COMMITTED = ROOT / "RELIABILITY.md"
VERIFIES = (
    "the chat's log gapless and `verify` ok; no AG2 event uuid recorded twice; one terminal record per "
    "run, and it is the run's last record; chat_sessions and chat_metrics equal a rebuild from the log; "
    "the chat continues on a new message"
)


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    injects: str
    expects: str


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="insert: closeConnection x2",
            injects="failCommand on the node's `insert`, `closeConnection`, `{times: 2}`, armed mid-run",
            expects="the run's appends are re-sent and the run completes",
        ),
        Scenario(
            name="insert: writeConcernError x2",
            injects="failCommand on the node's `insert`, `writeConcernError` (code 64), `{times: 2}`, armed mid-run",
            expects="applied-but-unconfirmed batches are re-sent, meet their own `_id`s, the run completes",
        ),
        Scenario(
            name="insert: errorCode 11600 + RetryableWriteError x2",
            injects="failCommand on the node's `insert`, `errorCode: 11600`, label `RetryableWriteError`, `{times: 2}`, mid-run",
            expects="the driver re-discovers the primary, the appends are retried, the run completes",
        ),
        Scenario(
            name="insert: closeConnection until the retry budget is spent",
            injects="failCommand on the node's `insert`, `closeConnection`, `alwaysOn` (MOZAIKS_DB_RETRY_S=1), then off",
            expects="the run ends `run.failed` (reason `storage`) once the database is back, recorded by the node "
            "that kept and renewed the lease; the events of the unrecorded batch are recorded before it",
        ),
        Scenario(
            name="blockConnection: insert, find, getMore",
            injects="failCommand `blockConnection` (400 ms) on `insert`, `find` and `getMore` (change streams), mid-run",
            expects="slow writes and reads delay the run but it completes; the WebSocket client sees every record once",
        ),
        Scenario(
            name="database kill -9 and restart",
            injects="SIGKILL of the database process while a run waits for input; the answer is sent during the "
            "outage; restart on the same port and data folder once the node has met the outage (a failed "
            "command, or its client's monitor marking the server unreachable)",
            expects="the answer is recorded once the database is back, the run completes; nothing lost or doubled",
        ),
        Scenario(
            name="serve process kill -9",
            injects="SIGKILL of the `mozaiks serve` OS process running the chat; a second process serves the clients",
            expects="the second process records `run.failed` (reason `interrupted`) within the lease TTL, its WebSocket "
            "client sees every record once, and it runs the chat's next message",
        ),
        Scenario(
            name="model: 429 Retry-After, 500, stall, connection reset",
            injects="a local OpenAI-compatible server answering 429 (Retry-After: 1), then 500, then a stall past the "
            "client timeout (MOZAIKS_LLM_TIMEOUT_S=1), then a connection reset mid-response, then a good reply",
            expects="every try is an `llm.call` (status, attempt); the run completes",
        ),
        Scenario(
            name="model: retry budget spent",
            injects="the local OpenAI-compatible server answering 503 to every call",
            expects="MOZAIKS_LLM_ATTEMPTS tries recorded, then `run.failed` with reason `model`",
        ),
    )
}


class Result(msgspec.Struct, kw_only=True):
    name: str
    faults_injected: int
    events_checked: int
    events_lost: int = 0
    events_duplicated: int = 0
    runs: int = 0
    detail: dict[str, Any] = {}


class Report:
    """Results of this session's fault scenarios."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}

    def add(self, result: Result) -> None:
        assert result.name in SCENARIOS, f"undeclared scenario {result.name!r}"
        self.results[result.name] = result

    def record(
        self, name: str, injected: int, sound: Soundness, detail: dict[str, Any] | None = None
    ) -> None:
        """Add a scenario's result: the faults it injected and what `assert_chat_sound` checked."""
        self.add(
            Result(
                name=name,
                faults_injected=injected,
                events_checked=sound.events,
                runs=sound.runs,
                events_lost=sound.lost,
                events_duplicated=sound.duplicated,
                detail=detail or {},
            )
        )

    def write(self) -> None:
        if not self.results:
            return
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "reliability.json").write_bytes(
            msgspec.json.format(msgspec.json.encode(list(self.results.values())))
        )
        (ARTIFACTS / "RELIABILITY.md").write_text(render(list(self.results.values())))


def render(results: list[Result]) -> str:
    """RELIABILITY.md from a session's results (scenarios in declaration order)."""
    by_name = {r.name: r for r in results}
    lines = [
        "# Reliability",
        "",
        "Produced by the test suite (`tests/faults/`, rendered by `python -m tests.faults.report` from",
        "`test-artifacts/reliability.json`). Every scenario ends by checking: " + VERIFIES + ".",
        "",
        "Faults injected: what reached the runtime (failed or slow commands its client saw, model errors",
        "served, processes killed). Events lost: AG2 events the in-process runs produced that are not in the",
        "log (for the killed serve process: its WebSocket client's view against the log). Duplicated: AG2",
        "event uuids recorded more than once. SecantusDB 0.7.0b3 supports every fail point used here",
        "(`closeConnection`, `errorCode` + `errorLabels`, `writeConcernError`, `blockConnection`, `appName`).",
        "",
        "| scenario | faults injected | events checked | runs | lost | duplicated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in SCENARIOS:
        r = by_name.get(name)
        if r is None:
            lines.append(f"| {name} | not run | | | | |")
        else:
            lines.append(
                f"| {name} | {r.faults_injected} | {r.events_checked} | {r.runs} | {r.events_lost} | {r.events_duplicated} |"
            )
    lines.append("")
    for name, scenario in SCENARIOS.items():
        lines += [f"## {name}", "", f"- Injects: {scenario.injects}.", f"- Expects: {scenario.expects}."]
        r = by_name.get(name)
        if r is not None and r.detail:
            lines.append("- Measured: " + ", ".join(f"{k} {v}" for k, v in sorted(r.detail.items())) + ".")
        lines.append("")
    return "\n".join(lines)


def scenario_names(markdown: str) -> list[str]:
    """The scenario headings of a RELIABILITY.md."""
    return [line[3:].strip() for line in markdown.splitlines() if line.startswith("## ")]


def main() -> int:
    produced = ARTIFACTS / "RELIABILITY.md"
    if not produced.exists():
        print(
            "no test-artifacts/RELIABILITY.md: run the fault tests first (pytest tests/faults)",
            file=sys.stderr,
        )
        return 2
    data = json.loads((ARTIFACTS / "reliability.json").read_text())
    missing = [name for name in SCENARIOS if name not in {d["name"] for d in data}]
    if missing:
        print(f"scenarios not run in the last session: {missing}", file=sys.stderr)
        return 2
    shutil.copyfile(produced, COMMITTED)
    print(f"wrote {COMMITTED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
