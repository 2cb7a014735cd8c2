"""What an operator can do to a task (API, CLI and dashboard go through here)."""

from __future__ import annotations

import enum

import asyncpg

from tasklease.engine.states import TaskState
from tasklease.engine.store import Store

S = TaskState
CANCELLABLE = (S.PENDING, S.FAILED, S.RUNNING, S.WAITING)
REQUEUE_BATCH = 1000


class Outcome(enum.Enum):
    DONE = "done"
    REQUESTED = "requested"  # RUNNING: its worker will stop the handler and cancel it
    CONFLICT = "conflict"  # the task's state does not allow it
    NOT_FOUND = "not_found"


async def cancel(store: Store, task_id: int) -> tuple[Outcome, asyncpg.Record | None]:
    """PENDING/FAILED/WAITING -> CANCELLED now; RUNNING -> ask its worker; anything else:
    conflict."""
    row = None
    for _ in range(3):  # the task may move between statements (RUNNING -> FAILED, say)
        if await store.cancel(task_id, "cancelled by an operator"):
            return Outcome.DONE, await store.get(task_id)
        if await store.request_cancel(task_id):
            return Outcome.REQUESTED, await store.get(task_id)
        row = await store.get(task_id)
        if row is None:
            return Outcome.NOT_FOUND, None
        if row["state"] not in CANCELLABLE:
            return Outcome.CONFLICT, row
    return Outcome.CONFLICT, row


async def requeue(store: Store, task_id: int) -> tuple[Outcome, asyncpg.Record | None]:
    """DEAD -> PENDING with attempts reset; anything else: conflict."""
    if await store.requeue(task_id, "requeued by an operator"):
        return Outcome.DONE, await store.get(task_id)
    row = await store.get(task_id)
    return (Outcome.NOT_FOUND if row is None else Outcome.CONFLICT), row


async def requeue_action(store: Store, action: str, batch: int = REQUEUE_BATCH) -> int:
    """Every DEAD task of `action` -> PENDING, `batch` per transaction, so a large dead
    letter never holds thousands of row locks at once. Each task is looked at once (ids
    ascending), so tasks that die again meanwhile are not requeued twice. Returns how many
    moved."""
    moved, after = 0, 0
    while True:
        ids = await store.requeue_action(action, after, batch, "requeued by an operator (all)")
        moved += len(ids)
        if len(ids) < batch:
            return moved
        after = ids[-1]
