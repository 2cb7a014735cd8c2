"""`tasklease bench`: throughput and latency, measured on a database of its own.

Scenarios (each on a fresh database, created and dropped here):

- drain:   N no-op tasks inserted in bulk (insert tasks/s), then W worker processes with
           concurrency C drain them: completed tasks/s from the first claim to the last
           completion, by the database clock;
- latency: idle workers; tasks due at a steady rate; start lag = handler start - due_at;
- submit:  tasks/s through the HTTP API, single POST /tasks from K concurrent clients, and
           POST /tasks/batch with batches of B;
- backlog: the drain again with 1,000,000 finished tasks (and their history) in the tables.
- limits:  the drain with global limits set far above the load (a queue limit and an action's
           global_limit; then a rate limit too; then per-key limits over 100 customers, one
           above the load and one near it), against the same drain without, in turns;
- retention: 1,000,000 finished tasks older than the retention age, deleted by one round
           while a drain runs beside it: deleted tasks/s and the drain's tasks/s.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx

from tasklease import schema
from tasklease.engine import database
from tasklease.engine.database import with_database
from tasklease.engine.queries import SQL
from tasklease.engine.registry import TaskContext, handler
from tasklease.engine.retention import Retention, RetentionConfig
from tasklease.engine.store import Edge, Limit, NewTask, Store
from tasklease.engine.tools.cluster import Cluster

Say = Callable[[str], None]


@handler("bench_probe")
async def bench_probe(ctx: TaskContext, payload: dict[str, Any]) -> float:
    """No work; returns when it started (epoch seconds), for the latency scenario."""
    return time.time()


@dataclass
class BenchConfig:
    tasks: int = 20_000
    workers: int = 2
    concurrency: int = 100
    latency_rate: float = 100.0
    latency_seconds: float = 15.0
    submit_clients: int = 16
    submit_seconds: float = 10.0
    batch_size: int = 1000
    backlog: int = 1_000_000
    limit_rounds: int = 8
    scenarios: tuple[str, ...] = ("drain", "latency", "submit", "backlog", "limits", "retention")


@dataclass
class BenchResult:
    environment: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = [(k, _fmt(v)) for k, v in self.figures.items()]
        width = max((len(k) for k, _ in rows), default=10)
        env = "\n".join(f"  {k}: {v}" for k, v in self.environment.items())
        return "environment:\n" + env + "\n\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown"
    )


async def environment(dsn: str) -> dict[str, Any]:
    conn = await database.connect(dsn, "tasklease-bench")
    try:
        settings = {
            r["name"]: r["setting"]
            for r in await conn.fetch(
                "SELECT name, setting FROM pg_settings WHERE name = ANY($1)",
                ["shared_buffers", "synchronous_commit", "fsync", "max_connections", "wal_level"],
            )
        }
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    cpu = _cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    where = urlsplit(dsn)
    return {
        "machine": f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.platform()}",
        "python": platform.python_version(),
        "postgresql": f"{version} on {'a Unix socket' if 'host=/' in dsn else where.hostname}",
        "postgresql settings": ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
    }


class Database:
    """A fresh, migrated database for one scenario."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.name = f"tasklease_bench_{uuid.uuid4().hex[:10]}"
        self.dsn = with_database(admin_dsn, self.name)

    async def __aenter__(self) -> Database:
        conn = await database.connect(self.admin_dsn, "tasklease-bench")
        try:
            await conn.execute(f"CREATE DATABASE {self.name}")
        finally:
            await conn.close()
        await schema.upgrade(self.dsn)
        return self

    async def __aexit__(self, *exc: object) -> None:
        conn = await database.connect(self.admin_dsn, "tasklease-bench")
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        finally:
            await conn.close()


async def _insert(
    dsn: str, n: int, action: str = "noop", payload: Callable[[int], str] | None = None
) -> float:
    """Bulk insert n tasks through Store.submit_many (the i-th with `payload(i)`, else an
    empty payload); returns tasks/s."""
    store = await Store.connect(dsn, min_size=1, max_size=1)
    try:
        began = time.perf_counter()
        for start in range(0, n, 5000):
            await store.submit_many(
                [
                    NewTask(action, payload(i) if payload else "{}")
                    for i in range(start, min(start + 5000, n))
                ]
            )
        rate = n / (time.perf_counter() - began)
        # What autovacuum would do soon after a bulk load: statistics for the planner.
        await store.pool.execute("ANALYZE tasks")
        return rate
    finally:
        await store.close()


async def _insert_diamonds(dsn: str, n: int, action: str = "noop") -> float:
    """n tasks as n/4 diamonds (a -> [b, c] -> d, docs/workflows.md), 100 diamonds a
    statement (task_submit_graph, one workflow each statement); returns tasks/s."""
    store = await Store.connect(dsn, min_size=1, max_size=1)
    try:
        began = time.perf_counter()
        for start in range(0, n // 4, 100):
            k = min(100, n // 4 - start)
            edges = [
                Edge(4 * i + dependant, 4 * i + on, None)
                for i in range(k)
                for dependant, on in ((1, 0), (2, 0), (3, 1), (3, 2))
            ]
            await store.submit_graph(
                [NewTask(action, "{}") for _ in range(4 * k)], edges, workflow=True
            )
        rate = n / (time.perf_counter() - began)
        await store.pool.execute("ANALYZE tasks")
        await store.pool.execute("ANALYZE task_dependencies")
        return rate
    finally:
        await store.close()


def _cpu_busy() -> float:
    """CPU seconds the machine has spent busy (user, system, interrupts; not idle, waiting
    for I/O, or stolen by the hypervisor): a cost that a noisy neighbour hardly moves."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = map(int, stat.read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


async def _wait_done(
    conn: asyncpg.Connection,
    n: int,
    say: Say,
    what: str,
    after_id: int = 0,
    procs: Cluster | None = None,
) -> float:
    """Until n tasks with ids above `after_id` are completed (an index range, so the polling
    costs the same beside a million finished tasks), or a worker dies. Returns the CPU time
    the machine spent (every process: database, workers, this one) per task completed from
    the first completion seen to the last, in microseconds (0 where /proc/stat is missing)."""
    last = time.monotonic()
    began: tuple[int, float] | None = None
    while True:
        if procs is not None:
            procs.check()
        done = await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE id > $1 AND state = 'COMPLETED'", after_id
        )
        if began is None and done:
            began = (done, _cpu_busy())
        if done >= n:
            if began is None or done == began[0]:
                return 0.0
            return 1e6 * (_cpu_busy() - began[1]) / (done - began[0])
        if time.monotonic() - last > 2:
            say(f"  {what}: {done:,}/{n:,} completed")
            last = time.monotonic()
        await asyncio.sleep(0.2)


async def drain(
    admin_dsn: str,
    config: BenchConfig,
    log_dir: Path,
    say: Say,
    backlog: int = 0,
    action: str = "noop",
    worker_args: tuple[str, ...] = (),
    beside: Callable[[str], Any] | None = None,
    limits: Sequence[Limit] = (),
    diamonds: bool = False,
    payload: Callable[[int], str] | None = None,
) -> dict[str, float]:
    """`beside(dsn)`, if given, is started with the workers and awaited after the drain.
    `diamonds`: the tasks are inserted as diamonds of 4 (a -> [b, c] -> d), not alone.
    `limits` are written before the workers start (as a deployment has them long before its
    workers do; a worker then finds its declarations already written)."""
    async with Database(admin_dsn) as db:
        conn = await database.connect(db.dsn, "tasklease-bench")
        try:
            if backlog:
                say(f"  writing {backlog:,} finished tasks and their history")
                await _backlog(conn, backlog)
            after_id = await conn.fetchval("SELECT coalesce(max(id), 0) FROM tasks")
            if diamonds:
                insert_rate = await _insert_diamonds(db.dsn, config.tasks, action)
            else:
                insert_rate = await _insert(db.dsn, config.tasks, action, payload)
            for limit in limits:
                await conn.execute(
                    SQL["limit_set"], limit.key, limit.value, limit.per_seconds, True, limit.by
                )
            if limits:  # what autovacuum would do to the new tokens, done before the drain
                await conn.execute("VACUUM ANALYZE limit_tokens")
                await conn.execute("VACUUM ANALYZE limit_key_tokens")
            # Start both drains from a clean slate: no checkpoint still writing out the load.
            await conn.execute("CHECKPOINT")
            say(
                f"  inserted {config.tasks:,} tasks ({insert_rate:,.0f}/s); draining with "
                f"{config.workers} workers x concurrency {config.concurrency}"
            )
            procs = Cluster(db.dsn, log_dir, "tasklease.engine.tools.bench", log_level="warning")
            for _ in range(config.workers):
                procs.worker("--concurrency", str(config.concurrency), *worker_args)
            side = asyncio.ensure_future(beside(db.dsn)) if beside else None
            try:
                cpu = await _wait_done(conn, config.tasks, say, "drain", after_id, procs)
            finally:
                procs.stop()
            extra = await side if side else {}
            first, last = await conn.fetchrow(
                "SELECT min(at) FILTER (WHERE trigger = 'claim'), "
                "max(at) FILTER (WHERE trigger = 'complete') FROM task_transitions "
                "WHERE task_id > $1",
                after_id,
            )
            seconds = (last - first).total_seconds()
            # tasks per claim and per complete statement: one transaction's rows share
            # their `at` (now()) and worker
            per_claim, per_complete = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE trigger = 'claim')::float8 / nullif(count(DISTINCT "
                "(worker, at)) FILTER (WHERE trigger = 'claim'), 0), "
                "count(*) FILTER (WHERE trigger = 'complete')::float8 / nullif(count(DISTINCT "
                "(worker, at)) FILTER (WHERE trigger = 'complete'), 0) "
                "FROM task_transitions WHERE task_id > $1",
                after_id,
            )
        finally:
            await conn.close()
    return {
        "insert_per_s": insert_rate,
        "drain_per_s": config.tasks / seconds,
        "drain_seconds": seconds,
        "cpu_us_per_task": cpu,
        "tasks_per_claim": per_claim or 0.0,
        "tasks_per_complete": per_complete or 0.0,
        **extra,
    }


# Far above the load of the limits bench: at most 200 tasks run at once (2 workers x 100),
# and a drain starts about 20,000 a second. engine/tools/bench_limits.py declares these.
ABOVE_ANY_LOAD = 10_000
ABOVE_ANY_RATE = 100_000  # per second; the most a limit may be (engine.store.MAX_LIMIT)
# Per-key limits over 100 customers (tasks dealt to them in turn): one that no customer
# reaches (the most a per-key limit may be, engine.registry.MAX_KEY_LIMIT), and one a little
# above the load (3 a customer, 300 for the 200 slots).
PER_KEY_CUSTOMERS = 100
PER_KEY_ABOVE_LOAD = 1000
PER_KEY_NEAR_LOAD = 3
BENCH_LIMITS = (
    Limit("action:bench_capped", ABOVE_ANY_LOAD),
    Limit("action:bench_rated", ABOVE_ANY_LOAD),
    Limit("rate:bench_rated", ABOVE_ANY_RATE, 1.0),
    Limit("key:bench_per_key", PER_KEY_ABOVE_LOAD, by="customer"),
    Limit("key:bench_per_key_near", PER_KEY_NEAR_LOAD, by="customer"),
)


def per_customer(i: int) -> str:
    """The i-th task's payload in the per-key drains: customers in turn."""
    return f'{{"customer": "c{i % PER_KEY_CUSTOMERS}"}}'


async def limits(admin_dsn: str, config: BenchConfig, log_dir: Path, say: Say) -> dict[str, float]:
    """Drains in turns (each round starting with the next kind), so that the machine's drift
    touches all alike; medians of `limit_rounds` rounds each: no limited action anywhere;
    no-op tasks by workers that also run limited actions (none due); tasks of an action
    under a global limit above the load, in a queue under one too; the same with a rate
    limit as well; tasks of 100 customers under a per-key limit (per customer) above the
    load, and under one a little above it."""
    with_limited = ("--handlers", "tasklease.engine.tools.bench_limits")
    queue_limit = (*with_limited, "--queue-limit", f"default={ABOVE_ANY_LOAD}")
    kinds: dict[str, tuple[str, tuple[str, ...]]] = {
        "none": ("noop", ()),
        "beside": ("noop", with_limited),
        "global": ("bench_capped", queue_limit),
        "global+rate": ("bench_rated", with_limited),
        "per-key": ("bench_per_key", with_limited),
        "per-key-near": ("bench_per_key_near", with_limited),
    }
    written: dict[str, Sequence[Limit]] = {
        "none": (),
        "beside": BENCH_LIMITS,
        "global": [*BENCH_LIMITS, Limit("queue:default", ABOVE_ANY_LOAD)],
        "global+rate": BENCH_LIMITS,
        "per-key": BENCH_LIMITS,
        "per-key-near": BENCH_LIMITS,
    }
    rounds: list[dict[str, dict[str, float]]] = []
    order = list(kinds)
    for n in range(config.limit_rounds):
        rounds.append({})
        # each round starts with the next kind: none always runs right after another
        for kind in order[n % len(order) :] + order[: n % len(order)]:
            action, args = kinds[kind]
            d = await drain(
                admin_dsn,
                config,
                log_dir,
                say,
                action=action,
                worker_args=args,
                limits=written[kind],
                payload=per_customer if kind.startswith("per-key") else None,
            )
            rounds[-1][kind] = d
            say(
                f"  round {n + 1}, limits {kind}: {d['drain_per_s']:,.0f} tasks/s, "
                f"{d['cpu_us_per_task']:,.0f} us CPU per task"
            )
    figures: dict[str, float] = {}
    for k in kinds:
        cpu = statistics.median(r[k]["cpu_us_per_task"] for r in rounds)
        figures[f"{k}_per_s"] = statistics.median(r[k]["drain_per_s"] for r in rounds)
        # against the drain without limits of the same round: the machine drifts less
        # within a round than over all of them
        figures[f"{k}_vs_none_pct"] = statistics.median(
            100 * r[k]["drain_per_s"] / r["none"]["drain_per_s"] for r in rounds
        )
        figures[f"{k}_cpu_us"] = cpu
        none_cpu = figures["none_cpu_us"]
        figures[f"{k}_cpu_vs_none_pct"] = 100 * cpu / none_cpu if cpu and none_cpu else 0.0
    return figures


async def _retention_round(dsn: str) -> dict[str, float]:
    began = time.perf_counter()
    pruned = await Retention(dsn, RetentionConfig(finished_seconds=3600.0)).round()
    seconds = time.perf_counter() - began
    if pruned is None:
        raise RuntimeError("another process held the retention lock")
    return {"pruned": pruned.tasks, "prune_per_s": pruned.tasks / seconds, "prune_s": seconds}


async def retention(
    admin_dsn: str, config: BenchConfig, log_dir: Path, say: Say
) -> dict[str, float]:
    return await drain(
        admin_dsn, config, log_dir, say, backlog=config.backlog, beside=_retention_round
    )


async def _backlog(conn: asyncpg.Connection, n: int) -> None:
    await conn.execute(f"""
        INSERT INTO tasks (action, payload, state, attempt, result, worker, lease_token,
                           created_at, updated_at, due_at)
        SELECT 'noop', '{{}}', 'COMPLETED', 1, 'null', 'old', gen_random_uuid(),
               now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
        FROM generate_series(1, {n});
        INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker, at)
        SELECT id, t.trigger, t.from_state::task_state, t.to_state::task_state, t.attempt,
               CASE WHEN t.trigger = 'submit' THEN NULL ELSE 'old' END, now() - interval '1 day'
        FROM tasks, (VALUES ('submit', NULL, 'PENDING', 0), ('claim', 'PENDING', 'RUNNING', 1),
                            ('complete', 'RUNNING', 'COMPLETED', 1))
                     AS t(trigger, from_state, to_state, attempt)""")
    await conn.execute("VACUUM ANALYZE tasks")
    await conn.execute("VACUUM ANALYZE task_transitions")


async def latency(admin_dsn: str, config: BenchConfig, log_dir: Path, say: Say) -> dict[str, float]:
    n = int(config.latency_rate * config.latency_seconds)
    async with Database(admin_dsn) as db:
        procs = Cluster(db.dsn, log_dir, "tasklease.engine.tools.bench", log_level="warning")
        for _ in range(config.workers):
            procs.worker("--concurrency", str(config.concurrency))
        conn = await database.connect(db.dsn, "tasklease-bench")
        try:
            await asyncio.sleep(3)  # the workers start and go idle
            # Every task is submitted ahead of time, due at its own moment: rate/s from t0.
            t0 = await conn.fetchval("SELECT now() + interval '2 seconds'")
            store = await Store.connect(db.dsn, min_size=1, max_size=1)
            step = 1 / config.latency_rate
            from datetime import timedelta

            await store.submit_many(
                [
                    NewTask("bench_probe", "{}", due_at=t0 + timedelta(seconds=i * step))
                    for i in range(n)
                ]
            )
            await store.close()
            say(
                f"  {n:,} tasks due at {config.latency_rate:.0f}/s over "
                f"{config.latency_seconds:.0f}s"
            )
            await _wait_done(conn, n, say, "latency", procs=procs)
            rows = await conn.fetch(
                "SELECT (result::text)::float8 - extract(epoch FROM due_at) AS lag FROM tasks"
            )
        finally:
            await conn.close()
            procs.stop()
    lags = sorted(r["lag"] * 1000 for r in rows)
    return {
        "p50_ms": statistics.median(lags),
        "p99_ms": lags[int(len(lags) * 0.99) - 1],
        "max_ms": lags[-1],
    }


async def _post_loop(port: int, path: str, body: bytes | None, seconds: float, expect: int) -> int:
    """POST `body` to `path` (GET when None) over one keep-alive connection until time is up;
    returns how many succeeded. A minimal HTTP/1.1 client: general-purpose clients cost more
    CPU per request than the server does, and would measure themselves."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if body is None:
        request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    else:
        request = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
    done, stop = 0, time.perf_counter() + seconds
    try:
        while time.perf_counter() < stop:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            if status != expect:
                raise RuntimeError(f"{path} answered {status}")
            done += 1
    finally:
        writer.close()
    return done


async def submit(admin_dsn: str, config: BenchConfig, log_dir: Path, say: Say) -> dict[str, float]:
    async with Database(admin_dsn) as db:
        procs = Cluster(db.dsn, log_dir, "tasklease.engine.tools.bench", log_level="warning")
        url = procs.api()
        port = int(url.rsplit(":", 1)[1])
        try:
            async with httpx.AsyncClient(base_url=url) as http:
                for _ in range(100):
                    try:
                        if (await http.get("/healthz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)
            one = json.dumps({"payload": {"action": "noop"}}).encode()
            seconds = config.submit_seconds
            clients = config.submit_clients
            # Reference points: the same HTTP path without the database, and the database
            # without HTTP (one-task statements from as many connections).
            began = time.perf_counter()
            counts = await asyncio.gather(
                *(_post_loop(port, "/healthz", None, seconds / 2, 200) for _ in range(clients))
            )
            health = sum(counts) / (time.perf_counter() - began)
            direct = await _direct_submits(db.dsn, clients, seconds / 2)
            say(f"  GET /healthz: {health:,.0f}/s; one-task submits without HTTP: {direct:,.0f}/s")
            began = time.perf_counter()
            counts = await asyncio.gather(
                *(
                    _post_loop(port, "/tasks", one, seconds, 201)
                    for _ in range(config.submit_clients)
                )
            )
            single = sum(counts) / (time.perf_counter() - began)
            say(f"  single POST /tasks: {single:,.0f}/s with {config.submit_clients} clients")
            batch = json.dumps({"tasks": [{"payload": {"action": "noop"}}] * config.batch_size})
            began = time.perf_counter()
            counts = await asyncio.gather(
                *(_post_loop(port, "/tasks/batch", batch.encode(), seconds, 201) for _ in range(4))
            )
            batched = sum(counts) * config.batch_size / (time.perf_counter() - began)
            say(f"  POST /tasks/batch: {batched:,.0f} tasks/s")
        finally:
            procs.stop()
    return {
        "single_per_s": single,
        "batch_per_s": batched,
        "healthz_per_s": health,
        "direct_per_s": direct,
    }


async def _direct_submits(dsn: str, clients: int, seconds: float) -> float:
    store = await Store.connect(dsn, min_size=clients, max_size=clients)
    count, stop = 0, time.perf_counter() + seconds

    async def one() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await store.submit_many([NewTask("noop", "{}")])
            count += 1

    try:
        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        return count / (time.perf_counter() - began)
    finally:
        await store.close()


async def run(admin_dsn: str, config: BenchConfig, log_dir: Path, say: Say) -> BenchResult:
    result = BenchResult(environment=await environment(admin_dsn))
    f = result.figures
    if "drain" in config.scenarios:
        say(f"drain: {config.tasks:,} no-op tasks")
        d = await drain(admin_dsn, config, log_dir, say)
        f["insert (tasks/s)"] = d["insert_per_s"]
        f["drain (tasks/s)"] = d["drain_per_s"]
    if "latency" in config.scenarios:
        say(f"latency: {config.latency_rate:.0f} tasks/s for {config.latency_seconds:.0f}s")
        lat = await latency(admin_dsn, config, log_dir, say)
        f["start lag p50 (ms)"], f["start lag p99 (ms)"], f["start lag max (ms)"] = (
            lat["p50_ms"],
            lat["p99_ms"],
            lat["max_ms"],
        )
    if "submit" in config.scenarios:
        say("submit: through the HTTP API")
        s = await submit(admin_dsn, config, log_dir, say)
        f[f"POST /tasks, {config.submit_clients} clients (tasks/s)"] = s["single_per_s"]
        f["  for reference: GET /healthz (req/s)"] = s["healthz_per_s"]
        f["  for reference: one-task submits, no HTTP (tasks/s)"] = s["direct_per_s"]
        f[f"POST /tasks/batch of {config.batch_size} (tasks/s)"] = s["batch_per_s"]
    if "backlog" in config.scenarios:
        say(f"backlog: drain with {config.backlog:,} finished tasks already stored")
        b = await drain(admin_dsn, config, log_dir, say, backlog=config.backlog)
        f[f"drain over {config.backlog:,} finished (tasks/s)"] = b["drain_per_s"]
        if "drain (tasks/s)" in f:
            f["backlog vs empty (%)"] = 100 * b["drain_per_s"] / f["drain (tasks/s)"]
    if "limits" in config.scenarios:
        say(f"limits: drains with and without global limits, {config.limit_rounds} rounds")
        lim = await limits(admin_dsn, config, log_dir, say)
        f["drain, no limited action (tasks/s, median)"] = lim["none_per_s"]
        f["  CPU per task, all processes (us, median)"] = lim["none_cpu_us"]
        named = {
            "beside": "workers also running limited actions",
            "global": "an action and its queue under global limits above the load",
            "global+rate": "an action under global and rate limits above the load",
            "per-key": "100 customers under a per-key limit above the load",
            "per-key-near": "100 customers under a per-key limit of 3 (200 slots)",
        }
        for kind, what in named.items():
            f[f"  {what}: tasks/s (% of the same round's)"] = lim[f"{kind}_vs_none_pct"]
            f[f"  {what}: CPU per task (%)"] = lim[f"{kind}_cpu_vs_none_pct"]
    if "retention" in config.scenarios:
        say(f"retention: delete {config.backlog:,} old finished tasks while a drain runs")
        r = await retention(admin_dsn, config, log_dir, say)
        f[f"retention: {config.backlog:,} finished deleted (tasks/s)"] = r["prune_per_s"]
        f["retention: round took (s)"] = r["prune_s"]
        f["drain while retention runs (tasks/s)"] = r["drain_per_s"]
    return result


def to_json(result: BenchResult, config: BenchConfig) -> str:
    return json.dumps({"config": asdict(config), **asdict(result)}, indent=2, default=str)
