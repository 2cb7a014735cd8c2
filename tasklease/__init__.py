"""tasklease: a durable task scheduler on PostgreSQL.

The public surface, small on purpose:

    from tasklease import handler, TaskContext, PermanentError, Snooze, schedule, Client

Handlers (`@handler`, TaskContext, PermanentError, Snooze, `schedule`) are run by
`tasklease worker`; Client (async) and SyncClient submit and read tasks on the database,
inside the caller's own transaction when given `connection=`. The engine, the HTTP API, the
built-in handlers and the schema live in tasklease.engine, .api, .handlers and .schema.
"""

from tasklease.engine.client import (
    Client,
    NoTransaction,
    SyncClient,
    TaskConflict,
    TaskNotFound,
)
from tasklease.engine.fencing import LeaseLost
from tasklease.engine.registry import PermanentError, Snooze, TaskContext, handler
from tasklease.engine.schedules import schedule
from tasklease.engine.states import TaskState
from tasklease.engine.tasks import (
    IdempotencyConflict,
    InvalidTask,
    Task,
    TaskSpec,
    Transition,
)

__all__ = [
    "Client",
    "IdempotencyConflict",
    "InvalidTask",
    "LeaseLost",
    "NoTransaction",
    "PermanentError",
    "Snooze",
    "SyncClient",
    "Task",
    "TaskConflict",
    "TaskContext",
    "TaskNotFound",
    "TaskSpec",
    "TaskState",
    "Transition",
    "handler",
    "schedule",
]
