"""tasklease processes on this machine, for `tasklease bench` and `tasklease chaos`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


class Cluster:
    """API and worker processes on one database; each one's output goes to a log file."""

    def __init__(self, dsn: str, log_dir: Path, handlers: str, log_level: str = "info") -> None:
        self.dsn, self.log_dir, self.handlers, self.log_level = dsn, log_dir, handlers, log_level
        self.workers: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        out = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115
        env = {**os.environ, "DATABASE_URL": self.dsn, "TASKLEASE_LOG_LABEL": name}
        return subprocess.Popen(
            [sys.executable, "-m", "tasklease.engine.cli", "--log-level", self.log_level, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def worker(self, *options: str) -> subprocess.Popen[bytes]:
        self.started += 1
        proc = self._spawn(
            f"worker-{self.started}", "worker", "--handlers", self.handlers, *options
        )
        self.workers.append(proc)
        return proc

    def api(self) -> str:
        """Start the API on a free port; returns its URL."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.others.append(
            self._spawn("api", "api", "--port", str(port), "--handlers", self.handlers)
        )
        return f"http://127.0.0.1:{port}"

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
