"""Workers run in the tests' own process, on the test's database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tasklease.engine import registry
from tasklease.engine.registry import Handler
from tasklease.engine.store import Store
from tasklease.engine.worker import Worker, WorkerConfig

HANDLERS = registry.load(["tests.support.handlers"])


class Running:
    def __init__(self) -> None:
        self.workers: list[tuple[Worker, asyncio.Task[None]]] = []

    def start(
        self, store: Store, handlers: dict[str, Handler] | None = None, **config: object
    ) -> Worker:
        """A worker with these handlers (by default all of tests/support/handlers.py)."""
        # the tests' process must not end itself to fence a lease (engine/leases.py)
        cfg = WorkerConfig(
            **{
                "concurrency": 4,
                "poll_interval": 0.05,
                "grace_seconds": 5,
                "exit_to_fence": False,
                **config,
            }
        )  # type: ignore[arg-type]
        worker = Worker(store, HANDLERS if handlers is None else handlers, cfg)
        self.workers.append((worker, asyncio.create_task(worker.run())))
        return worker

    async def stop(self, worker: Worker) -> None:
        for w, task in self.workers:
            if w is worker:
                w.stop()
                await asyncio.wait_for(task, 30)


async def running_workers() -> AsyncIterator[Running]:
    running = Running()
    yield running
    for w, _ in running.workers:
        w.stop()
        w.stop()
    await asyncio.gather(*(t for _, t in running.workers), return_exceptions=True)
