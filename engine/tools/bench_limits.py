"""Handlers under global limits that no load reaches, for `tasklease bench --only limits`.

Kept out of engine.bench so that the unlimited drains run workers that declare no limit.
"""

from __future__ import annotations

from typing import Any

from tasklease.engine.registry import TaskContext, handler
from tasklease.engine.tools.bench import ABOVE_ANY_LOAD, ABOVE_ANY_RATE


@handler("bench_capped", global_limit=ABOVE_ANY_LOAD)
async def bench_capped(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """No work, under a global concurrency limit that the load never reaches."""


@handler("bench_rated", global_limit=ABOVE_ANY_LOAD, rate_limit=(ABOVE_ANY_RATE, 1.0))
async def bench_rated(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """No work, under concurrency and rate limits that the load never reaches."""
