"""Alembic migrations. Each revision is plain SQL run through `run_sql`."""

import re

from alembic import op

_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)
_FUNCTION_BODY = re.compile(r"(\$fn\$.*?\$fn\$)", re.DOTALL)


def statements(script: str) -> list[str]:
    """`;`-terminated statements; a function body quoted with $fn$ … $fn$ stays whole."""
    result, current = [], ""
    for i, part in enumerate(_FUNCTION_BODY.split(script)):
        if i % 2:  # a function body
            current += part
            continue
        first, *rest = _STATEMENT_END.split(part)
        pieces = [current + first, *rest]
        result += pieces[:-1]
        current = pieces[-1]
    result.append(current)
    return [s for s in result if s.strip()]


def run_sql(script: str) -> None:
    """Run a script statement by statement (asyncpg prepares one statement at a time)."""
    for statement in statements(script):
        op.execute(statement)
