"""The Store's timestamptz codec (engine/store.py): any time the database holds reads as an
aware datetime, and times written read back as asyncpg's own codec would write them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest

from tasklease.engine.store import EARLIEST, LATEST, Store


@pytest.mark.parametrize(
    ("stored", "read"),
    [
        ("infinity", LATEST),
        ("-infinity", EARLIEST),
        ("294276-12-31 23:59:59+00", LATEST),
        ("10000-01-01 00:00:00+00", LATEST),
        ("4713-01-01 00:00:00+00 BC", EARLIEST),
        ("0001-01-01 00:00:00+00", EARLIEST),
        ("1969-12-31 23:59:59.5+00", datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC)),
        ("2026-05-05 12:00:00.123456+02", datetime(2026, 5, 5, 10, 0, 0, 123456, tzinfo=UTC)),
    ],
)
async def test_every_stored_time_reads_as_an_aware_datetime(
    store: Store, stored: str, read: datetime
) -> None:
    value = await store.pool.fetchval("SELECT $1::text::timestamptz", stored)
    assert value == read and value.tzinfo is UTC


@pytest.mark.parametrize(
    "written",
    [
        datetime(2026, 1, 20, 12, tzinfo=UTC),
        datetime(2026, 1, 20, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 1, 20, 12),  # naive: local time, as asyncpg has it
        datetime.max,
        datetime.min,
        LATEST,
        EARLIEST,
        datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    ],
)
async def test_times_are_written_as_asyncpg_writes_them(
    store: Store, conn: asyncpg.Connection, written: datetime
) -> None:
    ours = await store.pool.fetchval("SELECT $1::timestamptz::text", written)
    theirs = await conn.fetchval("SELECT $1::timestamptz::text", written)
    assert ours == theirs


async def test_arrays_of_times_and_nulls(store: Store) -> None:
    times = [datetime(2026, 1, 1, tzinfo=UTC), None, LATEST]
    assert await store.pool.fetchval("SELECT $1::timestamptz[]", times) == times
