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


def load(text: str) -> dict[str, Query]:
    matches = list(_HEADER.finditer(text))
    queries: dict[str, Query] = {}
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        doc = " ".join(line.removeprefix("--").strip() for line in match.group(2).splitlines())
        sql = text[match.end() : end].strip().removesuffix(";")
        queries[match.group(1)] = Query(match.group(1), doc, sql)
    return queries


QUERIES = load(SOURCE.read_text())
SQL: dict[str, str] = {name: q.sql for name, q in QUERIES.items()}
CLAIM = SQL["task_claim_due"]
