"""Running a `mozaiks` command group in the test process, as a finished process would report it."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import click
from click.testing import CliRunner


def invoke(group: click.Group, *args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`group ARGS` with `env` set, on a worker thread (the command runs its own event loop there).

    The calling thread waits, as for a child process, so a caller's event loop does nothing meanwhile.
    Returns the exit code, stdout and stderr; an uncaught exception is raised, never an exit code 1.
    """
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(
            CliRunner().invoke, group, list(args), env=dict(env), catch_exceptions=False
        ).result()
    return subprocess.CompletedProcess(
        [str(group.name), *args], result.exit_code, result.stdout, result.stderr
    )
