"""Handlers under global limits that no load reaches, for `tasklease bench --only limits`.

Kept out of engine.bench so that the unlimited drains run workers that declare no limit.
"""

from __future__ import annotations

from typing import Any

from tasklease.engine.registry import TaskContext, handler
from tasklease.engine.tools.bench import (
    ABOVE_ANY_LOAD,
    ABOVE_ANY_RATE,
    PER_KEY_ABOVE_LOAD,
    PER_KEY_NEAR_LOAD,
)


@handler("bench_capped", global_limit=ABOVE_ANY_LOAD)
async def bench_capped(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """No work, under a global concurrency limit that the load never reaches."""


@handler("bench_rated", global_limit=ABOVE_ANY_LOAD, rate_limit=(ABOVE_ANY_RATE, 1.0))
async def bench_rated(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """No work, under concurrency and rate limits that the load never reaches."""


@handler("bench_per_key", limit_by="customer", global_limit=PER_KEY_ABOVE_LOAD)
async def bench_per_key(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """No work, under a per-key limit (per customer) that the load never reaches."""


@handler("bench_per_key_near", limit_by="customer", global_limit=PER_KEY_NEAR_LOAD)
async def bench_per_key_near(ctx: TaskContext, payload: dict[str, Any]) -> None:
    """No work, under a per-key limit (per customer) a little above the load: 100 customers
    x 3 for 200 slots, so that a customer whose tasks come in a bunch reaches it."""
