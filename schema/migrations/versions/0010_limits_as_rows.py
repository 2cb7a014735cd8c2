"""global limits as rows: one value per limit in the database, enforced by tokens

Until now each worker passed the limits its code declared into every claim, and a PL/pgSQL
function (0003-0006) split each limit into shards under advisory locks, kept bounds per
shard, and had rules for values that changed or that workers disagreed on. Now:

- `limits` holds one value per limit, the same for every worker: `queue:NAME` (tasks of the
  queue RUNNING at once), `action:NAME` (tasks of the action RUNNING at once), `rate:NAME`
  (starts of the action per `per_seconds`). Workers write the values their code declares
  at start-up (`declared`); `tasklease limits set` writes an operator's value, which
  declarations then leave alone until `tasklease limits unset`.
- `limit_tokens` holds `value` tokens per limit, numbered 1..value. The claim takes a free
  token numbered at most the limit's value for each limit a task starts under, with
  `FOR UPDATE SKIP LOCKED`, in the claim statement itself. A concurrency token records the
  task holding it (`task_id`; the task records the token's number in `queue_token` or
  `action_token`) and is freed by every statement that moves a task out of RUNNING; a rate
  token records when it may be taken again (`free_at`, its start plus the period), so a
  rate limit is a sliding window with no rows to count or delete.

A token is a row lock and a row version, so what one claim takes, a concurrent claim skips,
and a claim that locks a token after another freed or took it re-reads it: no count, no
snapshot taken after a lock, no advisory lock, no function. Lowering a limit leaves tokens
above the new value to their tasks; they are never taken again (`tasklease limits set`
deletes them once free).

Upgrading: tasks RUNNING under a limit when this runs hold no token, and are not counted
until they finish; restart every worker after `tasklease migrate` (the workers of before
pass their own limits to a function that no longer exists).

Revision ID: 0010
Revises: 0009
"""

import importlib

from tasklease.schema.migrations import run_sql, statements

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UP = """
DROP FUNCTION tasklease_claim_slots(text, integer, text[], integer[], integer[], float8[],
                                    integer);
DROP FUNCTION tasklease_claim_capacity(text, integer, text[], integer[], integer[], float8[]);
DROP TABLE limit_bounds;
DROP TABLE action_starts;
ALTER TABLE tasks DROP COLUMN action_slot, DROP COLUMN queue_slot;

-- One row per global limit, the same for every worker (docs/scheduling.md).
CREATE TABLE limits (
    key         text        PRIMARY KEY CHECK (key ~ '^(queue|action|rate):.'),
    value       integer     NOT NULL CHECK (value BETWEEN 0 AND 100000),
    per_seconds float8      CHECK (per_seconds > 0 AND per_seconds <= 366 * 86400),
    -- true: written by a worker from its code (@handler, --queue-limit); false: by an
    -- operator (tasklease limits set), which the workers' declarations leave alone
    declared    boolean     NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((key LIKE 'rate:%') = (per_seconds IS NOT NULL))
);

-- A limit's tokens, numbered 1..value. Free: task_id IS NULL and free_at <= now().
-- Taking and giving one back changes only task_id or free_at, which no index holds for a
-- concurrency limit's tokens: those updates are HOT (the row's new version goes in the same
-- page, no index changes, the old one is pruned there), so a few hundred tokens churned by
-- thousands of tasks a second stay a few pages. Hence the room left in each page.
CREATE TABLE limit_tokens (
    key     text        NOT NULL REFERENCES limits ON DELETE CASCADE,
    n       integer     NOT NULL,
    task_id bigint,     -- a concurrency token: the RUNNING task that holds it
    -- a rate token: when it may be taken again (its last start plus the period)
    free_at timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (key, n)
) WITH (fillfactor = 50);
-- a rate's tokens by when they come free, oldest first
CREATE INDEX limit_tokens_rate ON limit_tokens (key, free_at) WHERE key LIKE 'rate:%';
-- the numbers of the concurrency tokens a RUNNING task holds (its queue's and its action's
-- limits), given back through the primary key when it leaves RUNNING
ALTER TABLE tasks ADD COLUMN queue_token integer, ADD COLUMN action_token integer;
"""

DROP_NEW = """
ALTER TABLE tasks DROP COLUMN queue_token, DROP COLUMN action_token;
DROP TABLE limit_tokens;
DROP TABLE limits;
"""


def _previous(name: str) -> str:
    return str(importlib.import_module(f"tasklease.schema.migrations.versions.{name}").UP)


def downgrade_sql() -> str:
    """The machinery of 0003-0006 as 0009 had it: action_starts and the capacity function
    from 0003, then 0004's shards, 0005's rounding and 0006's function as they were."""
    of_0003 = [
        s
        for s in statements(_previous("0003_scheduling"))
        if "action_starts" in s or "tasklease_claim_capacity" in s
    ]
    return ";\n".join(
        [DROP_NEW.strip().removesuffix(";"), *of_0003]
        + [
            _previous(name)
            for name in ("0004_limit_shards", "0005_limit_shards_rounded", "0006_limit_redivided")
        ]
    )


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(downgrade_sql())
