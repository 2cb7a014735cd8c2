"""tasklease: a durable task scheduler on PostgreSQL.

The public surface, small on purpose:

    from tasklease import handler, TaskContext, PermanentError, Snooze, schedule, Client

Handlers (`@handler`, TaskContext, PermanentError, Snooze, `schedule`) are run by
`tasklease worker`; importing them loads no database driver. Client (async) and SyncClient
submit and read tasks on the database, inside the caller's own transaction when given
`connection=`; they (and the task types they return) are loaded when first named. The
engine, the HTTP API, the built-in handlers and the schema live in tasklease.engine, .api,
.handlers and .schema.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tasklease.engine.registry import LeaseLost, PermanentError, Snooze, TaskContext, handler
from tasklease.engine.schedules import schedule
from tasklease.engine.states import TaskState

if TYPE_CHECKING:
    from tasklease.engine.client import (
        Client,
        NoTransaction,
        SyncClient,
        TaskConflict,
        TaskNotFound,
    )
    from tasklease.engine.tasks import (
        IdempotencyConflict,
        InvalidTask,
        Task,
        TaskSpec,
        Transition,
    )

# name -> the module that defines it, imported on first use (it imports asyncpg)
_LAZY = {
    **dict.fromkeys(
        ("Client", "NoTransaction", "SyncClient", "TaskConflict", "TaskNotFound"),
        "tasklease.engine.client",
    ),
    **dict.fromkeys(
        ("IdempotencyConflict", "InvalidTask", "Task", "TaskSpec", "Transition"),
        "tasklease.engine.tasks",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tasklease' has no attribute {name!r}")


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
