"""PostgreSQL failover under load (engine/failover.py, `tasklease chaos --failover`):
pg_auto_failover's `perform failover`, then a SIGKILL of the primary node; nothing
acknowledged is lost, nothing completed twice, every process reconnects by itself.
About 2.5 minutes, too long for every CI run: it runs with TASKLEASE_TEST_FAILOVER=1, as root
with pg_auto_failover installed (postgresql-15-auto-failover, pg-auto-failover-cli)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasklease.engine import failover

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(failover.missing() is not None, reason=f"{failover.missing()}"),
    pytest.mark.skipif(
        os.environ.get("TASKLEASE_TEST_FAILOVER") != "1",
        reason="2.5 minutes: runs with TASKLEASE_TEST_FAILOVER=1 (or `tasklease chaos --failover`)",
    ),
]


async def test_failover_and_a_killed_primary_lose_nothing(tmp_path: Path) -> None:
    config = failover.FailoverConfig(rate=40, before=5, between=8, after=12)
    report = await failover.run(config, tmp_path)
    print("\n".join(report.lines()))
    assert report.chaos.lost == 0
    assert report.chaos.double_completions == 0
    assert report.chaos.tasks > 200, "the load ran"
    assert set(report.recovery) == {"perform failover", "SIGKILL of the primary"}
    assert report.processes_exited == 0
    # claims back off up to 10 s while the database is away: `after` is longer than that
    assert report.workers_completing_after_kill >= config.workers
    assert report.ok, report.problems + report.chaos.problems
    assert not list(Path("/tmp").glob("tasklease-failover-*/monitor")), "left a formation"
