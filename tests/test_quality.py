"""Static checks the style guide asks for, and decoder fuzzing: bad input is refused cleanly, good input decodes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.http.transport import _decode_client
from domain.errors import CorruptRecord
from domain.events import (
    GENESIS_HASH,
    MessageAgent,
    Pending,
    Record,
    StreamRef,
    now,
    seal,
    to_document,
    to_record,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [BIN / "ruff", "check", "app", "domain", "projections", "tools", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
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
    result = subprocess.run(
        [BIN / "mypy", "domain", "projections", "app"], cwd=ROOT, capture_output=True, text=True
    )
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
    return {
        module: {name for name in found if name in imports and name != module}
        for module, found in imports.items()
    }


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
            raise AssertionError(f"import cycle: {' -> '.join((*path[path.index(module) :], module))}")
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
    {"type": st.sampled_from(["user.message", "input.response", "ui.response", "chat.stop", "pong", "x"])},
    optional={
        "text": json_values | st.text(max_size=8),
        "request_id": json_values | st.text(max_size=8),
        "answer": json_values,
        "extra": json_values,
    },
)

# What each client frame may carry: field -> (allowed JSON types, required).
CLIENT_FRAMES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "user.message": {"text": ((str,), True)},
    "input.response": {"text": ((str,), True), "request_id": ((str, type(None)), False)},
    "ui.response": {"request_id": ((str,), True), "answer": ((object,), False)},
    "chat.stop": {},
    "pong": {},
}


def well_formed_frame(raw: bytes) -> bool:
    """An independent reading of the client-frame contract: JSON object, known type, exact fields."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(value, dict) or value.get("type") not in CLIENT_FRAMES:
        return False
    fields = CLIENT_FRAMES[value["type"]]
    body = {k: v for k, v in value.items() if k != "type"}
    return set(body) <= set(fields) and all(
        (name in body and isinstance(body[name], kinds)) or (name not in body and not required)
        for name, (kinds, required) in fields.items()
    )


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64), json_values.map(msgspec.json.encode), frame_like.map(msgspec.json.encode)
    )
)
def test_client_frame_decoder_accepts_exactly_the_well_formed_frames(raw: bytes) -> None:
    if well_formed_frame(raw):
        decoded = msgspec.to_builtins(_decode_client(raw))
        sent = json.loads(raw)
        assert decoded["type"] == sent["type"] and all(decoded[k] == v for k, v in sent.items())
    else:
        with pytest.raises(msgspec.DecodeError):
            _decode_client(raw)


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
def test_stored_record_decoder_refuses_anything_malformed_naming_chat_and_seq(doc: dict[str, object]) -> None:
    # None of these has the whole envelope (app_id, hash, ...): every one is refused, cleanly.
    with pytest.raises(CorruptRecord) as refused:
        to_record(doc)
    assert f"chat {doc['chat_id']}, seq {doc['seq']}:" in str(refused.value)


REQUIRED_ENVELOPE = sorted(set(Record.__struct_fields__) - {"ag2", "v"} - {"id"} | {"_id"})
wrong_values = st.sampled_from([None, 7, "7", [], {}, True, 1.5])


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(max_size=30),
    seq=st.integers(min_value=1, max_value=2**40),
    field=st.sampled_from([*REQUIRED_ENVELOPE, "data.content", "type"]),
    change=st.sampled_from(["drop", "retype"]),
    value=wrong_values,
)
def test_a_sealed_record_decodes_and_any_broken_field_of_it_is_refused(
    text: str, seq: int, field: str, change: str, value: object
) -> None:
    ref = StreamRef(chat_id="c", app_id="a", user_id="u", workflow="W")
    doc = seal(ref, Pending(event=MessageAgent(content=text), agent="A"), seq, GENESIS_HASH, now())
    record = to_record(doc)
    assert (record.seq, record.event) == (seq, MessageAgent(content=text)) and to_document(record) == doc
    target, key = (doc["data"], "content") if field == "data.content" else (doc, field)
    allowed = (str, type(None)) if key in ("run_id", "agent") else (type(target[key]),)
    if change == "drop":
        del target[key]
    elif field == "type":
        target[key] = "message.nope" if value is None else value
    elif type(value) in allowed:
        return  # not a wrong value for this field
    else:
        target[key] = value
    with pytest.raises(CorruptRecord) as refused:
        to_record(doc)
    assert f"chat {doc.get('chat_id', '?')}, seq {doc.get('seq', '?')}:" in str(refused.value)
