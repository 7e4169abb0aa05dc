"""Static checks the style guide asks for, and decoder fuzzing: bad input never crashes a decoder."""

from __future__ import annotations

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


def test_mypy_strict_is_clean_on_domain_and_projections() -> None:
    result = subprocess.run([BIN / "mypy", "domain", "projections"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


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
