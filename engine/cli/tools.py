"""`tasklease chaos` and `tasklease bench`: the commands of the tools in engine/tools/."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from tasklease.engine.cli.common import Fatal, database_url, positive

log = logging.getLogger("tasklease")


def _ms_range(value: str) -> tuple[int, int]:
    low, _, high = value.partition(",")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not LOW,HIGH in ms") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{value!r}: need 0 <= LOW <= HIGH")
    return pair


def cmd_chaos(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from tasklease.engine.tools import chaos

    if args.failover:
        return _chaos_failover(args)
    if args.hosts:
        from tasklease.engine.tools import netns

        why = netns.unavailable()
        if why:
            raise Fatal(f"--hosts needs network namespaces: {why}")
    admin = "" if args.hosts else database_url()  # --hosts: a server of its own
    config = chaos.ChaosConfig(
        tasks=args.tasks,
        rate=args.rate,
        seconds=args.minutes * 60 if args.minutes else args.seconds,
        workers=args.workers,
        concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        kill_every=args.kill_every,
        terminate_every=args.cut_connections_every,
        seed=args.seed,
        sleep_ms=args.handler_ms,
        hosts=args.hosts or 0,
        link_fault_every=args.link_faults_every if args.hosts else 0.0,
        graphs=args.graphs,
    )
    log_dir = Path(tempfile.mkdtemp(prefix="tasklease-chaos-"))
    log.info("chaos: %s; process logs in %s", config, log_dir)
    report = asyncio.run(chaos.run(admin, config, log_dir))
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        print("\n".join(report.lines()))
        print(
            "result: "
            + (
                "OK: nothing lost, nothing completed twice"
                if report.ok
                else "FAILED: " + "; ".join(report.problems)
            )
        )
    return 0 if report.ok else 1


def _chaos_failover(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from tasklease.engine.tools import failover

    why = failover.missing()
    if why:
        print(f"tasklease chaos --failover: {why}", file=sys.stderr)
        return 1
    config = failover.FailoverConfig(
        rate=args.rate, workers=args.workers, concurrency=args.concurrency
    )
    log_dir = Path(tempfile.mkdtemp(prefix="tasklease-failover-logs-"))
    log.info("chaos --failover: %s; process logs in %s", config, log_dir)
    report = asyncio.run(failover.run(config, log_dir, say=lambda line: log.info("%s", line)))
    print("\n".join(report.lines()))
    problems = report.problems + report.chaos.problems
    print(
        "result: "
        + (
            "OK: nothing lost, nothing completed twice"
            if report.ok
            else "FAILED: " + "; ".join(problems)
        )
    )
    return 0 if report.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from tasklease.engine.tools import bench

    admin = database_url()
    config = bench.BenchConfig(
        tasks=args.tasks,
        workers=args.workers,
        concurrency=args.concurrency,
        latency_rate=args.latency_rate,
        latency_seconds=args.latency_seconds,
        submit_clients=args.submit_clients,
        batch_size=args.batch_size,
        backlog=args.backlog,
        scenarios=tuple(args.only.split(",")) if args.only else bench.BenchConfig.scenarios,
    )
    log_dir = Path(tempfile.mkdtemp(prefix="tasklease-bench-"))
    log.info("bench: process logs in %s", log_dir)
    result = asyncio.run(bench.run(admin, config, log_dir, lambda line: log.info("%s", line)))
    print(bench.to_json(result, config) if args.json else result.table())
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tasklease chaos` and `tasklease bench`."""
    ch = sub.add_parser(
        "chaos",
        help="kill workers and cut connections under load, then check nothing was lost",
        description="Start an API and worker processes on a fresh database (created "
        "and dropped), submit tasks, SIGKILL a random worker every --kill-every seconds (and "
        "optionally cut all database connections), then drain and verify: no task lost, none "
        "completed twice. Exit status 1 if any check fails.",
    )
    ch.add_argument(
        "--seconds",
        type=positive(float),
        default=20.0,
        help="how long the chaos lasts (default: 20)",
    )
    ch.add_argument("--minutes", type=positive(float), help="the same, in minutes (a soak)")
    ch.add_argument("--workers", type=positive(int), default=3, help="worker processes (3)")
    ch.add_argument("--concurrency", type=positive(int), default=10, help="per worker (10)")
    ch.add_argument(
        "--tasks",
        type=positive(int),
        default=1000,
        help="tasks submitted before the chaos starts (1000)",
    )
    ch.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="tasks submitted per second while the chaos lasts (100)",
    )
    ch.add_argument("--lease-seconds", type=positive(float), default=2.0, help="lease (2)")
    ch.add_argument(
        "--kill-every",
        type=positive(float),
        default=0.5,
        metavar="S",
        help="SIGKILL a random worker this often, on average (0.5)",
    )
    ch.add_argument(
        "--cut-connections-every",
        type=float,
        default=0.0,
        metavar="S",
        help="pg_terminate_backend every tasklease connection this often (never)",
    )
    ch.add_argument(
        "--handler-ms",
        type=_ms_range,
        default=(2, 40),
        metavar="LOW,HIGH",
        help="each task's handler sleeps a random time in this range, in ms (2,40)",
    )
    ch.add_argument(
        "--hosts",
        type=positive(int),
        metavar="N",
        help="root only: run the database, the API and the workers on hosts of their own "
        "(network namespaces joined by veth links, a PostgreSQL server started for the run, "
        "reached over TCP), the workers placed on N hosts in turn; all removed at the end",
    )
    ch.add_argument(
        "--link-faults-every",
        type=float,
        default=2.0,
        metavar="S",
        help="with --hosts: this often, on average, a worker host's link is cut (for 0.3 to "
        "3 leases) or delayed and made lossy (5-50 ms, 0-5 %%); 0: never (2)",
    )
    ch.add_argument(
        "--graphs",
        type=int,
        default=100,
        metavar="N",
        help="workflows submitted before the chaos starts, each a diamond (a -> [b, c] -> d) "
        "and a fan-in task; checked: no dependant claimed before its dependencies completed, "
        "none left WAITING, each made ready exactly once (100; 0: none)",
    )
    ch.add_argument("--seed", type=int, help="random seed, to repeat a run")
    ch.add_argument(
        "--failover",
        action="store_true",
        help="instead: PostgreSQL failover under load. Starts pg_auto_failover (monitor, "
        "primary, synchronous secondary; root, runs them as postgres) on loopback ports, the "
        "API and --workers on a multi-host DSN with target_session_attrs=read-write, submits "
        "--rate tasks/s (40 is good here), runs `pg_autoctl perform failover`, then SIGKILLs the "
        "primary node; prints the recovery times and checks nothing was lost or completed "
        "twice. Needs postgresql-15-auto-failover and pg-auto-failover-cli. About 1.5 min",
    )
    ch.add_argument("--json", action="store_true", help="print the report as JSON")
    ch.set_defaults(func=cmd_chaos)

    be = sub.add_parser(
        "bench",
        help="measure drain speed, start lag and submission rate",
        description="Benchmarks on fresh databases (created and dropped) of the embedded "
        "PostgreSQL or DATABASE_URL: drain (bulk insert, then workers drain), latency (tasks "
        "due at a steady rate, start lag percentiles), submit (HTTP API, single and batch), "
        "backlog (drain beside a million finished tasks), limits (drains under global and "
        "rate limits far above the load, against drains without, round by round, with CPU "
        "per task), retention (a million finished tasks pruned while a drain runs). Prints a "
        "table, or --json.",
    )
    be.add_argument("--tasks", type=positive(int), default=20_000, help="tasks to drain (20000)")
    be.add_argument("--workers", type=positive(int), default=2, help="worker processes (2)")
    be.add_argument("--concurrency", type=positive(int), default=100, help="per worker (100)")
    be.add_argument(
        "--latency-rate",
        type=positive(float),
        default=100.0,
        help="tasks due per second in the latency run (100)",
    )
    be.add_argument(
        "--latency-seconds",
        type=positive(float),
        default=15.0,
        help="length of the latency run (15)",
    )
    be.add_argument(
        "--submit-clients",
        type=positive(int),
        default=16,
        help="concurrent HTTP clients for single POST /tasks (16)",
    )
    be.add_argument(
        "--batch-size", type=positive(int), default=1000, help="tasks per POST /tasks/batch (1000)"
    )
    be.add_argument(
        "--backlog",
        type=positive(int),
        default=1_000_000,
        help="finished tasks stored for the backlog run (1000000)",
    )
    be.add_argument(
        "--only",
        metavar="a,b",
        help="some of: drain,latency,submit,backlog,limits,retention (default: all)",
    )
    be.add_argument("--json", action="store_true", help="print JSON")
    be.set_defaults(func=cmd_bench)
