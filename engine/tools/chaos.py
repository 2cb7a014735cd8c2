"""`tasklease chaos`: real API and worker processes on a fresh database, under fire.

Tasks are submitted through the API (batches with idempotency keys, retried on any
error), handled by `chaos_probe` (sleeps a few to tens of milliseconds and records one
row per execution), while a chaos loop SIGKILLs a random worker every fraction of a
second and starts a replacement, and optionally cuts every tasklease database
connection. Then it stops the chaos, waits for the queue to drain, and checks what the
engine promises: no task lost, none completed twice, every task executed at least once,
and no two executions of one task at once while their workers were alive (an execution
ends when its handler returns or its worker is killed; times are this machine's clock).

With `hosts` (`tasklease chaos --hosts N`, root only) the database, the API and the
workers run on hosts of their own, network namespaces joined by veth links
(engine/tools/netns.py): the database on a PostgreSQL server started for the run and reached
over TCP, the workers placed on N hosts in turn, and every `link_fault_every` seconds
(seeded) a worker host's link is cut for a while, without a word, or given delay and loss.
Runs are then recorded in a file (start and end lines, this machine's clock, written by the
handler itself), since a cut-off worker cannot reach the database to say when its handler
stopped.

With `graphs` (`tasklease chaos --graphs N`), N workflows are submitted too: each a diamond
(a -> [b, c] -> d) with a fan-in task (on_finish), docs/workflows.md. Then it also checks
that no dependant was claimed before every dependency had completed, that none is left
WAITING, and that each waiting task became ready exactly once (the fan-in too).

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
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx

from tasklease import schema
from tasklease.engine import database
from tasklease.engine.database import with_database
from tasklease.engine.registry import TaskContext, handler
from tasklease.engine.tools.cluster import Cluster

if TYPE_CHECKING:
    from tasklease.engine.tools.netns import Host

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

RUNS_ENV = "TASKLEASE_CHAOS_RUNS"  # a file: runs are recorded there, not in the database
_pool: asyncpg.Pool | None = None


def _run_line(path: str, ctx: TaskContext, what: str) -> None:
    with open(path, "a") as f:
        f.write(f"{what} {ctx.task_id} {ctx.attempt} {ctx.worker} {time.time():.6f}\n")


@handler(ACTION, max_attempts=100, backoff=[0.2])
async def chaos_probe(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Record this execution, sleep for payload["ms"] milliseconds, record its end."""
    global _pool
    runs_file = os.environ.get(RUNS_ENV)
    if runs_file:
        _run_line(runs_file, ctx, "start")
        try:
            await asyncio.sleep(payload.get("ms", 10) / 1000)
        finally:  # stopped too; written at once, whether the database is reachable or not
            _run_line(runs_file, ctx, "end")
        return {"attempt": ctx.attempt}
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
    hosts: int = 0  # worker hosts (network namespaces); 0: every process runs here
    link_fault_every: float = 0.0  # with hosts: a link fault this often, on average
    graphs: int = 0  # workflows (a diamond and a fan-in task each) submitted up front


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
    link_cuts: int = 0
    link_impairments: int = 0
    workflows: int = 0  # graphs submitted (a diamond and a fan-in task each)
    early_dependants: int = 0  # claimed before a dependency had completed
    stranded: int = 0  # left WAITING after the drain
    not_ready_once: int = 0  # waiting tasks that did not become ready exactly once
    self_fenced: int = 0  # handlers stopped, or worker processes ended, by self-fencing
    refused_outcomes: int = 0  # late outcomes refused by the token guard (workers' logs)
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


async def _submit_graph(
    http: httpx.AsyncClient, rng: random.Random, report: ChaosReport, low: int, high: int
) -> None:
    """One workflow: a -> [b, c] -> d, and a fan-in task. No idempotency keys (a graph takes
    none): a retried batch that had in fact been written is one more workflow, checked as any."""

    def task(ref: str, *after: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ref": ref,
            "payload": {"action": ACTION, "ms": rng.randint(low, high)},
        }
        if after:
            body["depends_on"] = list(after)
        return body

    body = {
        "tasks": [task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c")],
        "on_finish": {"payload": {"action": ACTION, "ms": rng.randint(low, high)}},
    }
    for attempt in range(600):
        try:
            r = await http.post("/tasks/batch", json=body, timeout=30)
            if r.status_code == 201:
                report.workflows += 1
                report.tasks += 5
                return
            if r.status_code < 500:
                raise RuntimeError(f"the API refused a chaos graph: {r.status_code} {r.text}")
        except httpx.HTTPError:
            pass
        report.submit_retries += 1
        await asyncio.sleep(min(0.1 * (attempt + 1), 1.0))
    raise RuntimeError("the API did not accept a graph in 10 minutes")


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
    """One chaos run on a database of its own (created here, dropped at the end). With
    `config.hosts`, on hosts of its own (`admin_dsn` is not used: the database host runs a
    server started for the run), all removed at the end."""
    if not config.hosts:
        return await _run(admin_dsn, config, log_dir, progress, keep_database, None)
    from tasklease.engine.tools import netns

    with netns.Network(wires=config.link_fault_every > 0) as net:
        pg = netns.Postgres(net.host("db", wire=False))
        api_host = net.host("api", wire=False)
        hosts = [net.host(f"h{i + 1}") for i in range(config.hosts)]
        return await _run(pg.dsn(), config, log_dir, progress, keep_database, (hosts, api_host))


async def _run(
    admin_dsn: str,
    config: ChaosConfig,
    log_dir: Path,
    progress: Any,
    keep_database: bool,
    placed: tuple[list[Host], Host] | None,
) -> ChaosReport:
    say = progress or (lambda line: log.info("%s", line))
    rng = random.Random(config.seed)
    report = ChaosReport()
    name = f"tasklease_chaos_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = with_database(admin_dsn, name)
    runs_file = log_dir / "runs" if placed else None
    hosts, api_host = placed or ([], None)
    cluster = Cluster(
        dsn,
        log_dir,
        "tasklease.engine.tools.chaos",
        hosts=hosts,
        api_host=api_host,
        env={RUNS_ENV: str(runs_file)} if runs_file else None,
    )
    killed: dict[int, float] = {}  # worker pid -> when it was killed (time.time())
    began = time.monotonic()
    try:
        await schema.upgrade(dsn)
        conn = await asyncpg.connect(dsn)
        await conn.execute(EXECUTIONS)
        url = cluster.api()
        for _ in range(max(config.workers, len(hosts))):
            start_worker(cluster, config)
        await _wait_api(url)
        low, high = config.sleep_ms
        async with httpx.AsyncClient(base_url=url) as http:
            for start in range(0, config.tasks, 500):
                await _submit(http, start, min(500, config.tasks - start), rng, report, low, high)
            for _ in range(config.graphs // 2):  # the other half while the chaos lasts
                await _submit_graph(http, rng, report, low, high)
            say(
                f"submitted {report.tasks} tasks; chaos for {config.seconds:.0f}s with "
                f"{config.workers} workers" + (f" on {len(hosts)} hosts" if hosts else "")
            )
            await _chaos(cluster, http, conn, config, rng, report, say, killed)
        say("chaos over; waiting for the queue to drain")
        await _drain(conn, config, say)
        await _verify(conn, report, killed, runs_file)
        await conn.close()
    finally:
        cluster.stop()
        _count_logs(log_dir, report)
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
    links = _LinkFaults(cluster.hosts, config, report)
    next_kill = time.monotonic() + config.kill_every
    next_cut = time.monotonic() + (config.terminate_every or float("inf"))
    next_submit, next_line, submitted = time.monotonic(), time.monotonic() + 5, config.tasks
    while (now := time.monotonic()) < end:
        if config.kill_every and now >= next_kill:
            live = [p for p in cluster.workers if p.poll() is None]
            if live:
                victim = rng.choice(live)
                cluster.kill(victim)
                killed[victim.pid] = time.time()
                report.kills += 1
            else:  # all ended by themselves (a worker exits when its start-up check fails)
                log.warning("no worker alive to kill; starting one")
            start_worker(cluster, config)
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
        if now >= next_submit:
            if config.rate:
                batch = max(1, int(config.rate))
                await _submit(http, submitted, batch, rng, report, *config.sleep_ms)
                submitted += batch
            # the graphs not submitted up front, spread over the chaos's seconds
            left = config.graphs - report.workflows
            for _ in range(-(-left // max(1, int(end - now)))):
                await _submit_graph(http, rng, report, *config.sleep_ms)
            next_submit = now + 1.0
        links.step(now)
        if now >= next_line:
            done = await conn.fetchval("SELECT count(*) FROM tasks WHERE state = 'COMPLETED'")
            say(
                f"{now - end + config.seconds:5.0f}s: {report.tasks} submitted, {done} completed,"
                f" {report.kills} workers killed, {report.connection_cuts} connection cuts"
                + (f", {report.link_cuts} link cuts" if cluster.hosts else "")
            )
            next_line = now + 5
        await asyncio.sleep(0.02)
    links.end()


class _LinkFaults:
    """Now and then (seeded) a worker host's link is cut, or delayed and made lossy, for a
    while; one fault per host at a time; `end()` heals them all."""

    def __init__(self, hosts: list[Host], config: ChaosConfig, report: ChaosReport) -> None:
        self.hosts, self.config, self.report = hosts, config, report
        # a generator of their own: which faults come, and in what order, depends on the
        # seed only (the run's generator is also drawn on by submissions, at their pace)
        self.rng = random.Random(None if config.seed is None else f"links-{config.seed}")
        self.every = config.link_fault_every if hosts else 0.0
        self.next = time.monotonic() + self.every
        self.active: dict[str, tuple[Host, str, float]] = {}

    def step(self, now: float) -> None:
        for name, (host, kind, until) in list(self.active.items()):
            if now >= until:
                host.heal() if kind == "cut" else host.clear()
                del self.active[name]
        if not self.every or now < self.next:
            return
        self.next = now + self.every * self.rng.uniform(0.5, 1.5)
        free = [h for h in self.hosts if h.name not in self.active]
        if not free:
            return
        host = self.rng.choice(free)
        lease = self.config.lease_seconds
        if host.wire_ends is None or self.rng.random() < 0.5:
            # from shorter than the lease (nothing to see) to three leases (taken over)
            host.cut()
            self.active[host.name] = (host, "cut", now + self.rng.uniform(0.3, 3.0) * lease)
            self.report.link_cuts += 1
        else:
            delay, loss = self.rng.uniform(5, 50), self.rng.uniform(0, 0.05)
            host.impair(delay, loss, seed=self.rng.randrange(1 << 30))
            self.active[host.name] = (host, "impair", now + self.rng.uniform(1.0, 3.0) * lease)
            self.report.link_impairments += 1
        log.debug("link fault on %s: %s", host.name, host.faults[-1])

    def end(self) -> None:
        for host, kind, _ in self.active.values():
            host.heal() if kind == "cut" else host.clear()
        self.active.clear()


def _count_logs(log_dir: Path, report: ChaosReport) -> None:
    """What the workers said: self-fencing, and late outcomes refused by the guard."""
    for path in log_dir.glob("worker-*.log"):
        text = path.read_text(errors="replace")
        report.self_fenced += text.count("(self-fencing)") + text.count(
            "ending this worker process (status 75)"
        )
        report.refused_outcomes += text.count("refused: the lease was lost")


async def _drain(conn: asyncpg.Connection, config: ChaosConfig, say: Any) -> None:
    deadline = time.monotonic() + config.drain_timeout
    while time.monotonic() < deadline:
        left = await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE state IN ('PENDING', 'FAILED', 'RUNNING', 'WAITING')"
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


def _file_runs(path: Path) -> dict[tuple[int, int, str], list[float]]:
    """(task, attempt, worker) -> [start, end] (end missing: its worker was killed)."""
    runs: dict[tuple[int, int, str], list[float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            what, task, attempt, worker, at = line.split()
            key = (int(task), int(attempt), worker)
            if what == "start":
                runs[key] = [float(at)]
            elif key in runs:
                runs[key].append(float(at))
    return runs


async def _verify(
    conn: asyncpg.Connection,
    report: ChaosReport,
    killed: dict[int, float],
    runs_file: Path | None = None,
) -> None:
    row = await conn.fetchrow("""
        SELECT count(*) AS tasks,
               count(*) FILTER (WHERE state = 'COMPLETED') AS completed,
               count(*) FILTER (WHERE state = 'DEAD') AS dead,
               count(*) FILTER (WHERE state = 'RUNNING' AND lease_expires_at > now()) AS live,
               count(DISTINCT idempotency_key) AS keys,
               count(*) FILTER (WHERE idempotency_key IS NOT NULL) AS keyed,
               count(*) FILTER (WHERE state = 'WAITING') AS waiting
        FROM tasks""")
    report.completed, report.dead = row["completed"], row["dead"]
    report.running_with_live_lease = row["live"]
    report.lost = report.tasks - row["completed"]
    report.duplicate_tasks = row["keyed"] - row["keys"]
    report.stranded = row["waiting"]
    # workflows: a dependant's first claim after each dependency's completion (history ids
    # are one identity: the claim's transaction began after the completion's committed)
    report.early_dependants = await conn.fetchval("""
        SELECT count(*) FROM task_dependencies d
        WHERE (SELECT min(id) FROM task_transitions
               WHERE task_id = d.task_id AND trigger = 'claim')
              < coalesce((SELECT max(id) FROM task_transitions
                          WHERE task_id = d.depends_on AND trigger = 'complete'),
                         9223372036854775807)""")
    report.not_ready_once = await conn.fetchval("""
        SELECT count(*) FROM tasks t WHERE t.dependencies > 0
          AND (SELECT count(*) FROM task_transitions
               WHERE task_id = t.id AND trigger = 'ready') <> 1""")
    report.double_completions = await conn.fetchval(
        "SELECT count(*) FROM (SELECT task_id FROM task_transitions WHERE trigger = 'complete' "
        "GROUP BY task_id HAVING count(*) > 1) d"
    )
    report.reclaims = await conn.fetchval(
        "SELECT count(*) FROM task_transitions WHERE trigger = 'reclaim'"
    )
    rows: list[tuple[int, int, str, float, float | None]]
    if runs_file is not None:
        found = _file_runs(runs_file)
        rows = [(t, a, w, se[0], se[1] if len(se) > 1 else None) for (t, a, w), se in found.items()]
        ids = {r["id"] for r in await conn.fetch("SELECT id FROM tasks")}
        report.never_executed = len(ids - {t for t, *_ in rows})
    else:
        rows = [
            (r["task_id"], r["attempt"], r["worker"], r["began"], r["ended"])
            for r in await conn.fetch(
                "SELECT task_id, attempt, worker, extract(epoch FROM at)::float8 AS began, "
                "extract(epoch FROM finished_at)::float8 AS ended FROM chaos_executions"
            )
        ]
        report.never_executed = await conn.fetchval(
            "SELECT count(*) FROM tasks t WHERE NOT EXISTS "
            "(SELECT FROM chaos_executions e WHERE e.task_id = t.id)"
        )
    report.executions = len(rows)
    # A run whose end was not recorded (its worker was killed, or the probe's own write of
    # its end failed in a connection cut) ended, at the latest, when its worker recorded
    # the attempt's outcome: the worker writes it only once the handler has returned (the
    # probe never completes its task in a transaction of its own, which would write it
    # before).
    outcomes = {
        (r["task_id"], r["attempt"], r["worker"]): r["at"]
        for r in await conn.fetch(
            "SELECT task_id, attempt, worker, extract(epoch FROM min(at))::float8 AS at "
            "FROM task_transitions WHERE trigger IN ('complete', 'fail', 'bury', "
            "'cancel_running') GROUP BY task_id, attempt, worker"
        )
    }
    runs: dict[int, list[tuple[float, float]]] = {}
    unended = 0
    for task_id, attempt, worker, began, finished in rows:
        bounds = [killed.get(worker_pid(worker)), outcomes.get((task_id, attempt, worker))]
        known = [b for b in bounds if b is not None]
        ended = finished if finished is not None else min(known) if known else None
        if ended is not None:  # else its worker ended otherwise, when is not known
            runs.setdefault(task_id, []).append((began, ended))
        else:
            unended += 1
    if unended:
        log.info("%d runs have no end: their worker ended otherwise, when is not known", unended)
    report.overlapping_executions = sum(overlaps(spans) for spans in runs.values())
    report.extra_executions = report.executions - row["tasks"]
    checks = {
        "lost": report.lost,
        "double completions": report.double_completions,
        "never executed": report.never_executed,
        "dead": report.dead,
        "running with a live lease": report.running_with_live_lease,
        "duplicate tasks": report.duplicate_tasks,
        "overlapping executions": report.overlapping_executions,
        "dependants claimed before a dependency completed": report.early_dependants,
        "tasks stranded WAITING": report.stranded,
        "waiting tasks not made ready exactly once": report.not_ready_once,
    }
    report.problems = [f"{what}: {n}" for what, n in checks.items() if n]
    if row["tasks"] != report.tasks:
        report.problems.append(f"{report.tasks} submitted but {row['tasks']} stored")
