"""The REST contract: request and response structs, separate from table rows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from tasklease.engine.tasks import OnFailure, Task, TaskSpec, Transition

MAX_BATCH = 10_000


class TaskCreate(TaskSpec):
    """A task to run. `action` defaults to `payload.action`; `due_at` defaults to now."""


class TaskBatchCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Tasks submitted together: all are written, or none. A batch whose tasks wait for one
    another (`ref`, `depends_on`) or that has an `on_finish` task is a workflow
    (docs/workflows.md): `on_failure` is its default failure policy, `on_finish` a task that
    runs once when every task of the batch has finished."""

    tasks: Annotated[list[TaskCreate], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]
    on_failure: OnFailure | None = None
    on_finish: TaskCreate | None = None


def stored_json(value: str) -> Any:
    """A jsonb column's text, sent as it is (msgspec.Raw): never decoded, so whatever the
    database holds (nesting deeper than a decoder goes, numbers beyond float) is shown
    exactly, and a large payload costs no decoding."""
    return msgspec.Raw(value)


class TaskRead(Task):
    """A task, as stored."""

    @staticmethod
    def _json_column(value: Any) -> Any:
        return stored_json(value)


class TaskBatchRead(msgspec.Struct):
    tasks: list[TaskRead]
    workflow_id: int | None = None  # set when the batch made a workflow
    on_finish: TaskRead | None = None


class EdgeRead(msgspec.Struct, kw_only=True):
    """task_id waits for depends_on; `satisfied`: it no longer holds task_id back."""

    task_id: int
    depends_on: int
    on_failure: str
    satisfied: bool


class WorkflowRead(msgspec.Struct, kw_only=True):
    """A workflow: every member with its state, the edges among them, counts by state, and
    whether every member has finished (COMPLETED, DEAD or CANCELLED)."""

    id: int
    created_at: datetime
    on_finish: int | None
    finished: bool
    states: dict[str, int]
    tasks: list[TaskRead]
    edges: list[EdgeRead]


class TaskPage(msgspec.Struct):
    """Newest first. Pass `next_cursor` as `cursor` for the next page; null on the last."""

    tasks: list[TaskRead]
    next_cursor: str | None


class TransitionRead(Transition):
    """One transition of a task's history."""


class ScheduleRead(msgspec.Struct, kw_only=True):
    """A periodic task as the workers declare it, and when it runs next."""

    name: str
    action: str
    cron: str | None
    every_seconds: float | None
    timezone: str
    payload: dict[str, Any]
    queue: str
    priority: int
    missed: str
    next_run_at: datetime
    last_slot_at: datetime | None
    last_task_id: int | None
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> ScheduleRead:
        fields = {f: row[f] for f in cls.__struct_fields__ if f != "payload"}
        return cls(**fields, payload=stored_json(row["payload"]))


class LimitWrite(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A global limit's new value: at most `value` tasks RUNNING at once (queue:, action:),
    or `value` starts per `per_seconds` (rate:), or at most `value` (up to 1000) tasks of the
    action RUNNING at once per value of the payload field `by` (key:; `by` may be left out
    when the limit has one already)."""

    value: Annotated[int, msgspec.Meta(ge=0, le=100_000)]
    per_seconds: Annotated[float, msgspec.Meta(gt=0, le=366 * 86400)] | None = None
    by: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class LimitRead(msgspec.Struct, kw_only=True):
    """A global limit, the same for every worker. `declared`: written by a worker from its
    code (false: set by an operator, which declarations leave alone). `used`: tokens held
    now (running tasks; for a rate, starts within the last period). A per-key limit (key:)
    has `by`, the payload field it is kept per value of, and `keys`: how many values of it
    have a task running."""

    key: str
    value: int
    per_seconds: float | None
    declared: bool
    used: int
    updated_at: datetime
    by: str | None = None
    keys: int | None = None

    @classmethod
    def from_row(cls, row: Any) -> LimitRead:
        return cls(**{f: row[f] for f in cls.__struct_fields__})


class QueueStats(msgspec.Struct):
    states: dict[str, int]
    due: int
    oldest_due_seconds: float | None
    paused_at: datetime | None = None  # paused since (tasklease pause): claims start nothing


class QueueState(msgspec.Struct, kw_only=True):
    """Whether a queue is paused: claims in a paused queue start nothing (submissions are
    still accepted; running tasks finish)."""

    queue: str
    paused: bool
    paused_at: datetime | None


class WorkerStats(msgspec.Struct):
    alive: int
    running: int


class Stats(msgspec.Struct):
    """Counts by state (every state present), per queue, and the age of the oldest due task."""

    states: dict[str, int]
    queues: dict[str, QueueStats]
    oldest_due_seconds: float | None
    workers: WorkerStats


class Health(msgspec.Struct):
    status: str


class Ready(msgspec.Struct):
    status: str
    schema: str | None = None
    detail: str | None = None


class ErrorBody(msgspec.Struct):
    """Every error response has this shape."""

    status_code: int
    detail: str
    extra: Any = None
