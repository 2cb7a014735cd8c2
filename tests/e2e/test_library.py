"""tasklease as a library, with real worker processes: a user's project with its own
`handlers`, `api` and `schema` packages; enqueue inside the caller's transaction; writes in a
handler's transaction kept exactly once when its worker is paused past its lease; and the
wheel installs one top-level package."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import asyncpg
import httpx
import pytest

from tasklease import Client, TaskState
from tests.support.db import connect_db, state_of, triggers, wait_until
from tests.support.procs import REPO, Procs, free_port, wait_for_http

S = TaskState
pytestmark = pytest.mark.slow

USER_PROJECT = {
    "schema/__init__.py": """
        import msgspec

        class Welcome(msgspec.Struct):
            user_id: int
    """,
    "api/__init__.py": """
        GREETING = "welcome"
    """,
    "handlers/__init__.py": "",
    "handlers/emails.py": """
        from api import GREETING
        from schema import Welcome
        from tasklease import TaskContext, handler

        @handler("send_welcome", max_attempts=2)
        async def send_welcome(ctx: TaskContext, payload: Welcome) -> dict:
            return {"sent": GREETING, "to": payload.user_id, "attempt": ctx.attempt}
    """,
}


async def test_a_user_project_with_its_own_handlers_api_and_schema(
    procs: Procs, db: str, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    for name, source in USER_PROJECT.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(textwrap.dedent(source))
    worker = procs.start(
        "worker", "worker", "--handlers", "handlers.emails", "--poll-interval", "0.05", cwd=project
    )
    port = free_port()
    api = procs.start(
        "api", "api", "--port", str(port), "--handlers", "handlers.emails", cwd=project
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz", api)
    async with httpx.AsyncClient(base_url=url) as http:
        bad = await http.post(
            "/tasks", json={"action": "send_welcome", "payload": {"user_id": "x"}}
        )
        created = await http.post(
            "/tasks", json={"action": "send_welcome", "payload": {"user_id": 3}}
        )
    assert bad.status_code == 422, bad.text  # the user's own schema package validates it
    assert created.status_code == 201, created.text
    async with Client(db) as client:
        done = await client.wait(created.json()["id"], timeout=60)
    assert done.state is S.COMPLETED, worker.output()
    assert done.result == {"sent": "welcome", "to": 3, "attempt": 1}


async def test_enqueue_rolled_back_never_runs_committed_does(
    procs: Procs, db: str, conn: asyncpg.Connection
) -> None:
    procs.worker("worker")
    async with Client(db) as client:
        mine = await connect_db(db)
        try:
            tx = mine.transaction()
            await tx.start()
            gone = await client.submit("email_user", {"user_id": 1}, connection=mine)
            await tx.rollback()
            async with mine.transaction():
                kept = await client.submit("email_user", {"user_id": 2}, connection=mine)
                await mine.execute("SELECT pg_sleep(0.3)")  # no worker can see it yet
                assert await conn.fetchval("SELECT count(*) FROM tasks") == 0
        finally:
            await mine.close()
        done = await client.wait(kept.id, timeout=60)
        assert done.state is S.COMPLETED
    assert await conn.fetchval("SELECT count(*) FROM tasks WHERE id = $1", gone.id) == 0
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 1


async def handler_in_transaction(conn: asyncpg.Connection) -> bool:
    """A handler's transaction is open (its connection idle in transaction)."""
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tasklease-handler'"
            " AND state = 'idle in transaction'"
        )
    )


async def test_writes_of_a_paused_worker_are_kept_once(
    procs: Procs, db: str, conn: asyncpg.Connection
) -> None:
    """Worker A writes in its handler's transaction and is paused (SIGSTOP) past its lease;
    worker B takes the task over and completes it with its own write; A resumes, finishes its
    transaction and is refused by the lease guard, or its lease keeper (engine/leases.py) gets
    there first: it cancels the handler inside its transaction, or, the handler ignoring that,
    ends the process. Either way its write is rolled back. One write."""
    lease = ("--lease-seconds", "2", "--concurrency", "1")
    a = procs.worker("a", *lease)
    async with Client(db, handlers=["tests.support.handlers"]) as client:
        # the first attempt stays in its transaction for 8 s, ignoring being told to stop
        task = await client.submit("test_tx_write", {"pause_first": 8})
        await wait_until(lambda: handler_in_transaction(conn), "A's handler in its transaction")
        a.signal_tree(signal.SIGSTOP)
        b = procs.worker("b", *lease)
        done = await client.wait(task.id, timeout=60)
        assert done.state is S.COMPLETED and done.attempt == 2, b.output()
        a.signal_tree(signal.SIGCONT)

        async def a_refused() -> bool:
            out = a.output()
            return any(
                said in out
                for said in ("this transaction is rolled back", "result dropped", "(status 75)")
            )

        await wait_until(a_refused, "A refused by the lease guard", timeout=60)
        await wait_until(
            lambda: _no_open_handler_transactions(conn), "A's transaction ended", timeout=60
        )
    rows = await conn.fetch("SELECT attempt, worker FROM effects WHERE task_id = $1", task.id)
    assert [r["attempt"] for r in rows] == [2], a.output()
    row = await state_of(conn, task.id)
    assert rows[0]["worker"] == row["worker"] != "a"
    assert await triggers(conn, task.id) == ["submit", "claim", "reclaim", "complete"]
    assert done.result == {"attempt": 2}
    assert "result dropped" in a.output() or "(status 75)" in a.output()


async def _no_open_handler_transactions(conn: asyncpg.Connection) -> bool:
    return not await handler_in_transaction(conn)


def test_the_wheel_installs_only_tasklease(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("tasklease-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"tasklease", wheel.name.split("-py")[0] + ".dist-info"}, tops
    for needed in (
        "tasklease/__init__.py",
        "tasklease/engine/queries.sql",
        "tasklease/schema/schema.sql",
        "tasklease/api/templates/ui/base.html",
        "tasklease/handlers/email_user.py",
        "tasklease/schema/migrations/versions/0007_submit_in_sql.py",
        "tasklease/schema/migrations/script.py.mako",
    ):
        assert needed in names, needed
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tasklease = tasklease.engine.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
