"""Start-up time: `mozaiks --help`, and `mozaiks serve` on the embedded default until /health/ready.

Each figure is the median of `--rounds` runs, beside the baseline of the same run: `python -c pass`
on the same interpreter (the machine's noise moves both). `serve` runs on one data folder: the first
start creates it and is not counted, the others are the warm second start a user sees.

    .venv/bin/python tests/benchmarks/bench_start.py [--rounds 5] [--against ../other-checkout]

`--against` times another checkout of the runtime too (its code on PYTHONPATH), interleaved with
this one: on a busy machine the only fair comparison.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.embedded import free_port

MOZAIKS = Path(sys.executable).parent / "mozaiks"


def environment(data_dir: Path) -> dict[str, str]:
    """The user's environment without any runtime settings: the embedded default, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DATABASE_URI", "MOZAIKS_"))}
    env["MOZAIKS_DATA_DIR"] = str(data_dir)
    return env


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def serve_until_ready(env: dict[str, str], within_s: float = 60) -> float:
    """Seconds from starting `mozaiks serve` to its first 200 on /health/ready; then stops it."""
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(MOZAIKS), "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - started < within_s:
            if process.poll() is not None:
                raise SystemExit(f"mozaiks serve exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)
        raise SystemExit(f"mozaiks serve not ready within {within_s} s")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def measure(env: dict[str, str], runs: dict[str, list[float]]) -> None:
    """One round: the baseline, `mozaiks --help` and a warm `mozaiks serve` start."""
    runs["python -c pass"].append(timed([sys.executable, "-c", "pass"], env))
    runs["mozaiks --help"].append(timed([str(MOZAIKS), "--help"], env))
    runs["mozaiks serve → ready"].append(serve_until_ready(env))


def report(title: str, runs: dict[str, list[float]]) -> None:
    base = statistics.median(runs["python -c pass"])
    print(f"{title}\n  python -c pass          {base * 1000:7.0f} ms  (baseline)")
    for name, goal in (("mozaiks --help", 0.5), ("mozaiks serve → ready", 3.0)):
        median = statistics.median(runs[name])
        verdict = "met" if median <= goal else "NOT met"
        print(
            f"  {name:22s}  {median * 1000:7.0f} ms  ({median / base:5.1f}× baseline; min "
            f"{min(runs[name]) * 1000:.0f}, max {max(runs[name]) * 1000:.0f}; goal ≤ {goal} s {verdict})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", type=Path, help="another checkout to time the same way")
    args = parser.parse_args()
    sources = {
        "this checkout": ROOT,
        **({f"against {args.against}": args.against.resolve()} if args.against else {}),
    }
    results: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in sources}
    with tempfile.TemporaryDirectory() as folder:
        envs = {}
        for number, (name, source) in enumerate(sources.items()):
            env = environment(Path(folder) / f"data-{number}")
            env["PYTHONPATH"] = str(source)
            serve_until_ready(env)  # creates the data folder: the cold first start, not counted
            envs[name] = env
        for _ in range(args.rounds):  # interleaved, so a busy spell of the machine touches every figure
            for name, env in envs.items():
                measure(env, results[name])
    for name, runs in results.items():
        report(name, runs)
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, app.cli as c; c.main(['--help'], standalone_mode=False); "
         "print('autogen' in sys.modules)"],
        env=envs["this checkout"], cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()[-1]  # fmt: skip
    print(f"`mozaiks --help` imports AG2: {imported}")


if __name__ == "__main__":
    main()
