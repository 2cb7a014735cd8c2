"""limit shards: round(N / 128) of them, no longer N / 128 rounded down

A limit of 192 to 255 was one shard, so every claimer of it took turns on one lock; it is
now two shards of 96 to 127. Up to 16 shards, each holds 96 to 191 (was 128 to 255), more than
a worker's usual refill. Measured with bench/near_limit.py (docs/benchmarks.md).

The function is 0004's with that one line changed, taken from 0004's own text so that the
two cannot drift apart. The shard count is part of each bound's key (limit_bounds), so
bounds of the old layout are simply no longer read.

Revision ID: 0005
Revises: 0004
"""

import importlib

from tasklease.schema.migrations import run_sql, statements

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PREVIOUS = importlib.import_module("tasklease.schema.migrations.versions.0004_limit_shards")
_FUNCTION = next(s for s in statements(_PREVIOUS.UP) if "CREATE FUNCTION tasklease_claim" in s)
_FLOOR = "v_shards := greatest(least(k.lim / 128, 16), 1);"
_ROUND = "v_shards := greatest(least((k.lim + 64) / 128, 16), 1);"
assert _FUNCTION.count(_FLOOR) == 1, "0004's shard count is not where 0005 expects it"

UP = _FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1).replace(_FLOOR, _ROUND)
DOWN = _FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
