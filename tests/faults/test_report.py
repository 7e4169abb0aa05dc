"""The committed RELIABILITY.md is the one the fault tests produced, and covers every scenario they run."""

from __future__ import annotations

from pathlib import Path

from tests.faults.report import COMMITTED, SCENARIOS, scenario_names


def test_committed_reliability_md_matches_the_fault_tests() -> None:
    committed = COMMITTED.read_text()
    assert scenario_names(committed) == list(SCENARIOS)
    sources = "".join(
        p.read_text() for p in Path(__file__).parent.glob("test_*.py") if p.name != Path(__file__).name
    )
    unused = [name for name in SCENARIOS if f'"{name}"' not in sources]
    assert unused == [], f"declared scenarios no test reports: {unused}"
    rows = [
        line for line in committed.splitlines() if line.startswith("| ") and not line.startswith("| scenario")
    ]
    assert [row.split(" | ")[0][2:] for row in rows] == list(SCENARIOS)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert "not run" not in cells, row
        faults, events, runs, lost, duplicated = (int(cell) for cell in cells[1:])
        assert faults >= 1 and events > 0 and runs >= 2, row
        assert lost == 0 and duplicated == 0, row
