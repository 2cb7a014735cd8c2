"""tasklease and pgqueuer side by side: the same workloads on the same server, in turns.

    python3 -m venv /tmp/pgq && /tmp/pgq/bin/pip install 'pgqueuer==1.6.*' uvloop
    .venv/bin/python bench/side_by_side.py --rounds 5                 # embedded PostgreSQL
    .venv/bin/python bench/side_by_side.py --dsn postgresql://... --rounds 5
    .venv/bin/python bench/side_by_side.py --tree before=/tmp/before --tree after=. \\
        --workloads submit1,submit16 --no-pgqueuer --rounds 6       # two trees of tasklease

Workloads (--workloads, comma-separated; all by default):

  submit1    one caller submits --submits no-op tasks, one task per call, each call its own
             transaction: tasklease `Client.submit("noop", {"n": i})` against pgqueuer
             `Queries.enqueue("noop", b'{"n": i}')` on one connection (its fastest);
  submit16   the same from 16 concurrent callers: tasklease `Client(max_size=16)` (submit1:
             `Client()`, its default pool of 10), pgqueuer
             `Queries` on an `AsyncpgPoolDriver` of 16 connections;
  api16      tasklease only: `POST /tasks` of one task from 16 keep-alive connections (a
             minimal HTTP/1.1 client in a process of its own) to one `tasklease api` process;
             the CPU column is the API process's;
  drain1     --tasks no-op tasks inserted in bulk, then drained by one worker process:
             tasklease `tasklease worker --concurrency 100`; pgqueuer --pgq-managers queue
             managers dequeuing batches of --pgq-batch (2 x 100: its best on this machine of
             1-10 managers x 10-200, docs/benchmarks.md), `QueueExecutionMode.drain`;
  drain2     the same with two worker processes.

Every measured run is a process of its own on a fresh database (created here, dropped after):
the process starts, connects, warms up (submits: 200 calls first) and says it is ready; the
clock and the CPU counters start when it is told to go. tasklease's workers start with the
queue paused (`queue_pauses`) and are let go by resuming it; they are done when the
`tasklease_done` notifications have named every task. pgqueuer's consumers are done when they
exit (drain mode stops when its queue is empty).

CPU per task, from /proc (the clock ticks of /proc/PID/stat are too coarse: schedstat):
the client's or the worker processes' (each spawned process and its descendants: tasklease's
supervisor and its worker) and the database's: every backend connected to the run's database
plus the server's background processes (WAL writer, checkpointer, ...), which other users of
the same server share. Only when the server runs on this machine; otherwise "n/a".

Each round runs every (workload, system) pair, each round starting with the next system, so
slow drift hits all alike. Reported: median [min-max] of tasks/s and of CPU µs per task.
--tree NAME=PATH (repeatable) runs tasklease from other checkouts (their code on PYTHONPATH,
their migrations). pgqueuer runs from --pgq-python (a Python with pgqueuer and uvloop).
"""

# The driver blocks on purpose (process starts, /proc reads) between the measured spans.
# ruff: noqa: ASYNC220, ASYNC221, ASYNC240

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve()
WORKLOADS = ("submit1", "submit16", "api16", "drain1", "drain2")
CALLERS = {"submit1": 1, "submit16": 16}
WARMUP = 200


def with_database(dsn: str, name: str) -> str:
    """The same server, another database (the path of a URL DSN; host= queries are kept)."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


# --- CPU from /proc ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _ns(pid: int) -> int:
    """CPU ns of every thread of a live process (schedstat: not rounded to clock ticks)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(entry.name)
                title = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
                out[pid] = (int(_stat(pid)[1]), title)
    return out


def tree_seconds(roots: list[int]) -> float:
    """CPU seconds of these processes and all their live descendants."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0, list(roots)
    while todo:
        pid = todo.pop()
        total += _ns(pid)
        todo.extend(children.get(pid, []))
    return total / 1e9


class ServerCPU:
    """The database's CPU: the run database's backends and the server's background processes
    (children of the postmaster whose title names no database)."""

    def __init__(self, postmaster: int, database: str, databases: set[str]) -> None:
        self.postmaster, self.database, self.others = postmaster, database, databases - {database}

    @classmethod
    async def find(cls, conn: Any) -> ServerCPU | None:
        pid, db = await conn.fetchrow("SELECT pg_backend_pid(), current_database()")
        names = {r[0] for r in await conn.fetch("SELECT datname FROM pg_database")}
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            parent = int(_stat(pid)[1])
        except (OSError, ValueError, IndexError):
            return None
        if not title.startswith("postgres") or db not in title:
            return None  # not this machine's server
        return cls(parent, db, names)

    def sample(self) -> dict[int, int]:
        """CPU ns by process now. A difference of two samples counts a process started in
        between from its start; one that ended in between (none of the measured work's
        connections do) is left out."""
        out = {}
        for pid, (parent, title) in _processes().items():
            if parent != self.postmaster:
                continue
            words = set(title.split())
            if self.database in words or not words & self.others:
                out[pid] = _ns(pid)
        return out

    @staticmethod
    def seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
        return sum(ns - before.get(pid, 0) for pid, ns in after.items()) / 1e9


# --- the measured processes (children; tasklease's run in its venv, pgqueuer's in its own) ------


async def _await_go() -> None:
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _done(result: dict[str, float]) -> dict[str, float]:
    """Say the result, then stay (connections open, so that their backends' CPU is read
    from /proc) until told to end."""
    print(json.dumps(result), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return result


async def child_tasklease_submit(dsn: str, total: int, callers: int) -> dict[str, float]:
    from tasklease import Client

    # the default pool (10) as `Client()` has it; more when more callers submit at once
    async with Client(dsn, max_size=max(10, callers)) as client:
        for i in range(WARMUP):
            await client.submit("noop", {"n": i})

        async def caller(k: int) -> None:
            for i in range(k, total, callers):
                await client.submit("noop", {"n": i})

        await _await_go()
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(callers)))
        return await _done({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0})


async def child_pgqueuer_submit(dsn: str, total: int, callers: int) -> dict[str, float]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, Queries

    if callers == 1:
        conn = await asyncpg.connect(dsn)
        queries = Queries(AsyncpgDriver(conn))
    else:
        pool = await asyncpg.create_pool(dsn, min_size=callers, max_size=callers)
        queries = Queries(AsyncpgPoolDriver(pool))
    for i in range(WARMUP):
        await queries.enqueue("noop", b'{"n": %d}' % i)

    async def caller(k: int) -> None:
        for i in range(k, total, callers):
            await queries.enqueue("noop", b'{"n": %d}' % i)

    await _await_go()
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    return await _done({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0})


async def child_pgqueuer_setup(dsn: str, jobs: int, install: int) -> dict[str, float]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    if install:
        await queries.install()
    for start in range(0, jobs, 5000):
        n = min(5000, jobs - start)
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    await conn.execute("ANALYZE")
    if jobs:
        await conn.execute("CHECKPOINT")  # as before tasklease's drain: the load written out
    await conn.close()
    return await _done({})


async def child_pgqueuer_drain(dsn: str, managers: int, batch: int) -> dict[str, float]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, PgQueuer
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    done = 0
    queues = []
    for _ in range(managers):
        pgq = PgQueuer(AsyncpgDriver(await asyncpg.connect(dsn)))

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        queues.append(pgq)
    await _await_go()
    await asyncio.gather(*(q.run(batch_size=batch, mode=QueueExecutionMode.drain) for q in queues))
    return await _done({"done": done})


async def child_http_submit(port: int, total: int, callers: int) -> dict[str, float]:
    """POST /tasks over `callers` keep-alive connections (a minimal client: a general-purpose
    one costs more CPU per request than the server)."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for _ in range(300):
            with contextlib.suppress(OSError):
                return await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.1)
        raise RuntimeError(f"no API on port {port}")

    async def post(streams: tuple[asyncio.StreamReader, asyncio.StreamWriter], i: int) -> None:
        reader, writer = streams
        body = b'{"action": "noop", "payload": {"n": %d}}' % i
        writer.write(
            b"POST /tasks HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        if head.split(b" ", 2)[1] != b"201":
            raise RuntimeError(f"POST /tasks answered {head!r}")

    conns = [await connect() for _ in range(callers)]
    for i in range(WARMUP):
        await post(conns[i % callers], i)

    async def caller(k: int) -> None:
        for i in range(k, total, callers):
            await post(conns[k], i)

    await _await_go()
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    return await _done({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0})


def child_main(argv: list[str]) -> None:
    import uvloop

    kind, dsn, *rest = argv  # http-submit: a port in place of the DSN
    ints = [int(x) for x in rest]
    if kind == "http-submit":
        uvloop.run(child_http_submit(int(dsn), *ints))
        return
    run = {
        "tasklease-submit": child_tasklease_submit,
        "pgqueuer-submit": child_pgqueuer_submit,
        "pgqueuer-setup": child_pgqueuer_setup,
        "pgqueuer-drain": child_pgqueuer_drain,
    }[kind]
    uvloop.run(run(dsn, *ints))  # type: ignore[operator]


# --- the orchestrator ----------------------------------------------------------------------------


@dataclass
class System:
    name: str  # what the report calls it
    kind: str  # "tasklease" or "pgqueuer"
    python: str
    tree: Path | None = None  # tasklease's checkout

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("DATABASE_URL", None)
        if self.tree is not None:
            env["PYTHONPATH"] = str(self.tree)
        return env


@dataclass
class Run:
    tasks: int
    seconds: float
    client_cpu: float | None  # the caller's or the workers' CPU seconds
    server_cpu: float | None

    @property
    def per_s(self) -> float:
        return self.tasks / self.seconds

    def us(self, cpu: float | None) -> float | None:
        return None if cpu is None else 1e6 * cpu / self.tasks


@dataclass
class Results:
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)


class Child:
    """A measured process: started, ready, let go, its result read."""

    def __init__(self, system: System, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [system.python, str(HERE), "--child", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=system.env(),
            cwd=system.tree or HERE.parent.parent,
        )

    def ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.wait()
            raise RuntimeError(f"child failed before it was ready: {line!r}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        """Its result line; it stays alive until end()."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"child exited with {self.proc.returncode}, no result")
        result: dict[str, Any] = json.loads(line)
        return result

    def end(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise RuntimeError(f"child exited with {self.proc.returncode}")


async def _run_in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class Bench:
    def __init__(self, args: argparse.Namespace, admin: str) -> None:
        self.args, self.admin = args, admin

    async def fresh(self, system: System) -> tuple[str, str]:
        import asyncpg

        name = f"side_by_side_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(self.admin)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        dsn = with_database(self.admin, name)
        if system.kind == "tasklease":
            subprocess.run(
                [system.python, "-m", "tasklease.engine.cli", "migrate"],
                env={**system.env(), "DATABASE_URL": dsn},
                cwd=system.tree,
                check=True,
                capture_output=True,
            )
        else:
            setup = Child(system, ["pgqueuer-setup", dsn, "0", "1"])
            await _run_in_thread(setup.result)
            setup.end()
        return name, dsn

    async def drop(self, name: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()

    async def run(self, workload: str, system: System) -> Run:
        import asyncpg

        name, dsn = await self.fresh(system)
        try:
            watch = await asyncpg.connect(dsn)
            try:
                server = await ServerCPU.find(watch)
                if workload.startswith("submit"):
                    return await self.submit(system, dsn, CALLERS[workload], server)
                if workload == "api16":
                    return await self.api(system, dsn, 16, server)
                workers = int(workload.removeprefix("drain"))
                if system.kind == "tasklease":
                    return await self.tasklease_drain(system, dsn, workers, watch, server)
                return await self.pgqueuer_drain(system, dsn, workers, server)
            finally:
                await watch.close()
        finally:
            await self.drop(name)

    async def submit(self, system: System, dsn: str, callers: int, server: ServerCPU | None) -> Run:
        n = self.args.submits
        child = Child(system, [f"{system.kind}-submit", dsn, str(n), str(callers)])
        await _run_in_thread(child.ready)
        s0 = server.sample() if server else None
        child.go()
        result = await _run_in_thread(child.result)
        s1 = server.sample() if server else None
        child.end()
        return Run(n, result["seconds"], result["cpu"], server_between(s0, s1))

    async def api(self, system: System, dsn: str, callers: int, server: ServerCPU | None) -> Run:
        n = self.args.submits
        port = self.args.api_port
        api = subprocess.Popen(
            [
                system.python,
                "-m",
                "tasklease.engine.cli",
                "--log-level",
                "warning",
                "api",
                "--port",
                str(port),
            ],
            env={**system.env(), "DATABASE_URL": dsn},
            cwd=system.tree,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            child = Child(
                System("load", "http", sys.executable),
                ["http-submit", str(port), str(n), str(callers)],
            )
            await _run_in_thread(child.ready)
            a0, s0 = tree_seconds([api.pid]), server.sample() if server else None
            child.go()
            result = await _run_in_thread(child.result)
            a1, s1 = tree_seconds([api.pid]), server.sample() if server else None
            child.end()
        finally:
            api.terminate()
            api.wait()
        return Run(n, result["seconds"], a1 - a0, server_between(s0, s1))

    async def tasklease_drain(
        self, system: System, dsn: str, workers: int, watch: Any, server: ServerCPU | None
    ) -> Run:
        n = self.args.tasks
        await watch.execute("INSERT INTO queue_pauses (queue) VALUES ('default')")
        await watch.execute(
            "WITH new AS (INSERT INTO tasks (action, payload) "
            "SELECT 'noop', '{}' FROM generate_series(1, $1) RETURNING id) "
            "INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt) "
            "SELECT id, 'submit', NULL, 'PENDING', 0 FROM new",
            n,
        )
        await watch.execute("ANALYZE")
        await watch.execute("CHECKPOINT")
        finished: set[int] = set()
        all_done = asyncio.Event()

        def on_done(conn: Any, pid: int, channel: str, payload: str) -> None:
            finished.update(int(x) for x in payload.split(","))
            if len(finished) >= n:
                all_done.set()

        await watch.add_listener("tasklease_done", on_done)
        procs = [
            subprocess.Popen(
                [
                    system.python,
                    "-m",
                    "tasklease.engine.cli",
                    "--log-level",
                    "warning",
                    "worker",
                    "--concurrency",
                    str(self.args.concurrency),
                ],
                env={**system.env(), "DATABASE_URL": dsn},
                cwd=system.tree,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                seen = await watch.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query LIKE 'LISTEN%'"
                )
                if seen >= workers:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # the rest of their start-up
            pids = [p.pid for p in procs]
            w0, s0 = tree_seconds(pids), server.sample() if server else None
            t0 = time.perf_counter()
            await watch.execute(
                "DELETE FROM queue_pauses WHERE queue = 'default' "
                "AND pg_notify('tasklease', queue) IS NOT NULL"
            )
            await asyncio.wait_for(all_done.wait(), 600)
            seconds = time.perf_counter() - t0
            w1, s1 = tree_seconds(pids), server.sample() if server else None
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()
        return Run(n, seconds, w1 - w0, server_between(s0, s1))

    async def pgqueuer_drain(
        self, system: System, dsn: str, workers: int, server: ServerCPU | None
    ) -> Run:
        n = self.args.tasks
        setup = Child(system, ["pgqueuer-setup", dsn, str(n), "0"])
        await _run_in_thread(setup.result)
        setup.end()
        children = [
            Child(
                system,
                ["pgqueuer-drain", dsn, str(self.args.pgq_managers), str(self.args.pgq_batch)],
            )
            for _ in range(workers)
        ]
        for c in children:
            await _run_in_thread(c.ready)
        await asyncio.sleep(1.0)
        pids = [c.proc.pid for c in children]
        w0, s0 = tree_seconds(pids), server.sample() if server else None
        t0 = time.perf_counter()
        for c in children:
            c.go()
        done = 0
        w1 = 0.0
        for c in children:
            done += (await _run_in_thread(c.result))["done"]
            w1 += tree_seconds([c.proc.pid])
        seconds = time.perf_counter() - t0
        s1 = server.sample() if server else None
        for c in children:
            c.end()
        if done != n:
            raise RuntimeError(f"pgqueuer drained {done} of {n} jobs")
        return Run(n, seconds, w1 - w0, server_between(s0, s1))


def server_between(s0: dict[int, int] | None, s1: dict[int, int] | None) -> float | None:
    return None if s0 is None or s1 is None else ServerCPU.seconds_between(s0, s1)


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    return (
        f"{format(statistics.median(values), fmt)} "
        f"[{format(min(values), fmt)}-{format(max(values), fmt)}]"
    )


def report(results: Results, systems: list[System], workloads: list[str]) -> str:
    head = (
        f"{'workload':<9} {'system':<24} {'tasks/s median [range]':>26} "
        f"{'client/workers us/task':>24} {'database us/task':>22} {'sum us/task':>20}"
    )
    lines = [head, "-" * len(head)]
    for w in workloads:
        for s in systems:
            runs = results.runs.get((w, s.name), [])
            if not runs:
                continue
            client = [u for r in runs if (u := r.us(r.client_cpu)) is not None]
            db = [u for r in runs if (u := r.us(r.server_cpu)) is not None]
            both = [a + b for a, b in zip(client, db, strict=False)] if db else []
            lines.append(
                f"{w:<9} {s.name:<24} {_spread([r.per_s for r in runs], ',.0f'):>26} "
                f"{_spread(client, ',.0f'):>24} {_spread(db, ',.0f'):>22} "
                f"{_spread(both, ',.0f'):>20}"
            )
        base = systems[0]
        for s in systems[1:]:
            pairs = list(
                zip(
                    results.runs.get((w, s.name), []),
                    results.runs.get((w, base.name), []),
                    strict=False,
                )
            )
            if pairs:
                ratio = [a.per_s / b.per_s for a, b in pairs]
                lines.append(
                    f"{'':<9} {s.name} / {base.name}, same round: x{_spread(ratio, '.2f')}"
                )
    return "\n".join(lines)


async def orchestrate(args: argparse.Namespace) -> None:
    import asyncpg

    admin = args.dsn
    if admin is None:
        from tasklease.engine import database

        admin, server = database.resolve()
        if server is not None:
            await asyncio.to_thread(server.ensure_running)
    systems = [
        System(name, "tasklease", sys.executable, Path(path).resolve())
        for name, path in (
            t.split("=", 1) for t in (args.tree or [f"tasklease={HERE.parent.parent}"])
        )
    ]
    if not args.no_pgqueuer:
        systems.append(
            System(f"pgqueuer {args.pgq_managers}x{args.pgq_batch}", "pgqueuer", args.pgq_python)
        )
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            sys.exit(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    conn = await asyncpg.connect(admin)
    try:
        version = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    where = "a Unix socket" if "host=/" in admin else urlsplit(admin).hostname
    print(
        f"PostgreSQL {version} on {where} (synchronous_commit={sync}); {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}; systems: {', '.join(s.name for s in systems)}",
        flush=True,
    )
    bench, results = Bench(args, admin), Results()
    for n in range(-args.warmup, args.rounds):
        turn = systems[n % len(systems) :] + systems[: n % len(systems)]
        for w in workloads:
            got = []
            for s in turn:
                if w == "api16" and s.kind != "tasklease":
                    continue  # pgqueuer has no HTTP API
                r = await bench.run(w, s)
                got.append(f"{s.name} {r.per_s:,.0f}/s")
                if n >= 0:
                    results.runs.setdefault((w, s.name), []).append(r)
            label = "warm-up" if n < 0 else f"round {n + 1}"
            print(f"{label} {w}: " + ", ".join(got), flush=True)
    print()
    print(report(results, systems, workloads))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dsn", help="an admin DSN (default: the embedded server, or DATABASE_URL)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (1)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--submits", type=int, default=3000, help="tasks a submit run (3000)")
    p.add_argument("--tasks", type=int, default=20_000, help="tasks a drain run (20000)")
    p.add_argument("--tree", action="append", metavar="NAME=PATH", help="tasklease checkouts")
    p.add_argument(
        "--concurrency", type=int, default=100, help="per tasklease worker process (100)"
    )
    p.add_argument("--pgq-python", default="/tmp/pgq/bin/python")
    p.add_argument("--pgq-managers", type=int, default=2)
    p.add_argument("--pgq-batch", type=int, default=100)
    p.add_argument("--no-pgqueuer", action="store_true")
    p.add_argument("--api-port", type=int, default=18181, help="for api16 (18181)")
    args = p.parse_args()
    if args.dsn is None:
        args.dsn = os.environ.get("DATABASE_URL")
    # stopped (kill, timeout): unwind, so that workers are stopped and databases dropped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(orchestrate(args))


if __name__ == "__main__":
    main()
