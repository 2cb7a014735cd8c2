"""Alembic migrations. Each revision is plain SQL run through `run_sql`."""

import re

from alembic import op

_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)


def run_sql(script: str) -> None:
    """Run a script of `;`-terminated statements (asyncpg prepares one statement at a time)."""
    for statement in _STATEMENT_END.split(script):
        if statement.strip():
            op.execute(statement)
