"""`tasklease chaos --hosts N`, a short round: workers on two hosts whose links are cut, or
delayed and made lossy, at random (seeded), besides the usual kills. The long form is in
docs/deployment.md."""

from __future__ import annotations

from pathlib import Path

from tasklease.engine.tools import chaos
from tasklease.engine.tools import netns as netns_module
from tests.hosts.conftest import Site


async def test_chaos_on_hosts_with_link_faults_loses_nothing_and_doubles_nothing(
    site: Site, tmp_path: Path
) -> None:
    """`site` only to skip where namespaces cannot be made (and to sweep leftovers first);
    the run makes a network of its own."""
    config = chaos.ChaosConfig(
        tasks=60,
        rate=10,
        seconds=4,
        workers=2,
        concurrency=10,
        lease_seconds=1.0,
        kill_every=2,
        sleep_ms=(100, 600),
        seed=8,
        hosts=2,
        link_fault_every=0.7,
    )
    before = set(netns_module.namespaces())
    report = await chaos.run("", config, tmp_path, progress=print)
    print("\n".join(report.lines()))
    assert report.ok, report.problems
    assert report.completed == report.tasks >= 60
    assert (report.lost, report.double_completions, report.overlapping_executions) == (0, 0, 0)
    assert report.link_cuts >= 1 and report.link_cuts + report.link_impairments >= 3
    assert report.reclaims > 0  # kills (and long cuts) landed mid-lease
    assert set(netns_module.namespaces()) == before, "the run removed its hosts"
