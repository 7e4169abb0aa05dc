"""Static checks the style guide asks for, and decoder fuzzing: bad input never crashes a decoder."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from app.http.transport import _decode_client
from domain.errors import CorruptRecord
from domain.events import to_record

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ruff_is_clean() -> None:
    result = subprocess.run([BIN / "ruff", "check", "app", "domain", "projections", "tools", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_ruff_format_is_clean() -> None:
    result = subprocess.run(
        [BIN / "ruff", "format", "--check", "app", "domain", "projections", "tools", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_mypy_strict_is_clean_on_domain_projections_and_app() -> None:
    result = subprocess.run([BIN / "mypy", "domain", "projections", "app"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# The layers of app/, lowest first: a module imports only from its own layer or lower ones.
# Infrastructure modules sit at the top of app/ (settings, logging, observability, tasks, embedded,
# database, hub); then runs/ (workflows, orchestration on AG2, the supervisor); then http/; then cli/.
APP_LAYERS = ("app", "app.runs", "app.http", "app.cli")


def _app_imports() -> dict[str, set[str]]:
    imports: dict[str, set[str]] = {}
    for path in (ROOT / "app").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):  # type-only and function-local imports too
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        imports[module] = found
    return {module: {name for name in found if name in imports and name != module} for module, found in imports.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    package = ".".join(parts[:2]) if len(parts) > 2 or module in APP_LAYERS else "app"
    return APP_LAYERS.index(package) if package in APP_LAYERS else 0


def test_app_imports_point_down_and_never_in_a_circle() -> None:
    graph = _app_imports()
    upward = [(m, d) for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, f"imports pointing up a layer: {upward}"
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join((*path[path.index(module):], module))}")
        if module in done:
            return
        for dependency in sorted(graph[module]):
            visit(dependency, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
    assert not any(name.startswith("app.orchestration") for name in graph), "bare.py and friends moved"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["user.message", "input.response", "chat.stop", "pong", "x"])},
    optional={"text": json_values, "request_id": json_values, "extra": json_values},
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), json_values.map(msgspec.json.encode), frame_like.map(msgspec.json.encode)))
def test_client_frame_decoder_only_ever_rejects_cleanly(raw: bytes) -> None:
    try:
        _decode_client(raw)
    except msgspec.DecodeError:
        pass


record_like = st.fixed_dictionaries(
    {
        "_id": st.text(max_size=5),
        "chat_id": st.text(max_size=5),
        "seq": json_values,
        "type": st.sampled_from(["message.agent", "tool.called", "llm.call", "nope"]),
        "data": json_values,
    },
    optional={"ts": json_values, "visible": json_values, "agent": json_values},
)


@settings(max_examples=300, deadline=None)
@given(record_like)
def test_stored_record_decoder_names_chat_and_seq_for_anything_malformed(doc: dict[str, object]) -> None:
    try:
        to_record(doc)
    except CorruptRecord as exc:
        assert f"chat {doc['chat_id']}" in str(exc)
