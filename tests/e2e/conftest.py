from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Procs


@pytest.fixture
def procs(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    """Start tasklease processes on this test's database; their logs are shown on failure."""
    running = Procs(tmp_path, {"DATABASE_URL": db})
    yield running
    running.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(running.dump())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
