"""per-key limits: at most N tasks of an action RUNNING at once per value of a payload field

`@handler("send", limit_by="customer_id", global_limit=5)` declares the limit `key:send`
(value 5, `by` = 'customer_id'): at most 5 tasks of `send` RUNNING at once for each
customer_id, so that one customer's flood cannot take every slot (docs/scheduling.md).

- `limits.by`: the payload field a `key:` limit is kept per value of (NULL for the others).
- `limit_key_tokens`: a `key:` limit's tokens, per value of the field (`sub`), numbered
  1..value, made by the claim the first time a value needs one (so a value that never ran
  has none) and never deleted while their limit stands; `task_id` is the RUNNING task that
  holds one. As for `limit_tokens`, taking and giving back change only `task_id`, which no
  index holds: HOT updates.
- `tasks.limit_key` (the value of the field the task was started under) and
  `tasks.key_token` (the number of the token it holds), written by the claim and read by
  every statement that moves a task out of RUNNING to give the token back.
- `tasks_running_keyed`: the RUNNING tasks of `key:`-limited actions by value, which the
  claim reads to step over values at their cap (only such tasks are in it: the plain drain
  writes nothing more).

Revision ID: 0013
Revises: 0012
"""

from tasklease.schema.migrations import run_sql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UP = """
ALTER TABLE limits ADD COLUMN by text,
    DROP CONSTRAINT limits_key_check,
    ADD CONSTRAINT limits_key_check CHECK (key ~ '^(queue|action|rate|key):.'),
    ADD CONSTRAINT limits_by_check CHECK ((key LIKE 'key:%') = (by IS NOT NULL) AND by <> ''),
    ADD CONSTRAINT limits_key_value_check CHECK (key NOT LIKE 'key:%' OR value <= 1000);

-- A `key:` limit's tokens per value of its payload field (docs/scheduling.md).
CREATE TABLE limit_key_tokens (
    key     text    NOT NULL REFERENCES limits ON DELETE CASCADE,
    sub     text    NOT NULL,
    n       integer NOT NULL,
    task_id bigint,  -- the RUNNING task that holds it
    PRIMARY KEY (key, sub, n)
) WITH (fillfactor = 50);

ALTER TABLE tasks ADD COLUMN limit_key text, ADD COLUMN key_token integer;
CREATE INDEX tasks_running_keyed ON tasks (action, limit_key)
    WHERE state = 'RUNNING' AND limit_key IS NOT NULL;
"""

DOWN = """
DROP INDEX tasks_running_keyed;
ALTER TABLE tasks DROP COLUMN limit_key, DROP COLUMN key_token;
DROP TABLE limit_key_tokens;
DELETE FROM limits WHERE key LIKE 'key:%';
ALTER TABLE limits DROP CONSTRAINT limits_key_value_check, DROP CONSTRAINT limits_by_check,
    DROP CONSTRAINT limits_key_check,
    ADD CONSTRAINT limits_key_check CHECK (key ~ '^(queue|action|rate):.'),
    DROP COLUMN by;
"""


def upgrade() -> None:
    run_sql(UP)


def downgrade() -> None:
    run_sql(DOWN)
