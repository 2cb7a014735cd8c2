"""The REST contract: request and response structs, separate from table rows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from engine.states import TaskState

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Seconds = Annotated[
    float,
    msgspec.Meta(gt=0, le=7 * 86400, description="seconds; null: the action's own setting"),
]
AwareDatetime = Annotated[
    datetime, msgspec.Meta(tz=True, description="RFC 3339 with a time zone offset")
]
MAX_BATCH = 10_000


class TaskCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A task to run. `action` defaults to `payload.action`; `due_at` defaults to now."""

    payload: dict[str, Any]
    action: Text | None = None
    due_at: AwareDatetime | None = None
    idempotency_key: Text | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    queue: Text = "default"
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0
    lease_seconds: Seconds | None = None
    timeout_seconds: Seconds | None = None


class TaskBatchCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Tasks submitted together: all are written, or none."""

    tasks: Annotated[list[TaskCreate], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class TaskRead(msgspec.Struct, kw_only=True):
    id: int
    action: str
    payload: dict[str, Any]
    state: TaskState
    attempt: int
    max_attempts: int
    due_at: datetime
    created_at: datetime
    updated_at: datetime
    queue: str
    priority: int
    result: Any
    last_error: str | None
    idempotency_key: str | None
    lease_expires_at: datetime | None
    worker: str | None
    cancel_requested_at: datetime | None
    lease_seconds: float | None
    timeout_seconds: float | None

    @classmethod
    def from_row(cls, row: Any) -> TaskRead:
        return cls(
            id=row["id"],
            action=row["action"],
            payload=msgspec.json.decode(row["payload"]),
            state=TaskState(row["state"]),
            attempt=row["attempt"],
            max_attempts=row["max_attempts"],
            due_at=row["due_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            queue=row["queue"],
            priority=row["priority"],
            result=None if row["result"] is None else msgspec.json.decode(row["result"]),
            last_error=row["last_error"],
            idempotency_key=row["idempotency_key"],
            lease_expires_at=row["lease_expires_at"],
            worker=row["worker"],
            cancel_requested_at=row["cancel_requested_at"],
            lease_seconds=row["lease_seconds"],
            timeout_seconds=row["timeout_seconds"],
        )


class TaskBatchRead(msgspec.Struct):
    tasks: list[TaskRead]


class TaskPage(msgspec.Struct):
    """Newest first. Pass `next_cursor` as `cursor` for the next page; null on the last."""

    tasks: list[TaskRead]
    next_cursor: str | None


class TransitionRead(msgspec.Struct, kw_only=True):
    trigger: str
    from_state: TaskState | None
    to_state: TaskState
    attempt: int
    worker: str | None
    at: datetime
    detail: str | None


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
        return cls(**fields, payload=msgspec.json.decode(row["payload"]))


class QueueStats(msgspec.Struct):
    states: dict[str, int]
    due: int
    oldest_due_seconds: float | None


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
