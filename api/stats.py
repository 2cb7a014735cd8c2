"""The figures that /stats, /metrics and the dashboard show: one read model, read once.

Counting tasks by queue and state reads the whole tasks table (about 150 ms at a million rows
on the test machine), and every open dashboard refreshes every 2 s, so an API process reads
the figures at most once per `STATS_SECONDS` (TASKLEASE_STATS_SECONDS, default 5), whoever
asks; concurrent requests share one read. What the process itself changes (a submission, a
cancel, a requeue, a pause) makes its next read fresh, so a client sees its own writes.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tasklease.engine.reporting import alive
from tasklease.engine.states import TaskState
from tasklease.engine.store import Store

STATS_SECONDS = float(os.environ.get("TASKLEASE_STATS_SECONDS", "5"))


def _no_tasks() -> dict[str, int]:
    return {s.value: 0 for s in TaskState}


@dataclass
class QueueFigures:
    states: dict[str, int] = field(default_factory=_no_tasks)
    due: int = 0  # due and waiting for a worker
    oldest_due_seconds: float | None = None  # how long the oldest of them has waited
    paused_at: datetime | None = None  # paused since: claims in it start nothing


@dataclass
class Figures:
    states: dict[str, int]  # every state, over all queues
    queues: dict[str, QueueFigures]  # by name, sorted
    oldest_due_seconds: float | None
    processes: list[Any]  # rows of the processes table (engine/reporting.py)
    read_at: datetime

    @property
    def live_workers(self) -> list[Any]:
        return [p for p in self.processes if p["kind"] == "worker" and alive(p)]


async def read(store: Store) -> Figures:
    """Straight from the database: tasks by queue and state, due tasks and their lag, paused
    queues, the processes' reports."""
    counts, lags = await store.counts(), await store.queue_lag()
    paused, processes = await store.paused_queues(), await store.processes()
    states = _no_tasks()
    queues: dict[str, QueueFigures] = {}
    for r in counts:
        states[r["state"]] += r["tasks"]
        queues.setdefault(r["queue"], QueueFigures()).states[r["state"]] = r["tasks"]
    for r in lags:
        q = queues.setdefault(r["queue"], QueueFigures())
        q.due, q.oldest_due_seconds = r["due"], r["oldest_due_seconds"]
    for name, paused_at in paused.items():
        queues.setdefault(name, QueueFigures()).paused_at = paused_at
    return Figures(
        states,
        dict(sorted(queues.items())),
        max((r["oldest_due_seconds"] for r in lags), default=None),
        list(processes),
        datetime.now(UTC),
    )


class ReadModel:
    """The figures of one API process: read at most once per `max_age` seconds."""

    def __init__(self, store: Store, max_age: float = STATS_SECONDS) -> None:
        self.store, self.max_age = store, max_age
        self._figures: Figures | None = None
        self._read_at = 0.0
        self._changes = 0  # this process's writes so far
        self._read_changes = -1  # ... when the figures were read
        self._lock = asyncio.Lock()

    def changed(self) -> None:
        """This process changed tasks or queues: the next read goes to the database."""
        self._changes += 1

    async def figures(self) -> Figures:
        async with self._lock:  # one read for every request that waits meanwhile
            fresh = time.monotonic() - self._read_at < self.max_age
            if self._figures is None or not fresh or self._read_changes != self._changes:
                changes, began = self._changes, time.monotonic()
                self._figures = await read(self.store)
                self._read_at, self._read_changes = began, changes
            return self._figures
