"""The figures of /stats, /metrics and the dashboard (api/stats.py): one read, shared."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tasklease.api.stats import ReadModel
from tasklease.engine.store import Store
from tests.support.db import submit


async def test_figures_are_read_once_per_period_and_afresh_after_a_change(
    store: Store, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = 0
    counts = store.counts

    async def counted() -> list[asyncpg.Record]:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.05)  # long enough for the requests below to overlap
        return await counts()

    monkeypatch.setattr(store, "counts", counted)
    model = ReadModel(store, max_age=3600)
    await submit(store, "noop", queue="emails")
    await store.pause_queue("reports")
    together = await asyncio.gather(*(model.figures() for _ in range(20)))
    assert reads == 1 and all(f is together[0] for f in together)
    first = together[0]
    assert first.states["PENDING"] == 1 and first.queues["emails"].states["PENDING"] == 1
    assert first.queues["emails"].due == 1 and first.queues["emails"].paused_at is None
    assert first.queues["reports"].paused_at is not None
    assert list(first.queues) == ["emails", "reports"]

    await submit(store, "noop", queue="emails")  # by someone else: seen after max_age
    assert (await model.figures()).queues["emails"].states["PENDING"] == 1 and reads == 1
    model.changed()  # by this process: seen at once
    assert (await model.figures()).queues["emails"].states["PENDING"] == 2 and reads == 2

    model.max_age = 0
    await model.figures()
    assert reads == 3
