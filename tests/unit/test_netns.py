"""What the network-namespace harness says where it cannot run (the rest needs root:
tests/hosts)."""

from __future__ import annotations

import pytest

from tasklease.engine import cli
from tasklease.engine.tools import netns


def test_not_root_is_a_clear_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert netns.unavailable() == "network namespaces need root (ip netns, veth links)"
    with pytest.raises(netns.NetnsUnavailable, match="need root"):
        netns.Network()


def test_chaos_hosts_refuses_to_start_without_namespaces(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(netns, "unavailable", lambda: "no `ip` command (install iproute2)")
    assert cli.main(["chaos", "--hosts", "2", "--seconds", "1"]) == 1
    err = capsys.readouterr().err
    assert "--hosts needs network namespaces: no `ip` command (install iproute2)" in err
