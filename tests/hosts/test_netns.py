"""The harness cleans up after itself, and after runs that could not (engine/tools/netns.py)."""

from __future__ import annotations

import subprocess
import sys

from tasklease.engine.tools import netns
from tests.hosts.conftest import Site


def links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_sweep_removes_what_a_dead_run_left(site: Site) -> None:
    """A namespace named after a process that is gone, a process in it and a link of that
    run: all removed by sweep(); the live session's network is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_id = "abc123"
    ns = f"tln-{dead.pid}-{run_id}-h1"
    netns.run("ip", "netns", "add", ns)
    netns.run("ip", "link", "add", f"tl{run_id}br", "type", "bridge")
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"])
    try:
        assert ns in netns.namespaces() and f"tl{run_id}br" in links()
        assert run_id in netns.sweep()
        assert ns not in netns.namespaces()
        assert f"tl{run_id}br" not in links()
        assert sleeper.wait(10) == -9  # killed
        assert site.pg.host.ns in netns.namespaces()  # this session's run is alive
    finally:
        sleeper.kill()
        netns.remove_run(run_id)


def test_a_network_closed_leaves_nothing(site: Site) -> None:
    with netns.Network() as net:
        host = net.host("x", wire=True)
        inside = subprocess.Popen(host.argv("sleep", "600"))
        assert host.ns in netns.namespaces()
        wire = host.wire
    assert inside.wait(10) == -9
    assert wire is not None and wire.poll() is not None
    assert host.ns not in netns.namespaces()
    assert f"tl{net.id}" not in links()
    assert not net.dir.exists()
