"""`tasklease worker` runs its worker as a child process and watches it.

A handler can end the process it runs in (`os._exit`, a segfault in a C extension, the OOM
killer). Left alone, that worker's tasks would stay RUNNING until their leases ran out, then
be taken over with nothing in their history saying why; a poison task would take down one
worker after another; and a worker ended by `os._exit(0)` would exit with 0, which a
supervisor that restarts only on failure takes for a clean stop.

So the `tasklease worker` process is a small supervisor (it runs no handler and holds no
lease) with one child, the worker. When the child ends without having been asked to stop,
the supervisor:

1. settles the tasks the dead worker held: each becomes FAILED (attempts left: retried after
   its action's backoff) or DEAD (its last attempt), with the error `worker process died
   (<signal or status>) while running it` in its history. This is the usual guarded
   `fail`/`bury` under the dead worker's lease token, so a task some other worker took over
   meanwhile is left alone. If the database cannot be reached, the leases run out instead;
2. starts a new worker (with a new worker id) after a backoff of 0.5 s growing to 30 s.

SIGTERM and SIGINT go to the child once each (a second one skips the grace period, as
always), and the supervisor exits with the child's status. If the supervisor itself is
killed, the kernel kills the child too (PR_SET_PDEATHSIG), so `kill -9` of a worker's pid
still ends the whole worker at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from tasklease.engine import database
from tasklease.engine.queries import SQL
from tasklease.engine.registry import DEFAULT_BACKOFF, DEFAULT_JITTER, Handler
from tasklease.engine.reporting import process_id

log = logging.getLogger("tasklease.supervisor")

WORKER_ID_ENV = "TASKLEASE_WORKER_ID"  # set for the child: it is the worker, with this id
# A child that dies is started again after RESTART_DELAYS[n] seconds, n its deaths in a row;
# one that ran RESTART_RESET seconds was healthy, and its count starts again.
RESTART_DELAYS = (0.5, 1, 2, 5, 10, 30)
RESTART_RESET = 60.0


def restart_delay(deaths: int) -> float:
    return RESTART_DELAYS[min(deaths, len(RESTART_DELAYS) - 1)]


PR_SET_PDEATHSIG = 1
SETTLE_SECONDS = 15.0  # beyond that, a dead worker's leases are left to run out


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: be killed when the supervisor dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the child outlives a killed supervisor
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def supervise(argv: Sequence[str], dsn: str, handlers: Mapping[str, Handler]) -> int:
    """Run `tasklease <argv>` as the worker child until asked to stop; returns its status."""
    stopping: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    deaths = 0
    parent = os.getpid()
    try:
        while True:
            worker_id = process_id()
            started = time.monotonic()
            child = subprocess.Popen(
                [sys.executable, "-m", "tasklease.engine.cli", *argv],
                env={**os.environ, WORKER_ID_ENV: worker_id},
                preexec_fn=lambda: _die_with_parent(parent),
                # a session of its own: a Ctrl-C in a terminal reaches it once, through us
                start_new_session=True,
            )
            if stopping:  # a signal came before the child existed
                child.send_signal(stopping[-1])
            code = child.wait()
            if stopping:
                if -code in stopping:  # ended by our signal before it could take it: clean
                    return 0
                return code if code >= 0 else 128 - code
            if time.monotonic() - started > RESTART_RESET:
                deaths = 0
            delay = restart_delay(deaths)
            deaths += 1
            reason = f"worker process died ({exit_reason(code)}) while running it"
            log.error(
                "worker %s (pid %d) exited with %s without being asked to stop; settling its "
                "tasks and starting a new worker in %gs",
                worker_id,
                child.pid,
                exit_reason(code),
                delay,
            )
            try:
                # bounded: a database cut off without a word must not keep us from
                # starting a new worker (or from stopping)
                settled = asyncio.run(
                    asyncio.wait_for(settle(dsn, worker_id, reason, handlers), SETTLE_SECONDS)
                )
            except Exception as exc:  # unreachable database, or anything else: best effort
                log.error(
                    "cannot settle the tasks of worker %s (%s): their leases will run out",
                    worker_id,
                    exc,
                )
            else:
                if settled:
                    log.warning("tasks of worker %s settled: %s", worker_id, settled)
            deadline = time.monotonic() + delay
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.05)
            if stopping:
                return 0
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        for s, handler in previous.items():
            signal.signal(s, handler)


async def settle(
    dsn: str, worker_id: str, reason: str, handlers: Mapping[str, Handler]
) -> dict[str, list[int]]:
    """Fail or bury every task the dead worker `worker_id` still held, with `reason`."""
    conn = await database.connect(dsn)
    try:
        held = await conn.fetch(SQL["task_running_by_worker"], worker_id)
        fail = [r for r in held if r["attempt"] < r["max_attempts"]]
        bury = [r for r in held if r["attempt"] >= r["max_attempts"]]
        failed = await conn.fetch(
            SQL["task_fail_many_if_leased"],
            [r["id"] for r in fail],
            [r["lease_token"] for r in fail],
            [_retry_in(handlers.get(r["action"]), r["attempt"]) for r in fail],
            [reason for _ in fail],
        )
        buried = await conn.fetch(
            SQL["task_bury_many_if_leased"],
            [r["id"] for r in bury],
            [r["lease_token"] for r in bury],
            [f"{reason} (attempt {r['attempt']} of {r['max_attempts']})" for r in bury],
            [False for _ in bury],
        )
        return {
            k: sorted(r["id"] for r in rows)
            for k, rows in (("failed", failed), ("buried", buried))
            if rows
        }
    finally:
        await conn.close(timeout=2)


def _retry_in(handler: Handler | None, attempt: int) -> float:
    if handler is not None:
        return handler.retry_delay(attempt)
    return DEFAULT_BACKOFF[min(attempt, len(DEFAULT_BACKOFF)) - 1] * (1 + DEFAULT_JITTER)
