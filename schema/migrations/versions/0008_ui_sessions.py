"""dashboard sessions kept server-side, so that logging out revokes the cookie

Revision ID: 0008
Revises: 0007
"""

from tasklease.schema.migrations import run_sql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UP = """
-- One row per dashboard login (api/ui.py). The cookie carries the id and a MAC keyed by the
-- API token; a page is served only while the row exists and has not expired. Logging out
-- deletes it, so a copied cookie is worthless afterwards, on every API replica.
CREATE TABLE ui_sessions (
    id         text        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
"""

DOWN = """
DROP TABLE ui_sessions;
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
