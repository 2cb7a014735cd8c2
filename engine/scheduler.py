"""The scheduler every worker runs, for the schedules its modules declare (schedules.py): when
a slot comes, it submits the slot's task under the idempotency key `schedule:<name>:<slot>`,
so exactly one of the workers that try creates it, then advances `last_slot_at` under a
guard on its old value."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import msgspec

from tasklease.engine.retry import Retry, wait_for
from tasklease.engine.schedules import LOOK_AGAIN, Schedule, decide
from tasklease.engine.store import TRANSIENT_ERRORS, KeyTaken, NewTask, Store

log = logging.getLogger("tasklease.schedules")


class Scheduler:
    """Creates each due slot's task; runs in every worker, for the schedules it declares."""

    def __init__(
        self, store: Store, schedules: dict[str, Schedule], stop: asyncio.Event | None = None
    ) -> None:
        self.store = store
        self.schedules = schedules
        self.stop = stop or asyncio.Event()  # the worker's: set when it stops

    async def declare(self) -> None:
        now = await self.store.db_now()
        for s in self.schedules.values():
            await self.store.declare_schedule(s, s.next_slot(now))
        if self.schedules:
            log.info("schedules: %s", ", ".join(sorted(self.schedules)))

    async def tick(self) -> float:
        """Create the tasks of the slots that have come; seconds until the next one."""
        rows = await self.store.schedules_state(list(self.schedules))
        wait = LOOK_AGAIN
        for row in rows:
            s, now = self.schedules[row["name"]], row["now"]
            if row["next_run_at"] > now:
                wait = min(wait, (row["next_run_at"] - now).total_seconds())
                continue
            d = decide(s, now)
            task_id = None
            if d.run:
                task_id = await self.submit(s, d.slot)
            advanced = await self.store.advance_schedule(
                s.name, row["last_slot_at"], d.slot, s.next_slot(d.slot), task_id
            )
            if advanced and d.run:
                log.info("schedule %s: task %d for %s", s.name, task_id, d.slot.isoformat())
            elif advanced:
                log.info(
                    "schedule %s: %s was missed and skipped (policy skip)",
                    s.name,
                    d.slot.isoformat(),
                )
            wait = 0.0  # look again at once: the next slot may have come too
        return wait

    async def submit(self, s: Schedule, slot: datetime) -> int | None:
        """The slot's task, made now or by another scheduler before (its key says which slot).
        A task of other content holds the key when schedulers disagree on the schedule (a
        deploy under way changed its payload, say): that task stands for the slot."""
        new = NewTask(
            s.action,
            msgspec.json.encode(s.payload).decode(),
            queue=s.queue,
            priority=s.priority,
            due_at=slot,
            idempotency_key=s.key(slot),
        )
        try:
            return int((await self.store.submit_many([new]))[0].task["id"])
        except KeyTaken as taken:
            conflict = taken.conflicts[0]
            # submissions may not take schedule keys (engine.tasks): another action there
            # means a row written around them
            (log.error if "action" in conflict.fields else log.warning)(
                "schedule %s: its key for %s is held by task %s with a different %s",
                s.name,
                slot.isoformat(),
                conflict.task_id,
                ", ".join(conflict.fields),
            )
            return conflict.task_id

    async def run(self) -> None:
        """Declare the schedules, then create the slots' tasks as they come, until `stop`."""
        if not self.schedules:
            return
        declaring = Retry("declare the schedules", self.stop, log)
        while not self.stop.is_set():
            try:
                await self.declare()
                break
            except TRANSIENT_ERRORS as exc:
                await declaring.after(exc)
        ticking = Retry("run the schedules", self.stop, log)
        while not self.stop.is_set():
            try:
                wait = await self.tick()
            except TRANSIENT_ERRORS as exc:
                await ticking.after(exc)
                continue
            ticking.succeeded()
            await wait_for(self.stop, timeout=max(wait, 0.01))
