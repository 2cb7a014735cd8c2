"""The real thing: `tasklease api` and `tasklease worker` processes, HTTP, signals, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from tasklease.engine.embedded import Embedded
from tasklease.engine.states import TaskState
from tests.conftest import not_in_pooler_pass
from tests.support.db import (
    assert_completed_once,
    assert_histories_are_paths,
    connect_db,
    state_of,
    triggers,
    wait_until,
)
from tests.support.procs import REPO, Proc, Procs, free_port, wait_for_http

QUICK_START = {"due_at": "2026-01-20T12:00:00Z", "payload": {"action": "email_user", "user_id": 42}}


async def task_state(http: httpx.AsyncClient, task_id: int) -> str:
    return str((await http.get(f"/tasks/{task_id}")).json()["state"])


async def test_quick_start_request_completes(procs: Procs) -> None:
    _, url = procs.api()
    procs.worker("worker")
    async with httpx.AsyncClient(base_url=url) as http:
        created = await http.post("/tasks", json=QUICK_START)
        assert created.status_code == 201, created.text
        task = created.json()
        assert (task["action"], task["state"], task["payload"]) == (
            "email_user",
            "PENDING",
            QUICK_START["payload"],
        )

        async def completed() -> bool:
            return await task_state(http, task["id"]) == "COMPLETED"

        await wait_until(completed, "the quick-start task to complete")
        done = (await http.get(f"/tasks/{task['id']}")).json()
        assert done["attempt"] == 1 and done["result"]["status"] == "sent"
        history = (await http.get(f"/tasks/{task['id']}/transitions")).json()
        assert [(h["trigger"], h["from_state"], h["to_state"]) for h in history] == [
            ("submit", None, "PENDING"),
            ("claim", "PENDING", "RUNNING"),
            ("complete", "RUNNING", "COMPLETED"),
        ]
        assert history[0]["worker"] is None and history[1]["worker"] == history[2]["worker"]


async def test_api_submission_rules(procs: Procs, conn: asyncpg.Connection) -> None:
    _, url = procs.api()
    async with httpx.AsyncClient(base_url=url) as http:
        body = {
            "action": "noop",
            "payload": {},
            "idempotency_key": "k-1",
            "priority": 3,
            "queue": "q",
            "max_attempts": 2,
        }
        first = await http.post("/tasks", json=body)
        again = await http.post("/tasks", json=body)
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["id"] == again.json()["id"]
        assert (first.json()["priority"], first.json()["queue"], first.json()["max_attempts"]) == (
            3,
            "q",
            2,
        )
        # the handler's default when the request does not say
        default = await http.post("/tasks", json={"payload": {"action": "test_fail"}})
        assert default.json()["max_attempts"] == 3

        async def rejected(status: int, needle: str, **kwargs: object) -> None:
            r = await http.post("/tasks", **kwargs)  # type: ignore[arg-type]
            assert r.status_code == status, r.text
            assert needle in r.text, r.text

        await rejected(
            400, "JSON", content=b'{"payload": ', headers={"content-type": "application/json"}
        )
        await rejected(400, "payload", json={"action": "noop"})
        await rejected(400, "payload", json={"payload": "not an object"})
        await rejected(400, "due_at", json={"payload": {"action": "noop"}, "due_at": "tomorrow"})
        await rejected(
            400, "due_at", json={"payload": {"action": "noop"}, "due_at": "2026-01-20T12:00:00"}
        )
        await rejected(400, "colour", json={"payload": {"action": "noop"}, "colour": "red"})
        await rejected(400, "max_attempts", json={"payload": {"action": "noop"}, "max_attempts": 0})
        await rejected(422, "email_user", json={"payload": {"action": "send_fax"}})
        await rejected(422, "no action", json={"payload": {}})
        await rejected(422, "user_id", json={"payload": {"action": "email_user", "user_id": "x"}})
        await rejected(422, "user_id", json={"payload": {"action": "email_user"}})
        await rejected(
            413,
            "",
            content=b'{"payload": {"x": "' + b"a" * 1_100_000 + b'"}}',
            headers={"content-type": "application/json"},
        )
        missing = await http.get("/tasks/999999")
        assert missing.status_code == 404
        assert (await http.get("/tasks/999999/transitions")).status_code == 404
        assert (await http.get("/tasks/abc")).status_code in (400, 404)
    # nothing from the rejected requests reached the database
    assert await conn.fetchval("SELECT count(*) FROM tasks") == 2


async def test_killed_worker_task_is_finished_by_another(
    procs: Procs, conn: asyncpg.Connection, db: str
) -> None:
    """SIGKILL mid-handler: after the 2 s lease runs out another worker takes over."""
    first = procs.worker("worker-1")
    task_id = await conn.fetchval(
        "INSERT INTO tasks (action, payload) VALUES ('test_sleep', '{\"seconds\": 3}') RETURNING id"
    )
    await conn.execute(
        "INSERT INTO task_transitions (task_id, trigger, to_state, attempt) "
        "VALUES ($1, 'submit', 'PENDING', 0)",
        task_id,
    )

    async def started() -> bool:
        return bool(
            await conn.fetchval("SELECT count(*) FROM executions WHERE task_id = $1", task_id)
        )

    await wait_until(started, "the first worker to start the handler")
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    procs.worker("worker-2")

    async def completed() -> bool:
        return bool((await state_of(conn, task_id))["state"] == TaskState.COMPLETED)

    await wait_until(completed, "the second worker to finish the task")
    assert await triggers(conn, task_id) == ["submit", "claim", "reclaim", "complete"]
    runs = await conn.fetch(
        "SELECT attempt, worker FROM executions WHERE task_id = $1 ORDER BY id", task_id
    )
    assert [r["attempt"] for r in runs] == [1, 2]
    assert f":{first.pid}." in runs[0]["worker"] and runs[0]["worker"] != runs[1]["worker"]
    row = await state_of(conn, task_id)
    assert row["attempt"] == 2
    await assert_completed_once(conn)
    await assert_histories_are_paths(conn)


async def test_sigterm_hands_the_task_back(procs: Procs, conn: asyncpg.Connection) -> None:
    worker = procs.worker("worker", "--grace-seconds", "0.5")
    task_id = await conn.fetchval(
        "WITH t AS (INSERT INTO tasks (action, payload) VALUES ('test_sleep', '{\"seconds\": 60}') "
        "RETURNING id) INSERT INTO task_transitions (task_id, trigger, to_state, attempt) "
        "SELECT id, 'submit', 'PENDING', 0 FROM t RETURNING task_id"
    )

    async def started() -> bool:
        return bool(
            await conn.fetchval("SELECT count(*) FROM executions WHERE task_id = $1", task_id)
        )

    await wait_until(started, "the handler to start")
    assert worker.stop() == 0
    row = await state_of(conn, task_id)
    assert (row["state"], row["attempt"]) == (TaskState.PENDING, 0)
    assert await triggers(conn, task_id) == ["submit", "claim", "release"]
    assert "handing 1 unfinished task(s) back" in worker.output()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasklease.engine.cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreachable_database_is_one_clear_line() -> None:
    result = run_cli("worker", env={"DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:1/x"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "tasklease: cannot reach the database at postgresql://nobody:***@127.0.0.1:1/x"
    )


async def test_unmigrated_database_says_to_migrate(empty_db: str) -> None:
    result = run_cli("api", env={"DATABASE_URL": empty_db})
    assert result.returncode == 1
    assert "run `tasklease migrate`" in result.stderr


async def test_migrate_from_several_processes_at_once(empty_db: str) -> None:
    env = {"DATABASE_URL": empty_db}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tasklease.engine.cli", "migrate"],
            cwd=REPO,
            env={**os.environ, **env},
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [(p.wait(60), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in results), results
    conn = await connect_db(empty_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "args",
    [["worker", "--concurrency", "0"], ["worker", "--queues", ","], ["dev", "--workers", "x"]],
)
def test_bad_options_are_usage_errors(args: list[str]) -> None:
    result = run_cli(*args, env={})
    assert result.returncode == 2 and "error:" in result.stderr


def test_unknown_handler_module_is_one_line() -> None:
    result = run_cli("worker", "--handlers", "no.such.module", env={})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "tasklease: cannot import handler module 'no.such.module': No module named 'no'"
    )


@not_in_pooler_pass("`tasklease dev` on an embedded server of its own, with no PgBouncer in front")
async def test_dev_runs_everything_on_its_own_embedded_database(tmp_path: Path) -> None:
    """`tasklease dev` on a fresh data directory: quick start works, Ctrl-C leaves nothing."""
    data = tmp_path / "data"
    port = free_port()
    dev = Proc(
        ["dev", "--port", str(port), "--workers", "2"],
        tmp_path,
        "dev",
        {"DATABASE_URL": None, "TASKLEASE_DATA_DIR": str(data)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", dev, timeout=60)
        async with httpx.AsyncClient(base_url=url) as http:
            created = await http.post("/tasks", json=QUICK_START)
            assert created.status_code == 201

            async def completed() -> bool:
                return await task_state(http, created.json()["id"]) == "COMPLETED"

            await wait_until(completed, "completion under tasklease dev")
        children = subprocess.run(["pgrep", "-P", str(dev.pid)], capture_output=True, text=True)
        child_pids = children.stdout.split()
        assert len(child_pids) == 3, dev.output()  # the API and two workers
        dev.signal(signal.SIGINT)
        assert dev.wait(60) == 0, dev.output()
        for pid in child_pids:
            assert not os.path.exists(f"/proc/{pid}"), "a child outlived tasklease dev"
        assert not Embedded(data).is_running(), "the embedded server it started is still running"
        text = dev.output()
        assert "RUNNING -> COMPLETED" in text and "stopping the embedded PostgreSQL" in text
        assert f"dashboard: http://127.0.0.1:{port}/ui/" in text
    finally:
        dev.stop()
        Embedded(data).stop()


@not_in_pooler_pass("it crashes and restarts an embedded server of its own, with no PgBouncer")
async def test_dev_restarts_a_dead_worker_and_the_embedded_database(tmp_path: Path) -> None:
    """A handler that kills its worker (os._exit) and a crashed PostgreSQL (an immediate
    stop) do not take `tasklease dev` down: each is said in the log and started again, the
    poison task ends DEAD after its attempts, and other tasks still run."""
    data = tmp_path / "data"
    port = free_port()
    dev = Proc(
        ["dev", "--port", str(port), "--workers", "1", "--handlers", "tests.support.handlers"],
        tmp_path,
        "dev",
        {"DATABASE_URL": None, "TASKLEASE_DATA_DIR": str(data)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", dev, timeout=60)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            poison = (await http.post("/tasks", json={"action": "test_exit", "payload": {}})).json()

            async def dead() -> bool:
                return await task_state(http, poison["id"]) == "DEAD"

            await wait_until(dead, "the poison task DEAD after its attempts", timeout=90)
            # the worker's own supervisor says it and starts it again (engine/supervisor.py)
            assert dev.output().count("exited with status 3 without being asked") >= 2

            async def runs(what: str) -> None:
                task = (await http.post("/tasks", json=QUICK_START)).json()

                async def completed() -> bool:
                    try:
                        return await task_state(http, task["id"]) == "COMPLETED"
                    except (httpx.HTTPError, KeyError):  # 503 while the database is away
                        return False

                try:
                    await wait_until(completed, what, timeout=90)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{dev.output()[-6000:]}") from None

            await runs("a task after the poison one")
            # a crash: every server process quits at once, no checkpoint (recovery at start)
            server = Embedded(data)
            server._pg("pg_ctl", "stop", "-m", "immediate", "-D", str(server.pgdata))

            async def resubmitted() -> bool:
                try:
                    r = await http.post("/tasks", json=QUICK_START)
                except httpx.HTTPError:
                    return False
                return r.status_code == 201

            await wait_until(resubmitted, "the API to reach the database again", timeout=90)
            await runs("a task after the database was restarted")
        text = dev.output()
        assert "the embedded PostgreSQL is not running; starting it again" in text, text
        dev.signal(signal.SIGINT)
        assert dev.wait(60) == 0, dev.output()
    finally:
        dev.stop()
        Embedded(data).stop()
