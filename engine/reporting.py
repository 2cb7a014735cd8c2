"""Each process's counters, written to the `processes` table every few seconds.

Workers on many machines and several API replicas all report here, so any API
replica can answer /metrics and /stats for the whole cluster from one query.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from tasklease.engine.store import TRANSIENT_ERRORS, Store

log = logging.getLogger("tasklease.reporting")

# Handler durations, in seconds (Prometheus histogram upper bounds; +Inf implied).
BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    900,
)
REPORT_EVERY = float(os.environ.get("TASKLEASE_REPORT_SECONDS", "5"))
# Transitions are also kept per wall-clock minute for the last hour (the dashboard's chart).
MINUTES_KEPT = 60


def process_id() -> str:
    """host:pid plus a few random hex digits: containers reuse pid 1 and their hostname."""
    return f"{socket.gethostname()}:{os.getpid()}.{secrets.token_hex(2)}"


def minute_now() -> int:
    """The current minute since the Unix epoch, by this machine's clock."""
    return int(time.time() // 60)


class Counters:
    """Transitions by trigger, `dropped` (outcomes refused for a lost lease), `fenced`
    (handlers stopped because their lease could not be renewed) and `cancel_request`, and
    handler durations by action. `minutes` holds the same transitions per minute (Unix time
    // 60) for the last MINUTES_KEPT minutes. `blocked`: by action, how often and for how
    long a handler blocked the worker's event loop ("" when no handler was found)."""

    def __init__(self, clock: Callable[[], int] = minute_now) -> None:
        self.transitions: Counter[str] = Counter()
        self.durations: dict[str, dict[str, Any]] = {}
        self.minutes: dict[int, Counter[str]] = {}
        self.blocked: dict[str, dict[str, float]] = {}
        self._clock = clock

    def count(self, trigger: str, n: int = 1) -> None:
        self.transitions[trigger] += n
        minute = self._clock()
        bucket = self.minutes.get(minute)
        if bucket is None:
            bucket = self.minutes[minute] = Counter()
            for old in [m for m in self.minutes if m <= minute - MINUTES_KEPT]:
                del self.minutes[old]
        bucket[trigger] += n

    def observe(self, action: str, seconds: float) -> None:
        h = self.durations.setdefault(action, {"buckets": [0] * (len(BUCKETS) + 1), "sum": 0.0})
        slot = bisect.bisect_left(BUCKETS, seconds)
        h["buckets"][slot] += 1
        h["sum"] += seconds

    def block(self, action: str, seconds: float) -> None:
        b = self.blocked.setdefault(action, {"count": 0, "seconds": 0.0})
        b["count"] += 1
        b["seconds"] += seconds

    def to_json(self) -> str:
        body = {
            "transitions": dict(self.transitions),
            "durations": self.durations,
            "minutes": {str(m): dict(c) for m, c in self.minutes.items()},
            "blocked": self.blocked,
        }
        return msgspec.json.encode(body).decode()


@dataclass
class Merged:
    transitions: Counter[str]
    durations: dict[str, dict[str, Any]]
    blocked: dict[str, dict[str, float]]


def merge(counters_json: Sequence[str]) -> Merged:
    """Sum the counters of many processes (their `processes.counters` column)."""
    out = Merged(Counter(), {}, {})
    for raw in counters_json:
        one = msgspec.json.decode(raw)
        out.transitions.update(one.get("transitions", {}))
        for action, h in one.get("durations", {}).items():
            total = out.durations.setdefault(
                action, {"buckets": [0] * (len(BUCKETS) + 1), "sum": 0.0}
            )
            total["buckets"] = [a + b for a, b in zip(total["buckets"], h["buckets"], strict=False)]
            total["sum"] += h["sum"]
        for action, b in one.get("blocked", {}).items():
            total = out.blocked.setdefault(action, {"count": 0, "seconds": 0.0})
            total["count"] += b["count"]
            total["seconds"] += b["seconds"]
    return out


def per_minute(
    counters_json: Sequence[str], now: int, minutes: int = MINUTES_KEPT
) -> list[Counter[str]]:
    """Transitions per minute summed over many processes, oldest first: the `minutes`
    ending with minute `now` (Unix time // 60)."""
    first = now - minutes + 1
    out: list[Counter[str]] = [Counter() for _ in range(minutes)]
    for raw in counters_json:
        for key, counts in msgspec.json.decode(raw).get("minutes", {}).items():
            if first <= int(key) <= now:
                out[int(key) - first].update(counts)
    return out


def cumulative(buckets: Sequence[int]) -> list[tuple[str, int]]:
    """Prometheus buckets: (upper bound, observations at or below it), ending with +Inf."""
    bounds = [*(str(b) for b in BUCKETS), "+Inf"]
    running, out = 0, []
    for bound, n in zip(bounds, buckets, strict=True):
        running += n
        out.append((bound, running))
    return out


class Reporter:
    """Writes this process's row every REPORT_EVERY seconds and once more when it stops."""

    def __init__(
        self,
        store: Store,
        counters: Counters,
        *,
        kind: str,
        process: str | None = None,
        queues: Sequence[str] = (),
        concurrency: int = 0,
        running: Callable[[], int] = lambda: 0,
        every: float = REPORT_EVERY,
    ) -> None:
        self.store, self.counters, self.kind = store, counters, kind
        self.process = process or process_id()
        self.queues, self.concurrency, self.running, self.every = (
            queues,
            concurrency,
            running,
            every,
        )
        self._task: asyncio.Task[None] | None = None

    async def report(self, stopped: bool = False) -> None:
        await self.store.report_process(
            self.process,
            self.kind,
            socket.gethostname(),
            os.getpid(),
            self.queues,
            self.concurrency,
            self.running(),
            self.counters.to_json(),
            stopped,
        )

    async def _loop(self) -> None:
        while True:
            try:
                await self.report()
            except TRANSIENT_ERRORS as exc:
                log.debug("could not report counters: %s", exc)
            await asyncio.sleep(self.every)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="reporter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await asyncio.wait_for(self.report(stopped=True), 5)
        except TRANSIENT_ERRORS as exc:
            log.debug("could not report the stop: %s", exc)


def alive(row: Any) -> bool:
    """Reported within three intervals and did not say it stopped."""
    return row["stopped_at"] is None and row["seen_seconds_ago"] <= 3 * REPORT_EVERY
