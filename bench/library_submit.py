"""Submitting through the library (`tasklease.Client`): plain against transactional, one
task per call against 1,000, side by side in one run.

    .venv/bin/python bench/library_submit.py [--pairs 5] [--tasks 2000] [--batches 10]

Five ways to submit no-op tasks, each run in turns (every round runs all five, each round
starting with the next one, after one warm-up round that is not counted):

  a  plain:        `await client.submit("noop", {"n": i})`, one task a call, each its own
                   transaction, on the client's own pool;
  b  tx, 1 each:   on an asyncpg connection, `async with conn.transaction(): await
                   client.submit("noop", {...}, connection=conn)`: one task a transaction;
  c  many:         `await client.submit_many([... 1,000 {"action": "noop", "payload": {"n": i}}
                   ...])`: 1,000 tasks a call (one statement, one transaction);
  d  tx, many:     the same call with `connection=conn` inside `async with conn.transaction()`;
  e  tx, 1000 x 1: 1,000 single `client.submit(..., connection=conn)` calls inside one
                   transaction.

a, b and e submit --tasks tasks a run (e in transactions of 1,000), so that the three
one-task-a-statement arms insert into tables of the same sizes; c and d submit --batches
batches of 1,000. Every call is awaited before the next (one caller, no concurrency): this is
the latency of the library and the database together, not the server's capacity.

Figures per arm, medians over the rounds with their ranges: tasks/s, microseconds of wall
time per task, and CPU per task: this process's (time.process_time: the client library,
asyncpg, the event loop) and the database server's, read from /proc when the server runs on
this machine: every process of the server instance (the postmaster and all its children:
the backends, walwriter, checkpointer, io workers ..., by /proc/PID/task/*/schedstat, plus
the CPU of children already reaped, from the postmaster's cutime+cstime). Other clients of
the same server are counted too, so use a server nobody else uses; the run says how many
other backends it saw.

One database of its own (created, migrated with tasklease.schema.upgrade, dropped at the
end); before every run `tasks` and `task_transitions` are truncated (fresh, empty tables and
indexes) and a CHECKPOINT is taken, so no run inherits another's index growth or a
checkpoint's writes. Autovacuum is off on those two tables in that database (it would
otherwise start at random moments after a run's inserts).

On the server of DATABASE_URL, else the embedded PostgreSQL (started or joined; its data
directory is .tasklease under the current directory, or TASKLEASE_DATA_DIR): run it from the
repository's root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tasklease import Client, schema
from tasklease.engine import database

BATCH = 1000
ARMS = {
    "a": "plain submit, 1 task a call",
    "b": "tx: 1 task a transaction",
    "c": "submit_many of 1,000",
    "d": "tx: submit_many of 1,000",
    "e": "tx: 1,000 single submits",
}
# the comparisons asked for: (arm, against)
VERSUS = [("b", "a"), ("d", "c"), ("e", "c"), ("e", "d")]
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- CPU of the database server's processes -------------------------------------------------


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat fields after the command name (field 3 of proc(5) is index 0)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _run_ns(pid: int) -> int:
    """CPU time of all of a live process's threads, in ns (schedstat: not rounded to ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def _postmaster_of(backend: int, database: str) -> int | None:
    try:
        title = Path(f"/proc/{backend}/cmdline").read_bytes().decode(errors="replace")
        parent = int(_stat(backend)[1])
    except (OSError, ValueError, IndexError):
        return None
    if not title.startswith("postgres") or database not in title:
        return None  # another machine's server: this pid is some other process here
    return parent


class ServerCPU:
    """CPU seconds spent by one PostgreSQL instance on this machine: the postmaster, its live
    children, and its reaped children (cutime + cstime, in clock ticks)."""

    def __init__(self, postmaster: int) -> None:
        self.postmaster = postmaster

    @classmethod
    async def find(cls, conn: asyncpg.Connection) -> ServerCPU | None:
        """The server behind `conn`, if it runs on this machine (its backend is visible in
        /proc, titled as a PostgreSQL backend of this database); else None."""
        pid, db = await conn.fetchrow("SELECT pg_backend_pid(), current_database()")
        parent = _postmaster_of(pid, db)
        return None if parent is None else cls(parent)

    def seconds(self) -> float:
        reaped = _stat(self.postmaster)
        ns = _run_ns(self.postmaster)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if int(_stat(int(entry.name))[1]) == self.postmaster:
                    ns += _run_ns(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass  # exited meanwhile: counted in the postmaster's cutime once reaped
        return ns / 1e9 + (int(reaped[13]) + int(reaped[14])) / TICK


# --- the five arms ----------------------------------------------------------------------------


@dataclass
class Arms:
    client: Client
    conn: asyncpg.Connection  # the caller's own connection, for connection=
    tasks: int
    batches: int

    async def a(self) -> int:
        for i in range(self.tasks):
            await self.client.submit("noop", {"n": i})
        return self.tasks

    async def b(self) -> int:
        for i in range(self.tasks):
            async with self.conn.transaction():
                await self.client.submit("noop", {"n": i}, connection=self.conn)
        return self.tasks

    async def c(self) -> int:
        for _ in range(self.batches):
            await self.client.submit_many(
                [{"action": "noop", "payload": {"n": i}} for i in range(BATCH)]
            )
        return self.batches * BATCH

    async def d(self) -> int:
        for _ in range(self.batches):
            async with self.conn.transaction():
                await self.client.submit_many(
                    [{"action": "noop", "payload": {"n": i}} for i in range(BATCH)],
                    connection=self.conn,
                )
        return self.batches * BATCH

    async def e(self) -> int:
        for start in range(0, self.tasks, BATCH):
            async with self.conn.transaction():
                for i in range(start, min(start + BATCH, self.tasks)):
                    await self.client.submit("noop", {"n": i}, connection=self.conn)
        return self.tasks


@dataclass
class Run:
    tasks: int
    wall: float
    cpu: float  # this process
    server: float | None  # the database server's processes

    @property
    def per_s(self) -> float:
        return self.tasks / self.wall

    @property
    def wall_us(self) -> float:
        return 1e6 * self.wall / self.tasks

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu / self.tasks

    @property
    def server_us(self) -> float | None:
        return None if self.server is None else 1e6 * self.server / self.tasks


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=lambda: {k: [] for k in ARMS})


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE tasks, task_transitions RESTART IDENTITY")
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


async def measure(
    arm: Callable[[], Awaitable[int]], admin: asyncpg.Connection, server: ServerCPU | None
) -> Run:
    await reset(admin)
    s0 = server.seconds() if server else None
    c0, w0 = time.process_time(), time.perf_counter()
    n = await arm()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    s1 = server.seconds() if server else None
    got = await admin.fetchval("SELECT count(*) FROM tasks")
    if got != n:
        raise RuntimeError(f"{n} tasks submitted, {got} in the table")
    return Run(n, wall, cpu, None if s0 is None or s1 is None else s1 - s0)


# --- reporting --------------------------------------------------------------------------------


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return (
        f"{format(statistics.median(values), fmt)} "
        f"[{format(min(values), fmt)}-{format(max(values), fmt)}]"
    )


def report(results: Results, server_seen: bool) -> str:
    head = (
        f"{'arm':<32} {'tasks/run':>9}  {'tasks/s median [range]':>26}  "
        f"{'us wall/task':>22}  {'us CPU/task, client':>22}  {'us CPU/task, server':>22}"
    )
    lines = [head, "-" * len(head)]
    for key, what in ARMS.items():
        runs = results.runs[key]
        server = [r.server_us for r in runs if r.server_us is not None]
        lines.append(
            f"{key + '  ' + what:<32} {runs[0].tasks:>9,}  "
            f"{_spread([r.per_s for r in runs], ',.0f'):>26}  "
            f"{_spread([r.wall_us for r in runs], ',.1f'):>22}  "
            f"{_spread([r.cpu_us for r in runs], ',.1f'):>22}  "
            f"{_spread(server, ',.1f') if server_seen else 'n/a (not local)':>22}"
        )
    lines += ["", "within each round (ratio of tasks/s; CPU per task as % of the other's):"]
    for arm, base in VERSUS:
        pairs = list(zip(results.runs[arm], results.runs[base], strict=True))
        speed = [x.per_s / y.per_s for x, y in pairs]
        cpu = [100 * x.cpu_us / y.cpu_us for x, y in pairs]
        line = (
            f"  {arm} vs {base}: tasks/s x{_spread(speed, '.2f')}, "
            f"client CPU/task {_spread(cpu, '.0f')} %"
        )
        if server_seen:
            srv = [
                100 * x.server_us / y.server_us
                for x, y in pairs
                if x.server_us is not None and y.server_us
            ]
            line += f", server CPU/task {_spread(srv, '.0f')} %"
        lines.append(line)
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


async def admin_dsn() -> str:
    dsn, server = database.resolve()
    if server is not None:
        await asyncio.to_thread(server.ensure_running)
    return dsn


async def main(args: argparse.Namespace) -> None:
    admin = await admin_dsn()
    name = f"tasklease_libsubmit_{uuid.uuid4().hex[:10]}"
    dsn = database.with_database(admin, name)
    root = await asyncpg.connect(admin)
    try:
        await root.execute(f"CREATE DATABASE {name}")
    finally:
        await root.close()
    try:
        await schema.upgrade(dsn)
        conn = await asyncpg.connect(dsn)  # the caller's own connection (arms b, d, e)
        own = await asyncpg.connect(dsn)  # truncates and counts; not timed
        try:
            for table in ("tasks", "task_transitions"):
                await own.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
            server = await ServerCPU.find(own)
            version = await own.fetchval("SHOW server_version")
            others = await own.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND datname IS DISTINCT FROM current_database()"
            )
            where = "a Unix socket" if "host=/" in dsn else (dsn.split("@")[-1].split("/")[0])
            print(
                f"PostgreSQL {version} on {where}; server CPU from /proc: "
                f"{'postmaster ' + str(server.postmaster) if server else 'no (not local)'}; "
                f"{others} client backend(s) of other databases; "
                f"{os.cpu_count()} cores, Python {platform.python_version()}",
                flush=True,
            )
            async with Client(dsn) as client:
                arms = Arms(client, conn, args.tasks, args.batches)
                results = Results()
                order = list(ARMS)
                for n in range(-args.warmup, args.pairs):
                    turn = order[n % len(order) :] + order[: n % len(order)]
                    got = {k: await measure(getattr(arms, k), own, server) for k in turn}
                    label = "warm-up" if n < 0 else f"round {n + 1}"
                    print(
                        f"{label}: " + ", ".join(f"{k} {got[k].per_s:,.0f}/s" for k in turn),
                        flush=True,
                    )
                    if n >= 0:
                        for k, run in got.items():
                            results.runs[k].append(run)
            print()
            print(report(results, server is not None))
        finally:
            await conn.close()
            await own.close()
    finally:
        root = await asyncpg.connect(admin)
        try:
            await root.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await root.close()


def parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pairs", type=int, default=5, help="counted rounds, each running every arm once (5)"
    )
    p.add_argument("--tasks", type=int, default=2000, help="tasks a run of arms a, b and e (2000)")
    p.add_argument(
        "--batches",
        type=int,
        default=10,
        help=f"batches of {BATCH:,} a run of arms c and d (10)",
    )
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (1)")
    return p


if __name__ == "__main__":
    parsed = parser().parse_args()
    if min(parsed.pairs, parsed.tasks, parsed.batches) < 1 or parsed.warmup < 0:
        sys.exit("library_submit.py: --pairs, --tasks and --batches must be at least 1")
    asyncio.run(main(parsed))
