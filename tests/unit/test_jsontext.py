"""engine/jsontext.py against reference answers, and the payload checks built on it."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasklease.engine.jsontext import nested_deeper_than, not_utf8, nul_at
from tasklease.engine.tasks import MAX_PAYLOAD_DEPTH, MalformedTask, TaskSpec, storable

# Strings full of what the scanner must not count: brackets, quotes, backslashes.
tricky = st.text(alphabet='[]{}"\\ab\u00e9\u4e16', max_size=8)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky, inner, max_size=3),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@settings(derandomize=True, max_examples=300, deadline=None)
@given(value=values, wrap=st.integers(0, 70), ascii_only=st.booleans())
def test_nesting_is_measured_outside_strings(value: Any, wrap: int, ascii_only: bool) -> None:
    for _ in range(wrap):
        value = [value] if wrap % 2 else {"k[": value}
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    deep = depth(value)
    for limit in (max(deep - 1, 0), deep, 64):
        assert nested_deeper_than(text, limit) is (deep > limit), (text[:200], limit)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(raw=st.binary(max_size=40))
def test_utf8_is_judged_as_python_decodes_it(raw: bytes) -> None:
    text = b'{"a": "' + raw + b'"}'
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        assert not_utf8(text) is not None
    else:
        assert not_utf8(text) is None


@pytest.mark.parametrize(
    ("encoding", "named"),
    [
        ("utf-16", "UTF-16 byte order mark"),
        ("utf-16-le", "looks like UTF-16"),
        ("utf-32-be", "looks like UTF-32"),
        ("utf-8-sig", "UTF-8 byte order mark"),
        ("latin-1", "not UTF-8: byte 8 (e9)"),
    ],
)
def test_other_encodings_are_named(encoding: str, named: str) -> None:
    problem = not_utf8('{"t": "h\u00e9"}'.encode(encoding))
    assert problem is not None and named in problem, problem


def test_nul_is_found_in_keys_strings_and_lists() -> None:
    assert nul_at({"a": [1, {"b": "x\x00"}]}, "payload") == "payload.a[1].b"
    assert nul_at({"a\x00": 1}, "payload") == "payload (a key)"
    assert nul_at({"a": "\\u0000"}, "payload") is None  # a backslash and "u0000"


class Note(msgspec.Struct):
    text: str


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"note": "a\x00b"}, "payload.note"),
        ({"items": ["ok", Note("\x00")]}, "payload.items[1].text"),
        ({"bad\x00key": 1}, "payload"),
        ({"s": "\ud800"}, "payload"),  # a lone surrogate, from Python
    ],
)
def test_payloads_postgresql_cannot_store_are_refused(payload: Any, field: str) -> None:
    with pytest.raises(MalformedTask) as refused:
        storable(TaskSpec(payload=payload))
    assert refused.value.field == field


def test_nesting_is_bounded_for_python_callers_too() -> None:
    payload: dict[str, Any] = {}
    inner = payload
    for _ in range(MAX_PAYLOAD_DEPTH - 1):
        inner["a"] = inner = {}
    storable(TaskSpec(payload=payload))  # 64 levels: taken
    inner["a"] = {}
    with pytest.raises(MalformedTask, match="nests more than 64"):
        storable(TaskSpec(payload=payload))
    for _ in range(3000):  # deeper than msgspec's encoder recurses
        inner["a"] = inner = {}
    with pytest.raises(MalformedTask, match="nests more than 64"):
        storable(TaskSpec(payload=payload))


def test_a_nul_in_queue_or_key_is_named() -> None:
    with pytest.raises(MalformedTask, match="at queue"):
        storable(TaskSpec(payload={}, queue="a\x00"))
    with pytest.raises(MalformedTask, match=r"at tasks\[3\]\.idempotency_key"):
        storable(TaskSpec(payload={}, idempotency_key="\x00"), "tasks[3]: ", "tasks[3].")
