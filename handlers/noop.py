"""`noop`: does nothing and succeeds; for smoke tests and benchmarks."""

from typing import Any

from tasklease import TaskContext, handler


@handler("noop")
async def noop(ctx: TaskContext, payload: dict[str, Any]) -> None:
    return None
