"""Loads engine/queries.sql into `QUERIES`: name -> SQL. Runtime code runs queries by name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("queries.sql")
_HEADER = re.compile(r"^-- name: (\w+)\n((?:--.*\n)*)", re.MULTILINE)


@dataclass(frozen=True)
class Query:
    name: str
    doc: str
    sql: str


# A statement written in two variants: a line ending in `--+ keyed` is only in NAME_keyed, one
# ending in `--+ plain` only in NAME; the lines from `--+ keyed {` to `--+ }` only in NAME_keyed.
_ONLY = re.compile(r"\s*--\+ (keyed|plain)$")
_BLOCK_START, _BLOCK_END = "--+ keyed {", "--+ }"


def variant(sql: str, which: str) -> str:
    """`sql` as the variant `which` ('plain' or 'keyed') has it, without the markers."""
    lines, inside = [], False
    for line in sql.splitlines():
        if line.strip() in (_BLOCK_START, _BLOCK_END):
            inside = line.strip() == _BLOCK_START
            continue
        only = _ONLY.search(line)
        if (inside and which != "keyed") or (only and only.group(1) != which):
            continue
        lines.append(line[: only.start()] if only else line)
    return "\n".join(lines)


def load(text: str) -> dict[str, Query]:
    matches = list(_HEADER.finditer(text))
    queries: dict[str, Query] = {}
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        doc = " ".join(line.removeprefix("--").strip() for line in match.group(2).splitlines())
        sql = text[match.end() : end].strip().removesuffix(";")
        name = match.group(1)
        if "--+ " in sql:
            queries[name] = Query(name, doc, variant(sql, "plain"))
            queries[f"{name}_keyed"] = Query(f"{name}_keyed", doc, variant(sql, "keyed"))
        else:
            queries[name] = Query(name, doc, sql)
    return queries


QUERIES = load(SOURCE.read_text())
SQL: dict[str, str] = {name: q.sql for name, q in QUERIES.items()}
# The claim, without per-key limits (it steps over the actions that have one and says
# 'keyed'), and with them (it says 'plain' when none of its actions has one): see Store.claim.
CLAIM = SQL["task_claim_due"]
CLAIM_KEYED = SQL["task_claim_due_keyed"]
