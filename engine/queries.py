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
        name = match.group(1)
        queries[name] = Query(name, doc, sql)
    return queries


QUERIES = load(SOURCE.read_text())
SQL: dict[str, str] = {name: q.sql for name, q in QUERIES.items()}
# The claim where no limit applies (it says 'limited' where one does), and the claim with the
# limits joined in (it says 'plain' where none does any more): see Store.claim.
CLAIM = SQL["task_claim_due"]
CLAIM_LIMITED = SQL["task_claim_due_limited"]
