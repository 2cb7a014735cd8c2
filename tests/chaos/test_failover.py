"""PostgreSQL failover under load (engine/tools/failover.py, `tasklease chaos --failover`):
pg_auto_failover's `perform failover`, then a SIGKILL of the primary node; nothing
acknowledged is lost, nothing completed twice, every process reconnects by itself.
About a minute; as root, with pg_auto_failover installed (postgresql-15-auto-failover,
pg-auto-failover-cli: .ci/run installs them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasklease.engine.tools import failover

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(failover.missing() is not None, reason=f"{failover.missing()}"),
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
