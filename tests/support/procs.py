"""Real tasklease processes for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proc:
    """A `tasklease …` child process whose output goes to a log file."""

    def __init__(
        self,
        args: list[str],
        log_dir: Path,
        name: str,
        env: dict[str, str | None],
        cwd: Path = REPO,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """`env` adds to this process's environment; a None value removes that variable.
        `prefix` runs it through a command that execs it (`ip netns exec NS`: same pid)."""
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        merged = {**os.environ, **env}
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tasklease.engine.cli", *args],
            cwd=cwd,
            env={k: v for k, v in merged.items() if v is not None},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def signal_tree(self, sig: int) -> None:
        """Signal the process and all its descendants (`tasklease worker` runs its worker as
        a child, engine/supervisor.py): SIGSTOP and SIGCONT pause and resume the worker."""
        try:
            tree = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 60) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
        finally:
            self._log.close()


class Procs:
    def __init__(self, log_dir: Path, env: dict[str, str | None]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.started: list[Proc] = []

    def start(
        self,
        name: str,
        *args: str,
        env: dict[str, str | None] | None = None,
        cwd: Path = REPO,
        prefix: tuple[str, ...] = (),
    ) -> Proc:
        proc = Proc(list(args), self.log_dir, name, {**self.env, **(env or {})}, cwd, prefix)
        self.started.append(proc)
        return proc

    def api(self, *extra: str, env: dict[str, str | None] | None = None) -> tuple[Proc, str]:
        port = free_port()
        proc = self.start(
            "api",
            "api",
            "--port",
            str(port),
            "--handlers",
            "tests.support.handlers",
            *extra,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", proc)
        return proc, url

    def worker(self, name: str, *extra: str) -> Proc:
        return self.start(
            name,
            "worker",
            "--handlers",
            "tests.support.handlers",
            "--poll-interval",
            "0.05",
            *extra,
        )

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()

    def dump(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()[-4000:]}" for p in self.started)


def wait_for_http(url: str, proc: Proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited early:\n{proc.output()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s:\n{proc.output()}")
