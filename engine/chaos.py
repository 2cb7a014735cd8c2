"""`tasklease chaos`: real API and worker processes on a fresh database, under fire.

Tasks are submitted through the API (batches with idempotency keys, retried on any
error), handled by `chaos_probe` (sleeps a few to tens of milliseconds and records one
row per execution), while a chaos loop SIGKILLs a random worker every fraction of a
second and starts a replacement, and optionally cuts every tasklease database
connection. Then it stops the chaos, waits for the queue to drain, and checks what the
engine promises: no task lost, none completed twice, every task executed at least once,
and no two executions of one task at once while their workers were alive (an execution
ends when its handler returns or its worker is killed; times are this machine's clock).

The test suite runs a short round (tests/chaos/); a soak is
`tasklease chaos --minutes 10 --workers 6`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tasklease import schema
from tasklease.engine import database
from tasklease.engine.cluster import Cluster
from tasklease.engine.database import with_database
from tasklease.engine.registry import TaskContext, handler

log = logging.getLogger("tasklease.chaos")
ACTION = "chaos_probe"
EXECUTIONS = """
CREATE TABLE IF NOT EXISTS chaos_executions (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id bigint NOT NULL,
    attempt integer NOT NULL,
    worker  text NOT NULL,
    at      timestamptz NOT NULL,
    finished_at timestamptz  -- NULL: its worker was killed while it ran
)"""

_pool: asyncpg.Pool | None = None


@handler(ACTION, max_attempts=100, backoff=[0.2])
async def chaos_probe(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Record this execution, sleep for payload["ms"] milliseconds, record its end."""
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(
            os.environ["DATABASE_URL"], min_size=1, max_size=4, **database.connect_options()
        )
    run = await _pool.fetchval(
        "INSERT INTO chaos_executions (task_id, attempt, worker, at) "
        "VALUES ($1, $2, $3, to_timestamp($4)) RETURNING id",
        ctx.task_id,
        ctx.attempt,
        ctx.worker,
        time.time(),
    )
    try:
        await asyncio.sleep(payload.get("ms", 10) / 1000)
    finally:  # stopped too (cancelled: lease lost, fenced, released)
        await _pool.execute(
            "UPDATE chaos_executions SET finished_at = to_timestamp($2) WHERE id = $1",
            run,
            time.time(),
        )
    return {"attempt": ctx.attempt}


@dataclass
class ChaosConfig:
    tasks: int = 1000  # submitted up front
    rate: float = 0.0  # further tasks per second while the chaos lasts
    seconds: float = 10.0  # how long the chaos lasts
    workers: int = 3
    concurrency: int = 10
    lease_seconds: float = 2.0
    kill_every: float = 0.3
    terminate_every: float = 0.0  # 0: never cut database connections
    sleep_ms: tuple[int, int] = (2, 40)
    drain_timeout: float = 120.0
    seed: int | None = None


@dataclass
class ChaosReport:
    tasks: int = 0
    kills: int = 0
    connection_cuts: int = 0
    submit_retries: int = 0
    executions: int = 0
    extra_executions: int = 0
    overlapping_executions: int = 0  # of one task at once, while both workers were alive
    reclaims: int = 0
    completed: int = 0
    lost: int = 0
    double_completions: int = 0
    never_executed: int = 0
    dead: int = 0
    running_with_live_lease: int = 0
    duplicate_tasks: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        d = asdict(self)
        d.pop("problems")
        return [
            f"{k.replace('_', ' '):>24}: {v:.1f}"
            if isinstance(v, float)
            else f"{k.replace('_', ' '):>24}: {v}"
            for k, v in d.items()
        ]


def start_worker(cluster: Cluster, config: ChaosConfig) -> None:
    cluster.worker(
        "--concurrency",
        str(config.concurrency),
        "--lease-seconds",
        str(config.lease_seconds),
        "--poll-interval",
        "0.05",
        "--grace-seconds",
        "5",
    )


async def _submit(
    http: httpx.AsyncClient,
    start: int,
    count: int,
    rng: random.Random,
    report: ChaosReport,
    low: int,
    high: int,
) -> None:
    """Submit tasks start..start+count with idempotency keys; retry until the API has them."""
    body = {
        "tasks": [
            {
                "payload": {"action": ACTION, "ms": rng.randint(low, high)},
                "idempotency_key": f"chaos-{i}",
            }
            for i in range(start, start + count)
        ]
    }
    for attempt in range(600):
        try:
            r = await http.post("/tasks/batch", json=body, timeout=30)
            if r.status_code == 201:
                report.tasks += count
                return
            if r.status_code < 500:
                raise RuntimeError(f"the API refused a chaos batch: {r.status_code} {r.text}")
        except httpx.HTTPError:
            pass
        report.submit_retries += 1
        await asyncio.sleep(min(0.1 * (attempt + 1), 1.0))
    raise RuntimeError("the API did not accept a batch in 10 minutes")


async def _wait_api(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(f"{url}/readyz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the API at {url} did not become ready")


async def run(
    admin_dsn: str,
    config: ChaosConfig,
    log_dir: Path,
    *,
    progress: Any = None,
    keep_database: bool = False,
) -> ChaosReport:
    """One chaos run on a database of its own (created here, dropped at the end)."""
    say = progress or (lambda line: log.info("%s", line))
    rng = random.Random(config.seed)
    report = ChaosReport()
    name = f"tasklease_chaos_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = with_database(admin_dsn, name)
    cluster = Cluster(dsn, log_dir, "tasklease.engine.chaos")
    killed: dict[int, float] = {}  # worker pid -> when it was killed (time.time())
    began = time.monotonic()
    try:
        await schema.upgrade(dsn)
        conn = await asyncpg.connect(dsn)
        await conn.execute(EXECUTIONS)
        url = cluster.api()
        for _ in range(config.workers):
            start_worker(cluster, config)
        await _wait_api(url)
        low, high = config.sleep_ms
        async with httpx.AsyncClient(base_url=url) as http:
            for start in range(0, config.tasks, 500):
                await _submit(http, start, min(500, config.tasks - start), rng, report, low, high)
            say(
                f"submitted {report.tasks} tasks; chaos for {config.seconds:.0f}s with "
                f"{config.workers} workers"
            )
            await _chaos(cluster, http, conn, config, rng, report, say, killed)
        say("chaos over; waiting for the queue to drain")
        await _drain(conn, config, say)
        await _verify(conn, report, killed)
        await conn.close()
    finally:
        cluster.stop()
        report.seconds = time.monotonic() - began
        if not keep_database:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    return report


async def _chaos(
    cluster: Cluster,
    http: httpx.AsyncClient,
    conn: asyncpg.Connection,
    config: ChaosConfig,
    rng: random.Random,
    report: ChaosReport,
    say: Any,
    killed: dict[int, float],
) -> None:
    end = time.monotonic() + config.seconds
    next_kill = time.monotonic() + config.kill_every
    next_cut = time.monotonic() + (config.terminate_every or float("inf"))
    next_submit, next_line, submitted = time.monotonic(), time.monotonic() + 5, config.tasks
    while (now := time.monotonic()) < end:
        if config.kill_every and now >= next_kill:
            victim = rng.choice([p for p in cluster.workers if p.poll() is None])
            cluster.kill(victim)
            killed[victim.pid] = time.time()
            start_worker(cluster, config)
            report.kills += 1
            next_kill = now + config.kill_every * rng.uniform(0.5, 1.5)
        if now >= next_cut:
            cut = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name = 'tasklease'"
            )
            report.connection_cuts += 1
            next_cut = now + config.terminate_every
            log.debug("cut %d connections", cut)
        if config.rate and now >= next_submit:
            batch = max(1, int(config.rate))
            await _submit(http, submitted, batch, rng, report, *config.sleep_ms)
            submitted += batch
            next_submit = now + 1.0
        if now >= next_line:
            done = await conn.fetchval("SELECT count(*) FROM tasks WHERE state = 'COMPLETED'")
            say(
                f"{now - end + config.seconds:5.0f}s: {report.tasks} submitted, {done} completed,"
                f" {report.kills} workers killed, {report.connection_cuts} connection cuts"
            )
            next_line = now + 5
        await asyncio.sleep(0.02)


async def _drain(conn: asyncpg.Connection, config: ChaosConfig, say: Any) -> None:
    deadline = time.monotonic() + config.drain_timeout
    while time.monotonic() < deadline:
        left = await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE state IN ('PENDING', 'FAILED', 'RUNNING')"
        )
        if left == 0:
            return
        await asyncio.sleep(0.2)
    say(f"the queue did not drain in {config.drain_timeout:.0f}s")


def overlaps(runs: list[tuple[float, float]]) -> int:
    """How many runs began before an earlier run of the same task had ended."""
    n, ended = 0, float("-inf")
    for began, end in sorted(runs):
        n += began < ended
        ended = max(ended, end)
    return n


def worker_pid(worker: str) -> int:
    """The pid in a worker id, host:pid.xxxx (engine.reporting.process_id)."""
    return int(worker.rpartition(":")[2].partition(".")[0])


async def _verify(conn: asyncpg.Connection, report: ChaosReport, killed: dict[int, float]) -> None:
    row = await conn.fetchrow("""
        SELECT count(*) AS tasks,
               count(*) FILTER (WHERE state = 'COMPLETED') AS completed,
               count(*) FILTER (WHERE state = 'DEAD') AS dead,
               count(*) FILTER (WHERE state = 'RUNNING' AND lease_expires_at > now()) AS live,
               count(DISTINCT idempotency_key) AS keys
        FROM tasks""")
    report.completed, report.dead = row["completed"], row["dead"]
    report.running_with_live_lease = row["live"]
    report.lost = report.tasks - row["completed"]
    report.duplicate_tasks = row["tasks"] - row["keys"]
    report.double_completions = await conn.fetchval(
        "SELECT count(*) FROM (SELECT task_id FROM task_transitions WHERE trigger = 'complete' "
        "GROUP BY task_id HAVING count(*) > 1) d"
    )
    report.reclaims = await conn.fetchval(
        "SELECT count(*) FROM task_transitions WHERE trigger = 'reclaim'"
    )
    report.executions = await conn.fetchval("SELECT count(*) FROM chaos_executions")
    runs: dict[int, list[tuple[float, float]]] = {}
    for r in await conn.fetch(
        "SELECT task_id, worker, extract(epoch FROM at)::float8 AS began, "
        "extract(epoch FROM finished_at)::float8 AS ended FROM chaos_executions"
    ):
        ended = r["ended"] if r["ended"] is not None else killed.get(worker_pid(r["worker"]))
        if ended is not None:  # else its worker ended otherwise, when is not known
            runs.setdefault(r["task_id"], []).append((r["began"], ended))
    report.overlapping_executions = sum(overlaps(spans) for spans in runs.values())
    report.extra_executions = report.executions - row["tasks"]
    report.never_executed = await conn.fetchval(
        "SELECT count(*) FROM tasks t WHERE NOT EXISTS "
        "(SELECT FROM chaos_executions e WHERE e.task_id = t.id)"
    )
    checks = {
        "lost": report.lost,
        "double completions": report.double_completions,
        "never executed": report.never_executed,
        "dead": report.dead,
        "running with a live lease": report.running_with_live_lease,
        "duplicate tasks": report.duplicate_tasks,
        "overlapping executions": report.overlapping_executions,
    }
    report.problems = [f"{what}: {n}" for what, n in checks.items() if n]
    if row["tasks"] != report.tasks:
        report.problems.append(f"{report.tasks} submitted but {row['tasks']} stored")
