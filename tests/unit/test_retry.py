"""engine/retry.py: the worker's services are kept running."""

import asyncio
import logging

import pytest

from tasklease.engine import retry


async def test_a_crashed_service_is_logged_and_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []

    async def service() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"bug {len(runs)}")

    log = logging.getLogger("t")
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(retry.keep_running("the scheduler", service, log, first=0.01), 5)
    assert runs == [0, 1, 2]  # crashed twice, then returned
    crashes = [r for r in caplog.records if "the scheduler crashed" in r.getMessage()]
    assert [r.getMessage() for r in crashes] == [
        "the scheduler crashed (1 time(s)); starting it again in 0.01s",
        "the scheduler crashed (2 time(s)); starting it again in 0.02s",
    ]
    assert all(r.exc_info and "bug" in str(r.exc_info[1]) for r in crashes)


async def test_cancelling_stops_the_service() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(retry.keep_running("the listener", forever, logging.getLogger("t")))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
