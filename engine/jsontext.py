"""Checks on JSON text that must run before a decoder sees it, and on what PostgreSQL can store.

msgspec decodes and encodes recursively: a body nested about a thousand levels deep raised
RecursionError, and a string that is not UTF-8 raised UnicodeDecodeError, both outside the
errors it reports as malformed JSON (the API answered 500). These checks are linear in the
size of the text and refuse such input with a message that says what is wrong.
"""

from __future__ import annotations

import re
from typing import Any

# A string literal, escapes included (linear: no nested repetition that can backtrack).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = frozenset(b"[{")

_BOMS = (
    (b"\xef\xbb\xbf", "UTF-8"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\xfe\xff", "UTF-16"),
    (b"\xff\xfe", "UTF-16"),
)


def nested_deeper_than(text: bytes, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (brackets inside strings do
    not count). A text with no more than `limit` opening brackets is not read further."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return False
    level = 0
    for byte in _STRING.sub(b"", text).translate(None, _NOT_BRACKETS):
        if byte in _OPEN:
            level += 1
            if level > limit:
                return True
        else:
            level -= 1
    return False


def not_utf8(text: bytes) -> str | None:
    """Why `text` is not a JSON text's encoding (UTF-8 without a byte order mark, RFC 8259),
    or None."""
    for bom, name in _BOMS:
        if text.startswith(bom):
            return f"the body starts with a {name} byte order mark: JSON must be UTF-8, without one"
    head = text[:4]
    if len(head) == 4 and (head[:3] == b"\0\0\0" or head[1:] == b"\0\0\0"):
        return "the body looks like UTF-32: JSON must be UTF-8"
    if len(head) >= 2 and 0 in head[:2]:  # JSON starts with an ASCII character
        return "the body looks like UTF-16: JSON must be UTF-8"
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = text[exc.start : exc.end]
        return f"the body is not UTF-8: byte {exc.start} ({bad.hex(' ')}) {exc.reason}"
    return None


def nul_at(value: Any, path: str) -> str | None:
    """The path of the first string or key holding a NUL character (`payload.note`,
    `payload.items[2]`), which PostgreSQL cannot store in text or jsonb; else None."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return where
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str) and "\x00" in key:
                    return f"{where} (a key)"
                stack.append((inner, f"{where}.{key}"))
        elif isinstance(item, list | tuple):
            stack.extend((inner, f"{where}[{i}]") for i, inner in enumerate(item))
    return None
