"""A task as its users see it: a submission with its bounds (TaskSpec), a task and a transition
as read (Task, Transition), and `prepare`, which checks a submission against the handlers.

The HTTP API and the Python client share all of it, so both accept and refuse the same input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from tasklease.engine.jsontext import nested_deeper_than, nul_at
from tasklease.engine.registry import Handler
from tasklease.engine.states import TaskState
from tasklease.engine.store import KeyConflict, NewTask

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
# A lease under a second would be renewed more often than a round trip takes on a busy
# database; a week bounds how long a lost worker can hold a task.
LeaseSeconds = Annotated[
    float,
    msgspec.Meta(ge=1, le=7 * 86400, description="seconds, 1 to 604800; null: the action's"),
]
TimeoutSeconds = Annotated[
    float,
    msgspec.Meta(ge=0.1, le=7 * 86400, description="seconds, 0.1 to 604800; null: the action's"),
]
# When a task may be due: a time in the past runs now. The bounds keep every time a task
# holds within what anyone reading it computes with (the dashboard's relative times, clients'
# date types, PostgreSQL versions before 17 that have no infinite interval); a year-1 time
# written by asyncpg is even stored as -infinity. Checked by `prepare` and tasklease_submit().
DUE_FROM = datetime(1970, 1, 1, tzinfo=UTC)
DUE_BEFORE = datetime(2200, 1, 1, tzinfo=UTC)
DUE_RANGE = "from 1970-01-01T00:00:00Z up to (not including) 2200-01-01T00:00:00Z"
DueAt = Annotated[
    datetime,
    msgspec.Meta(
        tz=True,
        description=f"RFC 3339 with a time zone offset, {DUE_RANGE}; a past time runs now",
    ),
]


# How deep a payload's arrays and objects may nest: far more than any payload needs, far less
# than where a recursive decoder (msgspec's, in the API and the workers) runs out of stack.
MAX_PAYLOAD_DEPTH = 64

# The schedulers' keys (`schedule:<name>:<slot>`, engine/schedules.py): a submission may not
# take one, or the schedule would adopt that task as its slot's and never run its action.
RESERVED_KEY_PREFIX = "schedule:"


# What a dependency that ends DEAD or CANCELLED does to the task waiting for it
# (docs/workflows.md): cancel it (cascading), let it run anyway, or hold it WAITING while the
# dependency is DEAD (a requeue that completes lets it go on).
OnFailure = Literal["cancel", "run", "hold"]
TaskId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
MAX_DEPENDENCIES = 10_000


class DependsOn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One dependency with its own failure policy: `task` is a task id, or in a batch the
    `ref` of another task of the batch."""

    task: TaskId | Text
    on_failure: OnFailure | None = None


class TaskSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A task to run. `action` defaults to `payload.action`; `due_at` defaults to now.
    `depends_on`: tasks it waits for (ids, or in a batch other tasks' `ref`s); it is WAITING
    until they complete. `on_failure`: its dependencies' failure policy (docs/workflows.md)."""

    payload: dict[str, Any]
    action: Text | None = None
    due_at: DueAt | None = None
    idempotency_key: Text | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    queue: Text = "default"
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0
    lease_seconds: LeaseSeconds | None = None
    timeout_seconds: TimeoutSeconds | None = None
    ref: Text | None = None
    depends_on: (
        Annotated[list[TaskId | Text | DependsOn], msgspec.Meta(max_length=MAX_DEPENDENCIES)] | None
    ) = None
    on_failure: OnFailure | None = None


def _json(value: Any) -> Any:
    """A jsonb column: text from our own connections; already decoded from a caller's
    connection that has a jsonb codec (psycopg decodes by default)."""
    return msgspec.json.decode(value) if isinstance(value, str | bytes) else value


class Task(msgspec.Struct, kw_only=True):
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
    # workflows (docs/workflows.md): dependencies not yet settled, how many it has, and the
    # workflow it belongs to
    waiting_for: int = 0
    dependencies: int = 0
    workflow_id: int | None = None

    @staticmethod
    def _json_column(value: Any) -> Any:
        """payload and result as this class holds them (decoded; the API's TaskRead keeps
        them as stored)."""
        return _json(value)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Any:
        fields = {f: row[f] for f in cls.__struct_fields__}
        fields["payload"] = cls._json_column(fields["payload"])
        fields["state"] = TaskState(fields["state"])
        if fields["result"] is not None:
            fields["result"] = cls._json_column(fields["result"])
        return cls(**fields)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


TERMINAL = frozenset({TaskState.COMPLETED, TaskState.DEAD, TaskState.CANCELLED})


class Transition(msgspec.Struct, kw_only=True):
    trigger: str
    from_state: TaskState | None
    to_state: TaskState
    attempt: int
    worker: str | None
    at: datetime
    detail: str | None


class InvalidTask(ValueError):
    """A submission that cannot be accepted; the message names what is wrong. `field` names
    the field (`payload.user_id`, `tasks[3].due_at`), `known_actions` lists the actions when
    the action is unknown."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        known_actions: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.known_actions = known_actions


class IdempotencyConflict(Exception):
    """A submission reuses an idempotency key with other content than the task that holds it:
    nothing was written. A repeat returns the task only when it has the same action, payload
    (as a JSON value), queue, priority, max_attempts (as resolved: the action's when not given),
    lease_seconds and timeout_seconds; due_at is not compared.

    `key`; `task_id`, the task that holds the key (None when the key is given earlier in the
    same batch, by the task at `earlier`); `index`, the task's position in a batch (None for
    one task); `fields`, what differs."""

    def __init__(
        self,
        message: str,
        *,
        key: str,
        task_id: int | None,
        index: int | None = None,
        earlier: int | None = None,
        fields: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.key = key
        self.task_id = task_id
        self.index = index
        self.earlier = earlier
        self.fields = fields

    @classmethod
    def of(cls, conflict: KeyConflict, *, batch: bool) -> IdempotencyConflict:
        """From the store's KeyConflict; `batch`: name the task by its index."""
        where = f"tasks[{conflict.index}]: " if batch else ""
        *most, last = conflict.fields or ("content",)
        what = f"{', '.join(most)} and {last}" if most else last
        holder = (
            f"is already used by task {conflict.task_id}"
            if conflict.task_id is not None
            else f"is also given to tasks[{conflict.earlier}]"
        )
        return cls(
            f"{where}idempotency_key {conflict.key!r} {holder} with a different {what}",
            key=conflict.key,
            task_id=conflict.task_id,
            index=conflict.index if batch else None,
            earlier=conflict.earlier,
            fields=conflict.fields,
        )


class MalformedTask(InvalidTask):
    """A submission no action could accept: a value out of its bounds (`due_at`), a payload
    nested deeper than MAX_PAYLOAD_DEPTH, or text PostgreSQL cannot store (a NUL character, a
    lone surrogate). The HTTP API answers 400 where other InvalidTasks get 422."""


def payload_field(message: str) -> str:
    """`payload.user_id` from msgspec's "… - at `$.user_id`" / "missing required field `x`"."""
    at = re.search(r"at `\$(.*?)`", message)
    missing = re.search(r"(?:missing required|unknown) field `(.*?)`", message)
    return "payload" + (at.group(1) if at else "") + (f".{missing.group(1)}" if missing else "")


def spec(fields: Mapping[str, Any]) -> TaskSpec:
    """A submission given as Python values (the client's), under the API's bounds."""
    try:
        return msgspec.convert(fields, TaskSpec)
    except msgspec.ValidationError as exc:
        raise InvalidTask(f"invalid task: {exc}".replace("$.", "")) from None


def storable(data: TaskSpec, where: str = "", field: str = "") -> bytes:
    """The payload as JSON, once its nesting and its text are known to be storable; else
    MalformedTask, naming where the problem is (`where`, `field`: the batch's `tasks[i]`)."""
    try:
        payload_json = msgspec.json.encode(data.payload)
    except RecursionError:  # a Python caller's payload: the API's nest less (a bounded body)
        payload_json = None
    except UnicodeEncodeError as exc:  # a Python caller's str with a lone surrogate
        raise MalformedTask(
            f"{where}invalid value in payload: {exc.reason} ({exc.object[exc.start : exc.end]!r})",
            field=field + "payload",
        ) from None
    if payload_json is None or nested_deeper_than(payload_json, MAX_PAYLOAD_DEPTH):
        raise MalformedTask(
            f"{where}payload nests more than {MAX_PAYLOAD_DEPTH} levels of arrays and objects",
            field=field + "payload",
        )
    for name, value in (
        ("queue", data.queue),
        ("idempotency_key", data.idempotency_key),
        # as stored (a Struct's fields too); an escaped backslash before "u0000" is no NUL
        ("payload", msgspec.json.decode(payload_json) if b"\\u0000" in payload_json else None),
    ):
        at = nul_at(value, field + name)
        if at is not None:
            raise MalformedTask(
                f"invalid value at {at}: a NUL character (\\u0000), which PostgreSQL cannot store",
                field=at.removesuffix(" (a key)"),
            )
    return payload_json


def prepare(data: TaskSpec, handlers: Mapping[str, Handler], index: int | None = None) -> NewTask:
    """Check one submission (the index-th of a batch) against the handlers; InvalidTask names
    what is wrong."""
    where, field = ("", "") if index is None else (f"tasks[{index}]: ", f"tasks[{index}].")
    due = data.due_at
    if due is not None and (due.utcoffset() is None or not DUE_FROM <= due < DUE_BEFORE):
        problem = "has no time zone" if due.utcoffset() is None else f"is out of range: {DUE_RANGE}"
        raise MalformedTask(
            f"{field}due_at: {due.isoformat()} {problem}",
            field=field + "due_at",
        )
    action = data.action if data.action is not None else data.payload.get("action")
    known = sorted(handlers)
    if not isinstance(action, str) or not action:
        raise InvalidTask(
            f"{where}no action: give `action`, or `payload.action`", known_actions=known
        )
    if data.idempotency_key is not None and data.idempotency_key.startswith(RESERVED_KEY_PREFIX):
        raise InvalidTask(
            f"{where}idempotency_key {data.idempotency_key!r}: keys starting with "
            f"{RESERVED_KEY_PREFIX!r} are reserved for the periodic schedules",
            field=field + "idempotency_key",
        )
    handler = handlers.get(action)
    if handler is None:
        raise InvalidTask(
            f"{where}unknown action {action!r}; known actions: {', '.join(known)}",
            known_actions=known,
        )
    payload_json = storable(data, where, field)
    try:
        # an action without a payload type takes any object: decoding our own encoding of a
        # dict again (storable checked its depth) could not fail, so it is not done
        if handler.payload_type is not None:
            handler.validate(payload_json)
    except msgspec.ValidationError as exc:
        raise InvalidTask(
            f"{where}payload does not fit action {action!r}: {exc}",
            field=field + payload_field(str(exc)),
        ) from None
    return NewTask(
        action=action,
        payload_json=payload_json.decode(),
        queue=data.queue,
        priority=data.priority,
        max_attempts=data.max_attempts or handler.max_attempts,
        due_at=data.due_at,
        idempotency_key=data.idempotency_key,
        lease_seconds=data.lease_seconds,
        timeout_seconds=data.timeout_seconds,
    )
