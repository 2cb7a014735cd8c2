"""Handlers under global limits that no load reaches, for `tasklease bench --only limits`.

Kept out of engine.bench so that the unlimited drains run workers that declare no limit.
"""

from __future__ import annotations

from typing import Any

from tasklease.engine.registry import TaskContext, handler

# Far above the load: at most 200 tasks run at once (2 workers x 100), and a drain starts
# about 20,000 a second.
ABOVE_ANY_LOAD = 10_000
ABOVE_ANY_RATE = 100_000  # per second; the most a limit may be (engine.store.MAX_LIMIT)


@handler("bench_capped", global_limit=ABOVE_ANY_LOAD)
async def bench_capped(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """No work, under a global concurrency limit that the load never reaches."""


@handler("bench_rated", global_limit=ABOVE_ANY_LOAD, rate_limit=(ABOVE_ANY_RATE, 1.0))
async def bench_rated(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """No work, under concurrency and rate limits that the load never reaches."""
