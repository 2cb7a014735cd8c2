"""Every trigger fired at a task in every state, against the real database.

The statement must move the task exactly when the declaration in engine/states.py
lists that state as a source, land in the declared destination, and write one history
row; from any other state it must change nothing at all. The task's action is under a
global limit: a task holds one of its tokens exactly while it is RUNNING.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from tasklease.engine.states import BY_TRIGGER, TRANSITIONS, TaskState
from tasklease.engine.store import Limit, Store
from tests.support.db import LEASES, force_state, state_of, submit, triggers

WORKER = "matrix-worker"


@dataclass
class Case:
    """How to arrange a task so that only the source state decides, and how to fire."""

    setup: dict[str, Any]
    fire: Callable[[Store, int, uuid.UUID], Awaitable[Any]]


async def claim_all(store: Store, task_id: int, token: uuid.UUID) -> None:
    """As a worker does: a claim that finds a limit applies says so and starts nothing, and
    the next (with the limits joined in) starts what is due."""
    claim = await store.claim("default", LEASES, 10, WORKER)
    if "default" in store.limited_queues and not (claim.leased or claim.expired):
        await store.claim("default", LEASES, 10, WORKER)


# the dependency arranged for a task (ready, abandon): task id -> (its id, its token)
DEPENDENCY: dict[int, tuple[int, uuid.UUID]] = {}


async def settle_dependency(store: Store, task_id: int, how: str) -> None:
    """The task's dependency ends (complete, or bury for good): its trigger settles the task."""
    dep, token = DEPENDENCY[task_id]
    if how == "complete":
        assert await store.complete(dep, token, "1")
    else:
        assert await store.bury(dep, token, "fatal", True)


CASES: dict[str, Case] = {
    # due now; a RUNNING task's lease is still good, so claim must leave it alone
    "claim": Case({"due_in": -1, "lease_in": 60}, claim_all),
    # lease expired, attempts left; other states are not due, so claim takes nothing
    "reclaim": Case({"due_in": 3600, "lease_in": -1, "attempt": 1}, claim_all),
    # lease expired on the last attempt
    "expire": Case({"due_in": 3600, "lease_in": -1, "attempt": 5}, claim_all),
    "complete": Case({}, lambda s, i, t: s.complete(i, t, '{"ok": true}')),
    "fail": Case({"attempt": 1}, lambda s, i, t: s.fail(i, t, 30, "boom")),
    "bury": Case({"attempt": 1}, lambda s, i, t: s.bury(i, t, "fatal", True)),
    "cancel": Case({"due_in": 3600}, lambda s, i, t: s.cancel(i, "by test")),
    "cancel_running": Case({"cancel_requested": True}, lambda s, i, t: s.cancel_running(i, t)),
    "release": Case({}, lambda s, i, t: s.release(i, t)),
    "requeue": Case({"due_in": 3600}, lambda s, i, t: s.requeue(i, "by test")),
    "snooze": Case({"attempt": 1}, lambda s, i, t: s.snooze(i, t, 30, "not yet")),
    # workflows: the task waits for one RUNNING dependency, which completes or dies
    "ready": Case(
        {"due_in": -1, "dependency": True}, lambda s, i, t: settle_dependency(s, i, "complete")
    ),
    "abandon": Case(
        {"due_in": -1, "dependency": True}, lambda s, i, t: settle_dependency(s, i, "bury")
    ),
}


def test_every_declared_trigger_has_a_case() -> None:
    assert set(CASES) == {t.trigger for t in TRANSITIONS}


async def arrange(
    store: Store, conn: asyncpg.Connection, state: TaskState, setup: dict[str, Any]
) -> tuple[int, uuid.UUID]:
    task_id = await submit(store, max_attempts=5)
    options = {k: v for k, v in setup.items() if k not in ("cancel_requested", "dependency")}
    token = await force_state(conn, task_id, state, **options)
    await store.set_limit(Limit("action:noop", 10), declared=True)
    if state is TaskState.RUNNING:  # as its claim would have: it holds a token
        await conn.execute("UPDATE limit_tokens SET task_id = $1 WHERE n = 1", task_id)
        await conn.execute("UPDATE tasks SET action_token = 1 WHERE id = $1", task_id)
    if setup.get("dependency"):  # as task_submit_graph would have, then a claim of it
        dep = await submit(store, queue="elsewhere")
        dep_token = await force_state(conn, dep, TaskState.RUNNING)
        await conn.execute("UPDATE tasks SET dependants = 1 WHERE id = $1", dep)
        await conn.execute(
            "UPDATE tasks SET waiting_for = 1, dependencies = 1 WHERE id = $1", task_id
        )
        await conn.execute(
            "INSERT INTO task_dependencies (depends_on, task_id) VALUES ($1, $2)", dep, task_id
        )
        DEPENDENCY[task_id] = (dep, dep_token)
    if setup.get("cancel_requested"):
        await conn.execute("UPDATE tasks SET cancel_requested_at = now() WHERE id = $1", task_id)
    return task_id, token


@pytest.mark.parametrize("state", list(TaskState))
@pytest.mark.parametrize("trigger", list(CASES))
async def test_trigger_from_state(
    store: Store, conn: asyncpg.Connection, trigger: str, state: TaskState
) -> None:
    declared = BY_TRIGGER[trigger]
    case = CASES[trigger]
    task_id, token = await arrange(store, conn, state, case.setup)
    before = await state_of(conn, task_id)
    history_before = await triggers(conn, task_id)

    await case.fire(store, task_id, token)

    after = await state_of(conn, task_id)
    history_after = await triggers(conn, task_id)
    if state in declared.sources:
        assert after["state"] == declared.dest, f"{trigger} from {state} did not move the task"
        assert history_after == [*history_before, trigger]
        last = await conn.fetchrow(
            "SELECT from_state, to_state FROM task_transitions WHERE task_id = $1 "
            "ORDER BY id DESC LIMIT 1",
            task_id,
        )
        assert (last["from_state"], last["to_state"]) == (state.value, declared.dest.value)
    else:
        assert dict(after) == dict(before), f"{trigger} changed a {state} task"
        assert history_after == history_before
    tokens = await conn.fetchval("SELECT count(*) FROM limit_tokens WHERE task_id = $1", task_id)
    assert tokens == (after["state"] == TaskState.RUNNING), (trigger, state, after["state"], tokens)
