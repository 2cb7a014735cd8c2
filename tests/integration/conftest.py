"""Fixtures of the integration tests."""

from collections.abc import AsyncIterator

import pytest

from tests.support.workers import Running, running_workers


@pytest.fixture
async def workers() -> AsyncIterator[Running]:
    """Start workers in this process; all are stopped at the end of the test."""
    async for running in running_workers():
        yield running
