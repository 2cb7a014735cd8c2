"""tasklease processes on this machine, for `tasklease bench` and `tasklease chaos`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasklease.engine.tools.netns import Host


class Cluster:
    """API and worker processes on one database; each one's output goes to a log file."""

    def __init__(
        self,
        dsn: str,
        log_dir: Path,
        handlers: str,
        log_level: str = "info",
        *,
        hosts: Sequence[Host] = (),
        api_host: Host | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """`hosts`: network namespaces (engine/tools/netns.py) the workers are placed in, in turn;
        `api_host`: the API's. Without them every process runs here."""
        self.dsn, self.log_dir, self.handlers, self.log_level = dsn, log_dir, handlers, log_level
        self.hosts, self.api_host, self.env = list(hosts), api_host, env or {}
        self.placed: dict[int, Host] = {}  # worker pid -> its host
        self.workers: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def _spawn(self, name: str, *args: str, host: Host | None = None) -> subprocess.Popen[bytes]:
        out = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115
        env = {**os.environ, **self.env, "DATABASE_URL": self.dsn, "TASKLEASE_LOG_LABEL": name}
        prefix = host.argv() if host else []
        return subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "tasklease.engine.cli",
                "--log-level",
                self.log_level,
                *args,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def worker(self, *options: str) -> subprocess.Popen[bytes]:
        self.started += 1
        host = self.hosts[(self.started - 1) % len(self.hosts)] if self.hosts else None
        name = f"worker-{self.started}" + (f"-{host.name}" if host else "")
        proc = self._spawn(name, "worker", "--handlers", self.handlers, *options, host=host)
        self.workers.append(proc)
        if host:
            self.placed[proc.pid] = host
        return proc

    def api(self) -> str:
        """Start the API on a free port (8080 on its own host); returns its URL."""
        if self.api_host:
            address, port = self.api_host.ip, 8080
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                address, port = "127.0.0.1", s.getsockname()[1]
        self.others.append(
            self._spawn(
                "api",
                "api",
                "--host",
                address,
                "--port",
                str(port),
                "--handlers",
                self.handlers,
                host=self.api_host,
            )
        )
        return f"http://{address}:{port}"

    def check(self) -> None:
        """Raise if a worker exited on its own (a bench would otherwise wait for ever)."""
        for p in self.workers:
            if p.poll() is not None:
                raise RuntimeError(
                    f"a worker exited with status {p.returncode}; its log is in {self.log_dir}"
                )

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL: no grace, no release; what it held waits for its leases to run out."""
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.workers.remove(proc)

    def stop(self) -> None:
        procs = [*self.workers, *self.others]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
