"""A periodic handler, in a module of its own: only workers started with
`--handlers tests.support.scheduled` run its scheduler."""

from __future__ import annotations

from typing import Any

from tasklease import TaskContext, handler


@handler("test_tick", every=1)
async def tick(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, str | None]:
    return {"key": ctx.idempotency_key}
