"""Waiting out a database that cannot be reached, one way everywhere in the worker; and
keeping the worker's services running.

The statements are safe to run again (each transition is guarded by its token), so a
transient error (engine.store.TRANSIENT_ERRORS: a dropped connection, a restarting server,
a serialization failure) is retried after a pause that doubles from 0.25 s up to `most`,
with a line in the log for each failure and one when the database answers again, until
`stop` is set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def wait_for(*events: asyncio.Event, timeout: float | None) -> None:
    """Until one of the events is set, or the timeout passes."""
    waiters = {asyncio.ensure_future(e.wait()) for e in events}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class Retry:
    """`what` failed with a transient error: `await retry.after(exc)` logs it and waits,
    then says to try again (False, at once, when `stop` is already set: give up);
    `retry.succeeded()` once it works."""

    def __init__(
        self, what: str, stop: asyncio.Event, log: logging.Logger, *, most: float = 10.0
    ) -> None:
        self.what, self.stop, self.log, self.most = what, stop, log, most
        self.failures = 0

    async def after(self, exc: BaseException) -> bool:
        if self.stop.is_set():
            return False
        self.failures += 1
        delay = min(0.25 * 2**self.failures, self.most)
        self.log.warning("cannot %s (%s); retrying in %.1fs", self.what, describe(exc), delay)
        await wait_for(self.stop, timeout=delay)
        return True

    def succeeded(self) -> None:
        if self.failures:
            self.log.info("%s: database reachable again", self.what)
        self.failures = 0


async def keep_running(
    what: str, run: Callable[[], Awaitable[None]], log: logging.Logger, *, first: float = 1.0
) -> None:
    """Run one of the worker's services (the outcome writer, the listener, the scheduler,
    retention) until it returns or is cancelled. A service that crashes (a bug, not the
    database: each waits that out itself) is logged with its traceback and started again
    after a pause that doubles from 1 s up to 60 s, instead of dying unseen while the worker
    goes on without it."""
    crashes = 0
    while True:
        try:
            await run()
            return
        except Exception:
            crashes += 1
            delay = min(first * 2 ** (crashes - 1), 60.0)
            log.exception("%s crashed (%d time(s)); starting it again in %gs", what, crashes, delay)
            await asyncio.sleep(delay)
