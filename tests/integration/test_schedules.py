"""The scheduler against the real database: one task per slot, and the missed-run policy."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from tasklease.engine.scheduler import Scheduler
from tasklease.engine.schedules import Schedule
from tasklease.engine.store import Store


async def tasks_of(conn: asyncpg.Connection, action: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, due_at, payload, queue, priority, idempotency_key FROM tasks "
        "WHERE action = $1 ORDER BY due_at",
        action,
    )


async def downtime(conn: asyncpg.Connection, name: str, hours: float) -> None:
    """As if no worker had run for `hours`: the last slot and the next run lie behind."""
    await conn.execute(
        "UPDATE schedules SET last_slot_at = now() - make_interval(hours => $2::int), "
        "next_run_at = now() - make_interval(hours => $2::int) + interval '1 minute' "
        "WHERE name = $1",
        name,
        hours,
    )


async def test_a_slot_makes_its_task_once_with_many_schedulers(
    store: Store, conn: asyncpg.Connection
) -> None:
    # hourly: with a slot every second, a scheduler that reads the schedule a second late
    # (a loaded machine) rightly makes the next slot's task too, which is not a double
    s = Schedule("tick", "noop", every=3600, payload={"x": 1}, queue="cron", priority=3)
    schedulers = [Scheduler(store, {"tick": s}) for _ in range(5)]
    for sched in schedulers:
        await sched.declare()
    await conn.execute("UPDATE schedules SET next_run_at = now() - interval '1 second'")
    await asyncio.gather(*(sched.tick() for sched in schedulers))
    rows = await tasks_of(conn, "noop")
    assert len(rows) == 1
    task = rows[0]
    assert (task["queue"], task["priority"], task["payload"]) == ("cron", 3, '{"x": 1}')
    assert task["idempotency_key"] == s.key(task["due_at"])
    state = await conn.fetchrow("SELECT * FROM schedules WHERE name = 'tick'")
    assert state["last_slot_at"] == task["due_at"] and state["last_task_id"] == task["id"]
    assert state["next_run_at"] == task["due_at"] + timedelta(seconds=3600)


async def test_missed_once_runs_the_latest_missed_slot_once(
    store: Store, conn: asyncpg.Connection
) -> None:
    s = Schedule("hourly", "noop", cron="0 * * * *", missed="once")
    scheduler = Scheduler(store, {"hourly": s})
    await scheduler.declare()
    await downtime(conn, "hourly", 5)
    assert await scheduler.tick() == 0.0  # it made a task: look again at once
    await scheduler.tick()
    rows = await tasks_of(conn, "noop")
    now = await conn.fetchval("SELECT now()")
    assert [r["due_at"] for r in rows] == [s.latest_slot(now)]  # five missed, one run
    nxt = await conn.fetchval("SELECT next_run_at FROM schedules")
    assert nxt == s.next_slot(now) and nxt > now


async def test_missed_skip_runs_nothing_late(store: Store, conn: asyncpg.Connection) -> None:
    # hourly at half an hour from now's minute: the latest slot is ~30 minutes late
    minute = ((await conn.fetchval("SELECT now()")).minute + 30) % 60
    s = Schedule("hourly", "noop", cron=f"{minute} * * * *", missed="skip")
    scheduler = Scheduler(store, {"hourly": s})
    await scheduler.declare()
    await downtime(conn, "hourly", 5)
    await scheduler.tick()
    await scheduler.tick()
    now = await conn.fetchval("SELECT now()")
    assert (now - s.latest_slot(now)).total_seconds() > 25 * 60
    assert await tasks_of(conn, "noop") == []
    assert await conn.fetchval("SELECT last_slot_at FROM schedules") == s.latest_slot(now)
    assert await conn.fetchval("SELECT next_run_at FROM schedules") > now


async def test_a_new_schedule_starts_at_its_next_slot_without_backfill(
    store: Store, conn: asyncpg.Connection
) -> None:
    s = Schedule("nightly", "noop", cron="0 3 * * *", timezone="Europe/Paris")
    scheduler = Scheduler(store, {"nightly": s})
    await scheduler.declare()
    wait = await scheduler.tick()
    assert await tasks_of(conn, "noop") == []
    row = await conn.fetchrow("SELECT next_run_at, now() AS now FROM schedules")
    assert 0 < wait <= 30 and row["next_run_at"] == s.next_slot(row["now"])
    local = row["next_run_at"].astimezone(ZoneInfo("Europe/Paris"))
    assert (local.hour, local.minute) == (3, 0)


async def test_changing_the_rule_starts_over_and_keeps_progress_otherwise(
    store: Store, conn: asyncpg.Connection
) -> None:
    await Scheduler(store, {"s": Schedule("s", "noop", every=3600)}).declare()
    await conn.execute("UPDATE schedules SET next_run_at = now() + interval '5 days'")
    await Scheduler(store, {"s": Schedule("s", "noop", every=3600, payload={"a": 1})}).declare()
    row = await conn.fetchrow("SELECT next_run_at - now() AS ahead, payload FROM schedules")
    assert row["ahead"] > timedelta(days=4) and row["payload"] == '{"a": 1}'  # kept
    await Scheduler(store, {"s": Schedule("s", "noop", every=60)}).declare()
    ahead = await conn.fetchval("SELECT next_run_at - now() FROM schedules")
    assert ahead <= timedelta(seconds=60)  # a new rule: from its next slot


async def test_schedulers_that_disagree_on_a_payload_make_one_task_per_slot(
    store: Store, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A deploy under way: an old worker made the slot's task with the old payload. The new
    one's submission is a key conflict, and the task made stands for the slot."""
    old = Schedule("tick", "noop", every=3600, payload={"v": 1})
    new = Schedule("tick", "noop", every=3600, payload={"v": 2})
    first, second = Scheduler(store, {"tick": old}), Scheduler(store, {"tick": new})
    await first.declare()
    await conn.execute("UPDATE schedules SET next_run_at = now() - interval '1 second'")
    state = await conn.fetchrow("SELECT last_slot_at, next_run_at FROM schedules")
    await first.tick()
    [made] = await tasks_of(conn, "noop")
    # the second scheduler reads the schedule as it was before the first advanced it
    await conn.execute(
        "UPDATE schedules SET last_slot_at = $1, next_run_at = $2",
        state["last_slot_at"],
        state["next_run_at"],
    )
    with caplog.at_level(logging.WARNING, logger="tasklease.schedules"):
        await second.tick()
    assert [r["id"] for r in await tasks_of(conn, "noop")] == [made["id"]]
    assert await conn.fetchval("SELECT last_task_id FROM schedules") == made["id"]
    assert f"is held by task {made['id']} with a different payload" in caplog.text
