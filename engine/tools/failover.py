"""`tasklease chaos --failover`: PostgreSQL failover under load, with pg_auto_failover.

A monitor, a primary and a synchronous secondary (pg_auto_failover 2, Debian's
`postgresql-15-auto-failover` and `pg-auto-failover-cli`) on loopback ports, run as the
`postgres` user with their data, configuration and state under a temporary directory. The
API and workers (real processes) use a multi-host DSN with `target_session_attrs=read-write`,
and tasks are submitted through the API at a steady rate (idempotency keys, retried until
acknowledged). Then `pg_autoctl perform failover`, and later a SIGKILL of the whole primary
node (its pg_autoctl and PostgreSQL). After each, recovery is timed: from the fault until a
task submitted after it has been completed. At the end the queue drains and the chaos checks
run (engine/tools/chaos.py): no acknowledged task lost, none completed twice. Everything started is
stopped and the directory removed, whatever happens. Root only (it runs as `postgres`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tasklease import schema
from tasklease.engine.store import TRANSIENT_ERRORS
from tasklease.engine.tools import chaos
from tasklease.engine.tools.cluster import Cluster

PG_BIN = Path("/usr/lib/postgresql/15/bin")
# The monitor's health checks, shortened so that a dead primary is noticed in seconds
# (defaults: unhealthy after 20 s, a primary that does not answer demoted after 30 s).
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "1000",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "500",
    "pgautofailover.node_considered_unhealthy_timeout": "3000",
    "pgautofailover.primary_demote_timeout": "5000",
    "pgautofailover.startup_grace_period": "3000",
}


def missing() -> str | None:
    """Why this cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (pg_auto_failover runs as the postgres user)"
    if shutil.which("pg_autoctl") is None:
        return "no pg_autoctl (apt-get install postgresql-15-auto-failover pg-auto-failover-cli)"
    if not (PG_BIN / "pg_ctl").exists():
        return f"no PostgreSQL 15 in {PG_BIN}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Formation:
    """A pg_auto_failover monitor and two nodes on this machine, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.monitor_port = free_port()
        self.ports = {"node1": free_port(), "node2": free_port()}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_DATA_HOME": str(root / "share"),
            "XDG_RUNTIME_DIR": str(root / "run"),
            "PATH": f"{PG_BIN}:{os.environ.get('PATH', '')}",
            "PG_CONFIG": str(PG_BIN / "pg_config"),
        }

    @property
    def monitor_uri(self) -> str:
        return f"postgresql://autoctl_node@127.0.0.1:{self.monitor_port}/pg_auto_failover?sslmode=disable"

    def dsn(self, user: str = "postgres", database: str = "tasklease") -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports.values())
        return f"postgresql://{user}@{hosts}/{database}?target_session_attrs=read-write"

    def _autoctl(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        return subprocess.Popen(
            ["pg_autoctl", *args],
            env=self.env,
            user="postgres",
            group="postgres",
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _run_sync(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            ["pg_autoctl", *args],
            env=self.env,
            user="postgres",
            group="postgres",
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"pg_autoctl {' '.join(args)}: {out.stderr.strip()[-2000:]}")
        return out.stdout

    def start(self, timeout: float = 120) -> None:
        for sub in ("config", "share", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, "postgres", "postgres")
        for sub in ("config", "share", "run"):
            shutil.chown(self.root / sub, "postgres", "postgres")
        common = ["--auth", "trust", "--no-ssl", "--hostname", "127.0.0.1"]
        common += ["--pgctl", str(PG_BIN / "pg_ctl")]
        self.procs["monitor"] = self._autoctl(
            "monitor",
            "create",
            "monitor",
            "--pgdata",
            str(self.root / "monitor"),
            "--pgport",
            str(self.monitor_port),
            *common,
            "--run",
        )
        self._wait(lambda: self._monitor_ready(), timeout, "the monitor")
        self._tune_monitor()
        for name in ("node1", "node2"):
            self.procs[name] = self._autoctl(
                name,
                "create",
                "postgres",
                "--pgdata",
                str(self.root / name),
                "--pgport",
                str(self.ports[name]),
                "--name",
                name,
                "--dbname",
                "tasklease",
                "--monitor",
                self.monitor_uri,
                *common,
                "--run",
            )
            want = {"single"} if name == "node1" else {"secondary"}
            self._wait(
                lambda n=name, w=want: self.node_state(n) in w, timeout, f"{name} to be ready"
            )
            if name == "node1":
                # the secondary's pg_basebackup asks for a spread checkpoint, which takes
                # a minute and a half at the defaults: let checkpoints run at full speed
                self._psql(
                    self.ports[name],
                    "postgres",
                    "ALTER SYSTEM SET checkpoint_completion_target = 0",
                    "SELECT pg_reload_conf()",
                )
        self._wait(
            lambda: (
                {self.node_state("node1"), self.node_state("node2")} == {"primary", "secondary"}
            ),
            timeout,
            "a primary and a secondary",
        )

    def _monitor_ready(self) -> bool:
        out = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.monitor_port)],
            check=False,
        )
        if out.returncode != 0:
            return False
        try:
            self._run_sync("show", "state", "--pgdata", str(self.root / "monitor"), timeout=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def _tune_monitor(self) -> None:
        settings = [f"ALTER SYSTEM SET {k} = '{v}'" for k, v in MONITOR_SETTINGS.items()]
        self._psql(self.monitor_port, "pg_auto_failover", *settings, "SELECT pg_reload_conf()")

    def _psql(self, port: int, dbname: str, *statements: str) -> None:
        psql = [str(PG_BIN / "psql"), "-qAt", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        for statement in statements:
            subprocess.run(
                [*psql, "-d", dbname, "-c", statement],
                env=self.env,
                user="postgres",
                check=True,
                capture_output=True,
                timeout=10,
            )

    def state(self) -> list[dict[str, Any]]:
        out = self._run_sync(
            "show", "state", "--json", "--pgdata", str(self.root / "monitor"), timeout=10
        )
        rows: list[dict[str, Any]] = json.loads(out)
        return rows

    def node_state(self, name: str) -> str | None:
        try:
            rows = self.state()
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError):
            return None
        for row in rows:
            if row.get("nodename") == name and row.get("current_group_state") == row.get(
                "assigned_group_state"
            ):
                return str(row["current_group_state"])
        return None

    def primary(self) -> str | None:
        for name in self.ports:
            if self.node_state(name) in ("primary", "wait_primary", "single"):
                return name
        return None

    @staticmethod
    def _wait(check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        raise RuntimeError(f"pg_auto_failover: timed out waiting for {what}")

    def perform_failover(self) -> None:
        self._run_sync("perform", "failover", "--pgdata", str(self.root / "monitor"), timeout=120)

    def kill(self, name: str) -> None:
        """SIGKILL the node's pg_autoctl and PostgreSQL (its process group), as a lost host."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pid_file = self.root / name / "postmaster.pid"
        if pid_file.exists():  # the postmaster, were it in a group of its own
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)

    def stop(self, keep_logs: Path | None = None) -> None:
        """Stop everything and remove the directory, whatever state it is in (its pg_autoctl
        logs copied to `keep_logs` first)."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for name in ("node1", "node2", "monitor"):
            pid_file = self.root / name / "postmaster.pid"
            if pid_file.exists():
                subprocess.run(
                    [str(PG_BIN / "pg_ctl"), "stop", "-m", "immediate", "-D", str(pid_file.parent)],
                    user="postgres",
                    capture_output=True,
                    check=False,
                    timeout=30,
                )
        if keep_logs is not None:
            for log in self.root.glob("*.log"):
                shutil.copy(log, keep_logs / f"pg_autoctl-{log.name}")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class FailoverConfig:
    rate: float = 40.0  # tasks submitted per second, all along
    before: float = 8.0  # seconds of load before the switchover
    between: float = 15.0  # seconds from the switchover to the kill
    # seconds of load after recovering from the kill: longer than the claims' backoff (10 s),
    # so that every worker is back at work by its end
    after: float = 15.0
    workers: int = 2
    concurrency: int = 10
    lease_seconds: float = 10.0
    recover_timeout: float = 120.0


@dataclass
class FailoverReport:
    chaos: chaos.ChaosReport = field(default_factory=chaos.ChaosReport)
    recovery: dict[str, float] = field(default_factory=dict)  # fault -> seconds
    failover_command_seconds: float = 0.0  # how long `pg_autoctl perform failover` took
    processes_exited: int = 0
    workers_completing_after_kill: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.chaos.ok

    def lines(self) -> list[str]:
        out = [f"{'recovery after ' + k:>40}: {v:.1f}s" for k, v in self.recovery.items()]
        out.append(
            f"{'pg_autoctl perform failover took':>40}: {self.failover_command_seconds:.1f}s"
        )
        out.append(f"{'processes that exited':>40}: {self.processes_exited}")
        out.append(
            f"{'workers completing after the kill':>40}: {self.workers_completing_after_kill}"
        )
        return out + self.chaos.lines()


class _Reader:
    """A connection for the harness's own reads that reconnects (multi-host DSN)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        for _ in range(300):
            try:
                if self.conn is None or self.conn.is_closed():
                    self.conn = await asyncpg.connect(self.dsn, timeout=5)
                return await self.conn.fetchval(sql, *args)
            except (*TRANSIENT_ERRORS, asyncpg.PostgresError):
                self.conn = None
                await asyncio.sleep(0.2)
        raise RuntimeError("the database did not come back in a minute")

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close()


async def run(config: FailoverConfig, log_dir: Path, say: Any = print) -> FailoverReport:
    report = FailoverReport()
    root = Path(tempfile.mkdtemp(prefix="tasklease-failover-"))
    os.chmod(root, 0o755)
    formation = Formation(root)
    cluster: Cluster | None = None
    reader: _Reader | None = None
    try:
        say("starting pg_auto_failover: monitor, primary, synchronous secondary")
        await asyncio.to_thread(formation.start)
        dsn = formation.dsn()
        await schema.upgrade(dsn)
        reader = _Reader(dsn)
        await reader.fetchval(chaos.EXECUTIONS)
        cluster = Cluster(dsn, log_dir, "tasklease.engine.tools.chaos", log_level="warning")
        url = cluster.api()
        for _ in range(config.workers):
            cluster.worker(
                "--concurrency", str(config.concurrency), "--lease-seconds",
                str(config.lease_seconds), "--poll-interval", "0.2",
            )  # fmt: skip
        await chaos._wait_api(url)
        rng = random.Random(7)
        async with httpx.AsyncClient(base_url=url) as http:
            load = _Load(http, rng, report.chaos, config.rate)
            loader = asyncio.create_task(load.run())
            try:
                say(f"load: {config.rate:.0f} tasks/s through the API on {dsn}")
                await asyncio.sleep(config.before)
                was = formation.primary()
                say(f"pg_autoctl perform failover (primary: {was})")
                began = time.monotonic()
                await asyncio.to_thread(formation.perform_failover)  # returns once done
                report.failover_command_seconds = time.monotonic() - began
                report.recovery["perform failover"] = await load.recovered(
                    began, config.recover_timeout
                )
                say(f"recovered in {report.recovery['perform failover']:.1f}s")
                await asyncio.sleep(config.between)
                victim = await asyncio.to_thread(formation.primary)
                if victim is None:
                    raise RuntimeError("no primary to kill")
                say(f"SIGKILL of the primary node {victim} (pg_autoctl and PostgreSQL)")
                killed_at = time.time()
                began = time.monotonic()
                await asyncio.to_thread(formation.kill, victim)
                report.recovery["SIGKILL of the primary"] = await load.recovered(
                    began, config.recover_timeout
                )
                say(f"recovered in {report.recovery['SIGKILL of the primary']:.1f}s")
                await asyncio.sleep(config.after)
            finally:
                load.stop = True
                await loader
        say("load stopped; waiting for the queue to drain")
        left = await _drain(reader, config.recover_timeout)
        if left:
            report.problems.append(f"{left} tasks not finished")
        report.workers_completing_after_kill = await reader.fetchval(
            "SELECT count(DISTINCT worker) FROM task_transitions WHERE trigger = 'complete' "
            "AND at > to_timestamp($1)",
            killed_at,
        )
        assert reader.conn is not None
        await chaos._verify(reader.conn, report.chaos, {})
        report.processes_exited = sum(
            p.poll() is not None for p in cluster.workers + cluster.others
        )
        if report.processes_exited:
            report.problems.append(f"{report.processes_exited} tasklease processes exited")
        if report.workers_completing_after_kill < config.workers:
            report.problems.append(
                f"only {report.workers_completing_after_kill} of {config.workers} workers "
                "completed tasks after the kill"
            )
    finally:
        if reader is not None:
            await reader.close()
        if cluster is not None:
            cluster.stop()
        await asyncio.to_thread(formation.stop, log_dir)
    return report


async def _drain(reader: _Reader, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        left: int = await reader.fetchval(
            "SELECT count(*) FROM tasks WHERE state IN ('PENDING', 'FAILED', 'RUNNING')"
        )
        if left == 0 or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.5)


class _Load:
    """Batches of tasks through the API, `rate` a second; each batch retried until the API
    acknowledges it (201), with the same idempotency keys."""

    def __init__(
        self, http: httpx.AsyncClient, rng: random.Random, report: chaos.ChaosReport, rate: float
    ) -> None:
        self.http, self.rng, self.report, self.rate = http, rng, report, rate
        self.stop = False
        self.next = 0

    async def run(self) -> None:
        batch = max(1, int(self.rate / 5))
        while not self.stop:
            started = time.monotonic()
            await chaos._submit(self.http, self.next, batch, self.rng, self.report, 2, 20)
            self.next += batch
            await asyncio.sleep(max(0.0, batch / self.rate - (time.monotonic() - started)))

    async def recovered(self, since: float, timeout: float) -> float:
        """Seconds from `since` until a task submitted after it was completed."""
        probe = f"probe-{since}"
        body = {"action": chaos.ACTION, "payload": {"ms": 1}, "idempotency_key": probe}
        deadline = since + timeout
        task_id = None
        while time.monotonic() < deadline:
            try:
                if task_id is None:
                    r = await self.http.post("/tasks", json=body, timeout=5)
                    if r.status_code in (200, 201):
                        task_id = r.json()["id"]
                        self.report.tasks += 1
                else:
                    r = await self.http.get(f"/tasks/{task_id}", timeout=5)
                    if r.status_code == 200 and r.json()["state"] == "COMPLETED":
                        return time.monotonic() - since
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"not recovered within {timeout:.0f}s")
