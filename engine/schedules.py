"""Periodic tasks: schedules declared in code (the scheduler every worker runs is in
scheduler.py).

A schedule names an action, a payload and its times: a cron expression (croniter, in a
time zone) or an interval in seconds (slots at whole multiples of it since the Unix epoch).
Every worker runs a `Scheduler` for the schedules its modules declare. When a slot comes,
each of them submits the slot's task with the idempotency key `schedule:<name>:<slot>`:
the unique index lets exactly one of those submissions create it, however many workers
(or API processes) try. Then `last_slot_at` is advanced under a guard on its old value.

Times missed while no worker ran follow the schedule's `missed` policy: "once" runs the
latest missed slot once (and skips the older ones), "skip" runs nothing that is more than
MISFIRE_GRACE seconds late. The database clock decides what is due, as for leases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

MISSED_POLICIES = ("once", "skip")
MISFIRE_GRACE = 60.0  # seconds a slot may be late and still count as on time
LOOK_AGAIN = 30.0  # the longest a scheduler sleeps, so a changed schedule is seen soon


class ScheduleError(ValueError):
    """A schedule declaration is wrong."""


@dataclass(frozen=True)
class Schedule:
    name: str
    action: str
    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    missed: str = "once"
    payload: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0

    def latest_slot(self, at: datetime) -> datetime:
        """The latest slot at or before `at`."""
        if self.every is not None:
            return datetime.fromtimestamp(
                math.floor(at.timestamp() / self.every) * self.every, tz=UTC
            )
        assert self.cron is not None
        local = at.astimezone(ZoneInfo(self.timezone)) + timedelta(microseconds=1)
        prev: datetime = croniter(self.cron, local).get_prev(datetime)
        return prev.astimezone(UTC)

    def next_slot(self, after: datetime) -> datetime:
        """The first slot strictly after `after`."""
        if self.every is not None:
            return datetime.fromtimestamp(
                (math.floor(after.timestamp() / self.every) + 1) * self.every, tz=UTC
            )
        assert self.cron is not None
        nxt: datetime = croniter(self.cron, after.astimezone(ZoneInfo(self.timezone))).get_next(
            datetime
        )
        return nxt.astimezone(UTC)

    def key(self, slot: datetime) -> str:
        return f"schedule:{self.name}:{slot.astimezone(UTC).isoformat()}"


SCHEDULES: dict[str, Schedule] = {}


def schedule(
    name: str,
    action: str,
    *,
    cron: str | None = None,
    every: float | None = None,
    timezone: str = "UTC",
    missed: str = "once",
    payload: dict[str, Any] | None = None,
    queue: str = "default",
    priority: int = 0,
) -> Schedule:
    """Declare a periodic task: `action` with `payload`, at the times of `cron` (five
    fields, or six with seconds last) in `timezone`, or every `every` seconds."""
    if (cron is None) == (every is None):
        raise ScheduleError(f"schedule {name!r}: give either cron or every")
    if cron is not None and not croniter.is_valid(cron):
        raise ScheduleError(f"schedule {name!r}: {cron!r} is not a valid cron expression")
    if every is not None and not every > 0:
        raise ScheduleError(f"schedule {name!r}: every must be a positive number of seconds")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"schedule {name!r}: unknown time zone {timezone!r}") from None
    if missed not in MISSED_POLICIES:
        raise ScheduleError(f"schedule {name!r}: missed must be 'once' or 'skip', not {missed!r}")
    declared = Schedule(
        name, action, cron, every, timezone, missed, dict(payload or {}), queue, priority
    )
    if name in SCHEDULES and SCHEDULES[name] != declared:
        raise ScheduleError(f"schedule {name!r} is declared twice, differently")
    SCHEDULES[name] = declared
    return declared


@dataclass(frozen=True)
class Decision:
    slot: datetime
    run: bool  # False: the slot is skipped (missed, policy "skip")


def decide(s: Schedule, now: datetime) -> Decision:
    """What to do about the latest slot that has come (the older missed ones are skipped
    under either policy)."""
    slot = s.latest_slot(now)
    late = (now - slot).total_seconds()
    return Decision(slot, s.missed == "once" or late <= MISFIRE_GRACE)
