"""Every route of the HTTP API against a real `tasklease api` process and database."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasklease.engine.database import with_database
from tasklease.engine.states import TaskState
from tests.conftest import create_database, drop_database, pooled
from tests.e2e.test_auth_and_client import cli
from tests.support.db import connect_db, force_state, wait_until
from tests.support.procs import REPO, Procs


@pytest.fixture(scope="module")
async def api_db(admin_dsn: str, template: str) -> AsyncIterator[str]:
    name = await create_database(admin_dsn, template)
    yield with_database(admin_dsn, name)
    await drop_database(admin_dsn, name)


@pytest.fixture(scope="module")
def api(api_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dsn, env = pooled(api_db)  # through PgBouncer in the pooler pass
    procs = Procs(
        tmp_path_factory.mktemp("api"),
        {"DATABASE_URL": dsn, "TASKLEASE_REPORT_SECONDS": "0.2", **env},
    )
    _, url = procs.api()
    yield url
    procs.stop_all()


@pytest.fixture
async def http(api: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api) as client:
        yield client


@pytest.fixture
async def conn(api_db: str) -> AsyncIterator[asyncpg.Connection]:
    c = await connect_db(api_db)
    yield c
    await c.close()


async def count(conn: asyncpg.Connection, table: str = "tasks") -> int:
    n: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
    return n


async def new(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("payload", {"action": "noop"})
    r = await http.post("/tasks", json=body)
    assert r.status_code == 201, r.text
    task: dict[str, Any] = r.json()
    return task


async def test_per_task_scheduling_options_are_kept_and_shown(http: httpx.AsyncClient) -> None:
    plain = await new(http)
    assert (plain["lease_seconds"], plain["timeout_seconds"]) == (None, None)  # the action's
    task = await new(http, queue="reports", priority=-3, lease_seconds=600, timeout_seconds=90.5)
    shown = (await http.get(f"/tasks/{task['id']}")).json()
    assert (shown["queue"], shown["priority"]) == ("reports", -3)
    assert (shown["lease_seconds"], shown["timeout_seconds"]) == (600.0, 90.5)
    assert (await http.get("/schedules")).json() == []  # no periodic handler loaded here


# --- batch -------------------------------------------------------------------------------


async def test_batch_submits_all_in_order(
    http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    before = await count(conn, "task_transitions")
    body = {
        "tasks": [{"payload": {"action": "noop", "n": i}, "queue": "batch"} for i in range(5)]
        + [
            {"action": "email_user", "payload": {"user_id": 1}, "idempotency_key": "b-1"},
            {
                "action": "email_user",
                "payload": {"user_id": 1},
                "idempotency_key": "b-1",
                "due_at": "2030-01-01T00:00:00Z",  # not compared
            },
        ]
    }
    r = await http.post("/tasks/batch", json=body)
    assert r.status_code == 201, r.text
    tasks = r.json()["tasks"]
    assert [t["payload"].get("n") for t in tasks[:5]] == [0, 1, 2, 3, 4]
    assert tasks[5]["id"] == tasks[6]["id"] and tasks[6]["due_at"] == tasks[5]["due_at"]
    assert all(t["state"] == "PENDING" for t in tasks)
    assert await count(conn, "task_transitions") == before + 6


@pytest.mark.parametrize(
    "bad, status, needle",
    [
        ({"payload": {"action": "send_fax"}}, 422, "tasks[2]: unknown action 'send_fax'"),
        (
            {"payload": {"action": "email_user", "user_id": "x"}},
            422,
            "tasks[2]: payload does not fit",
        ),
        ({"payload": {"action": "noop"}, "due_at": "soon"}, 400, "tasks[2].due_at"),
        ({"payload": {"action": "noop"}, "priority": "high"}, 400, "tasks[2].priority"),
        ({"payload": {"action": "noop"}, "due_at": "2200-01-01T00:00:00Z"}, 400, "tasks[2].due_at"),
        ({"payload": None}, 400, "tasks[2].payload"),
    ],
)
async def test_batch_with_one_bad_task_writes_nothing(
    http: httpx.AsyncClient,
    conn: asyncpg.Connection,
    bad: dict[str, Any],
    status: int,
    needle: str,
) -> None:
    before = (await count(conn), await count(conn, "task_transitions"))
    good = {"payload": {"action": "noop"}}
    r = await http.post("/tasks/batch", json={"tasks": [good, good, bad, good]})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"], r.text
    assert (await count(conn), await count(conn, "task_transitions")) == before


async def test_a_batch_reusing_a_key_with_other_content_is_409_and_writes_nothing(
    http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    held = await new(http, payload={"action": "noop", "n": 1}, idempotency_key="batch-held")
    before = (await count(conn), await count(conn, "task_transitions"))
    plain = {"payload": {"action": "noop"}}
    reused = {"payload": {"action": "noop", "n": 1}, "idempotency_key": "batch-held"}
    r = await http.post(
        "/tasks/batch",
        json={"tasks": [plain, reused, plain, {**reused, "priority": 9}, {**reused, "queue": "x"}]},
    )
    assert r.status_code == 409, r.text
    assert r.json() == {
        "status_code": 409,
        "detail": f"tasks[3]: idempotency_key 'batch-held' is already used by task {held['id']} "
        "with a different priority",
        "extra": {
            "idempotency_key": "batch-held",
            "task_id": held["id"],
            "fields": ["priority"],
            "index": 3,
        },
    }
    # one key, two contents within the batch
    given = {"payload": {"action": "noop"}, "idempotency_key": "batch-new"}
    r = await http.post(
        "/tasks/batch", json={"tasks": [given, plain, {**given, "lease_seconds": 60}]}
    )
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        "tasks[2]: idempotency_key 'batch-new' is also given to tasks[0] with a different "
        "lease_seconds"
    )
    assert r.json()["extra"] == {
        "idempotency_key": "batch-new",
        "task_id": None,
        "fields": ["lease_seconds"],
        "index": 2,
        "earlier": 0,
    }
    assert (await count(conn), await count(conn, "task_transitions")) == before


async def test_empty_batch_is_refused(http: httpx.AsyncClient) -> None:
    r = await http.post("/tasks/batch", json={"tasks": []})
    assert r.status_code == 400 and "tasks" in r.text


# --- listing -----------------------------------------------------------------------------


async def test_list_pages_newest_first_with_filters(http: httpx.AsyncClient) -> None:
    ids = [(await new(http, queue="paging", payload={"action": "noop"}))["id"] for _ in range(5)]
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"queue": "paging", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await http.get("/tasks", params=params)).json()
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)

    mail = await new(http, queue="paging", payload={"action": "email_user", "user_id": 3})
    by_action = (
        await http.get("/tasks", params={"action": "email_user", "queue": "paging"})
    ).json()
    assert [t["id"] for t in by_action["tasks"]] == [mail["id"]]
    pending = (await http.get("/tasks", params={"state": "PENDING", "queue": "paging"})).json()
    assert len(pending["tasks"]) == 6 and pending["next_cursor"] is None
    none = (await http.get("/tasks", params={"state": "DEAD", "queue": "paging"})).json()
    assert none == {"tasks": [], "next_cursor": None}


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"state": "SLEEPING"}, "state"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "-1"}, "cursor"),
        ({"limit": "x"}, "limit"),
        ({"queue": "a\x00b"}, "invalid value"),
        ({"cursor": "9999999999999999999"}, "`cursor`: 9999999999999999999 is not a task id"),
    ],
)
async def test_list_rejects_bad_parameters(
    http: httpx.AsyncClient, params: dict[str, Any], needle: str
) -> None:
    r = await http.get("/tasks", params=params)
    assert r.status_code == 400, r.text
    assert needle in r.json()["detail"]


# --- cancel and requeue ------------------------------------------------------------------


async def test_cancel_waiting_tasks_at_once(
    http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    pending = await new(http)
    failed = await new(http)
    await force_state(conn, failed["id"], TaskState.FAILED, due_in=60)
    for task in (pending, failed):
        r = await http.post(f"/tasks/{task['id']}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "CANCELLED", r.text
    history = (await http.get(f"/tasks/{failed['id']}/transitions")).json()
    assert history[-1]["trigger"] == "cancel" and history[-1]["from_state"] == "FAILED"


async def test_cancel_running_task_asks_its_worker(
    http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    task = await new(http)
    await force_state(conn, task["id"], TaskState.RUNNING)
    r = await http.post(f"/tasks/{task['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "RUNNING" and r.json()["cancel_requested_at"] is not None
    again = await http.post(f"/tasks/{task['id']}/cancel")
    assert again.json()["cancel_requested_at"] == r.json()["cancel_requested_at"]


@pytest.mark.parametrize("state", [TaskState.COMPLETED, TaskState.CANCELLED, TaskState.DEAD])
async def test_cancel_finished_task_is_a_conflict(
    http: httpx.AsyncClient, conn: asyncpg.Connection, state: TaskState
) -> None:
    task = await new(http)
    await force_state(conn, task["id"], state)
    r = await http.post(f"/tasks/{task['id']}/cancel")
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        f"task {task['id']} is {state}: only PENDING, FAILED, WAITING or RUNNING tasks "
        "can be cancelled"
    )


async def test_requeue_dead_task(http: httpx.AsyncClient, conn: asyncpg.Connection) -> None:
    task = await new(http)
    await force_state(conn, task["id"], TaskState.DEAD, attempt=5)
    r = await http.post(f"/tasks/{task['id']}/requeue")
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["attempt"]) == ("PENDING", 0)
    conflict = await http.post(f"/tasks/{task['id']}/requeue")
    assert conflict.status_code == 409
    assert "only DEAD tasks can be requeued" in conflict.json()["detail"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/tasks/987654"),
        ("GET", "/tasks/987654/transitions"),
        ("POST", "/tasks/987654/cancel"),
        ("POST", "/tasks/987654/requeue"),
        ("GET", "/tasks/abc"),
        ("GET", "/nowhere"),
    ],
)
async def test_unknown_ids_and_routes_are_404(
    http: httpx.AsyncClient, method: str, path: str
) -> None:
    r = await http.request(method, path)
    assert r.status_code == 404, r.text
    assert set(r.json()) == {"status_code", "detail", "extra"}


# --- stats, health, metrics --------------------------------------------------------------


async def test_stats_counts_every_state_and_queue_lag(
    http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    late = await new(http, queue="lagging", due_at="2026-01-01T00:00:00Z")
    await new(http, queue="lagging", due_at="2099-01-01T00:00:00Z")
    stats = (await http.get("/stats")).json()
    assert set(stats["states"]) == {s.value for s in TaskState}
    lagging = stats["queues"]["lagging"]
    assert lagging["states"]["PENDING"] == 2 and lagging["due"] == 1
    assert lagging["oldest_due_seconds"] > 3600  # due since January
    assert stats["oldest_due_seconds"] >= lagging["oldest_due_seconds"]
    total = await count(conn)
    assert sum(stats["states"].values()) == total
    await conn.execute("DELETE FROM tasks WHERE id = $1", late["id"])


async def test_health_and_readiness(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = (await http.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["schema"]


async def test_metrics_in_prometheus_format(http: httpx.AsyncClient) -> None:
    before = await submissions(http)
    await new(http)
    await new(http)

    async def counted() -> bool:
        return await submissions(http) >= before + 2

    await wait_until(counted, "the API's counters to reach /metrics")
    r = await http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {
        "tasklease_tasks",
        "tasklease_transitions",
        "tasklease_submissions",
        "tasklease_handler_duration_seconds",
        "tasklease_lease_expiries",
        "tasklease_queue_lag_seconds",
        "tasklease_workers",
    } <= names


async def submissions(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "tasklease_submissions":
            return float(family.samples[0].value)
    raise AssertionError("no tasklease_submissions in /metrics")


# --- hand-written bad input --------------------------------------------------------------


BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b"", 400, "body is empty"),
    (b"{", 400, "malformed JSON"),
    (b"[]", 400, "Expected `object`"),
    (b"null", 400, "Expected `object`"),
    (b'{"payload": {"action": "noop"}', 400, "malformed JSON"),
    (b'{"payload": {"action": "noop"}, "payload": 1}', 400, "payload"),
    (b'{"payload": null}', 400, "payload"),
    (b'{"payload": {"action": "noop"}, "queue": ""}', 400, "queue"),
    (b'{"payload": {"action": "noop"}, "queue": null}', 400, "queue"),
    (b'{"payload": {"action": "noop"}, "idempotency_key": 7}', 400, "idempotency_key"),
    (b'{"payload": {"action": "noop"}, "priority": 1e9}', 400, "priority"),
    (b'{"payload": {"action": "noop"}, "max_attempts": true}', 400, "max_attempts"),
    (b'{"payload": {"action": "noop"}, "due_at": "2026-13-40T99:00:00Z"}', 400, "due_at"),
    ('{"payload": {"action": "\u00e9\u00e8\U0001f4a5"}}'.encode(), 422, "unknown action"),
    (b'{"payload": {"action": "noop"}, "action": "x\\u0000y"}', 422, "unknown action"),
    (b'\xff\xfe{"payload": {}}', 400, "malformed JSON"),
    (b'{"payload": {"action": 5}}', 422, "no action"),
    (b'{"payload": {"action": "noop", "text": "a\\u0000b"}}', 400, "invalid value"),
    (b'{"payload": {"action": "noop"}, "timeout_seconds": 0}', 400, "timeout_seconds"),
    (b'{"payload": {"action": "noop"}, "lease_seconds": "60"}', 400, "lease_seconds"),
    (b'{"payload": {"action": "noop"}, "lease_seconds": 0.001}', 400, "lease_seconds"),
    (b'{"payload": {"action": "noop"}, "lease_seconds": 604801}', 400, "lease_seconds"),
    (b'{"payload": {"action": "noop"}, "timeout_seconds": 0.01}', 400, "timeout_seconds"),
    (b'{"payload": {"action": "noop"}, "idempotency_key": "schedule:n:1"}', 422, "reserved"),
    (b'{"payload": {"action": "noop", "a": ' + b"[" * 64 + b"]" * 64 + b"}}", 400, "nests more"),
    (b'{"payload": {"action": "noop"}, "queue": "a\\u0000"}', 400, "invalid value at queue"),
    (b'{"payload": {"action": "noop", "k\\u0000": 1}}', 400, "invalid value at payload"),
]


@pytest.mark.parametrize("body, status, needle", BAD_BODIES)
async def test_bad_bodies_get_a_clear_4xx_and_write_nothing(
    http: httpx.AsyncClient, conn: asyncpg.Connection, body: bytes, status: int, needle: str
) -> None:
    before = await count(conn)
    r = await http.post("/tasks", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"], r.text
    assert await count(conn) == before


@pytest.mark.parametrize(
    "due_at",
    [
        "0001-01-01T00:00:00Z",  # was accepted, and stored as -infinity by asyncpg
        "1969-12-31T23:59:59.999999Z",
        "2200-01-01T00:00:00Z",
        "2200-01-01T05:00:00+05:00",
        "9999-12-31T23:59:59Z",
    ],
)
async def test_due_at_out_of_range_is_400_naming_the_field(
    http: httpx.AsyncClient, conn: asyncpg.Connection, due_at: str
) -> None:
    before = await count(conn)
    r = await http.post("/tasks", json={"payload": {"action": "noop"}, "due_at": due_at})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["detail"].startswith("due_at: ") and "out of range" in r.text
    assert "1970-01-01T00:00:00Z" in body["detail"] and body["extra"] == {"field": "due_at"}
    good = {"payload": {"action": "noop"}}
    r = await http.post("/tasks/batch", json={"tasks": [good, {**good, "due_at": due_at}]})
    assert r.status_code == 400, r.text
    assert "tasks[1].due_at" in r.json()["detail"]
    assert r.json()["extra"] == {"field": "tasks[1].due_at"}
    assert await count(conn) == before


async def test_due_at_range_ends_are_accepted_and_a_past_time_runs_now(
    http: httpx.AsyncClient,
) -> None:
    for given, stored in [
        ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"),
        ("1970-01-01T01:00:00+01:00", "1970-01-01T00:00:00Z"),
        ("2199-12-31T23:59:59.999999Z", "2199-12-31T23:59:59.999999Z"),
    ]:
        task = await new(http, due_at=given, queue="due-range")
        assert (task["due_at"], task["state"]) == (stored, "PENDING")
    stats = (await http.get("/stats")).json()["queues"]["due-range"]
    assert stats["due"] == 2  # the two in 1970: due now, waiting for a worker


async def test_a_repeated_key_with_the_same_content_returns_the_task(
    http: httpx.AsyncClient,
) -> None:
    """The same: action, payload as a JSON value, queue, priority, max_attempts (as resolved:
    noop's 5 when not given), lease and timeout. due_at is not compared."""
    body = {
        "payload": {"action": "noop", "n": 1, "tags": ["a", "b"]},
        "idempotency_key": "same-1",
        "queue": "q",
        "priority": 2,
        "lease_seconds": 60,
    }
    first = await new(http, **body)
    again = {
        **body,
        "payload": {"tags": ["a", "b"], "n": 1.0, "action": "noop"},
        "max_attempts": 5,
        "due_at": "2030-01-01T00:00:00Z",
    }
    raw = json.dumps(again, indent=4).encode()  # whitespace and key order do not matter
    r = await http.post("/tasks", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == first["id"] and r.json()["due_at"] == first["due_at"]


async def test_a_repeated_key_with_other_content_is_409_naming_the_key_and_the_task(
    http: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    first = await new(http, payload={"action": "noop", "n": 1}, idempotency_key="k1")
    before = await count(conn)
    r = await http.post(
        "/tasks", json={"payload": {"action": "noop", "n": 2}, "idempotency_key": "k1"}
    )
    assert r.status_code == 409, r.text
    assert r.json() == {
        "status_code": 409,
        "detail": f"idempotency_key 'k1' is already used by task {first['id']} with a "
        "different payload",
        "extra": {"idempotency_key": "k1", "task_id": first["id"], "fields": ["payload"]},
    }
    r = await http.post(
        "/tasks",
        json={"action": "email_user", "payload": {"user_id": 1}, "idempotency_key": "k1"},
    )
    assert r.status_code == 409 and r.json()["extra"]["fields"] == ["action", "payload"]
    r = await http.post(
        "/tasks",
        json={"payload": {"action": "noop", "n": 1}, "idempotency_key": "k1", "max_attempts": 2},
    )
    assert r.status_code == 409 and "different max_attempts" in r.json()["detail"]
    assert await count(conn) == before


async def test_unicode_and_nested_payloads_round_trip(http: httpx.AsyncClient) -> None:
    payload = {
        "action": "noop",
        "text": "héllo \u4e16\u754c \U0001f600",
        "nested": {"a": [1, None, True]},
    }
    task = await new(http, payload=payload, queue="ünïcode")
    fetched = (await http.get(f"/tasks/{task['id']}")).json()
    assert (fetched["payload"], fetched["queue"]) == (payload, "ünïcode")


async def test_huge_body_is_413(http: httpx.AsyncClient, conn: asyncpg.Connection) -> None:
    before = await count(conn)
    big = json.dumps({"payload": {"action": "noop", "blob": "x" * (1024 * 1024)}})
    r = await http.post("/tasks", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert await count(conn) == before


# --- cross-site submissions ------------------------------------------------------------


QUICK = b'{"payload": {"action": "noop"}}'


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/tasks", {"content-type": "text/plain"}, 415),
        ("/tasks", {"content-type": "application/x-www-form-urlencoded"}, 415),
        ("/tasks", {"content-type": "multipart/form-data; boundary=x"}, 415),
        ("/tasks", {"content-type": "application/json; charset=latin-1"}, 415),
        ("/tasks", {}, 415),
        ("/tasks/batch", {"content-type": "text/plain"}, 415),
        ("/tasks", {"content-type": "application/json", "origin": "https://evil.example"}, 403),
        ("/tasks", {"content-type": "application/json", "sec-fetch-site": "cross-site"}, 403),
        ("/tasks", {"content-type": "text/plain", "origin": "null"}, 403),
    ],
)
async def test_cross_site_and_non_json_submissions_are_refused(
    http: httpx.AsyncClient,
    conn: asyncpg.Connection,
    path: str,
    headers: dict[str, str],
    status: int,
) -> None:
    body = b'{"tasks": [{"payload": {"action": "noop"}}]}' if path.endswith("batch") else QUICK
    before = await count(conn)
    r = await http.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert await count(conn) == before


async def test_cancel_and_requeue_refuse_cross_site_requests(
    http: httpx.AsyncClient, api: str
) -> None:
    task = await new(http)
    for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}):
        for action in ("cancel", "requeue"):
            r = await http.post(f"/tasks/{task['id']}/{action}", headers=headers)
            assert r.status_code == 403, r.text
    assert (await http.get(f"/tasks/{task['id']}")).json()["state"] == "PENDING"
    # the same page (Origin = this API) and non-browser clients are served
    same = {"origin": api, "sec-fetch-site": "same-origin"}
    assert (await http.post(f"/tasks/{task['id']}/cancel", headers=same)).status_code == 200
    r = await http.post(
        "/tasks", content=QUICK, headers={**same, "content-type": "application/json"}
    )
    assert r.status_code == 201, r.text


# --- limits ------------------------------------------------------------------------------


async def test_limits_are_set_listed_and_removed_over_the_api_and_the_cli(
    http: httpx.AsyncClient, api: str, conn: asyncpg.Connection
) -> None:
    assert (await http.get("/limits")).json() == []
    r = await http.put("/limits/action:noop", json={"value": 3})
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("key", "value", "per_seconds", "declared", "used")} == {
        "key": "action:noop",
        "value": 3,
        "per_seconds": None,
        "declared": False,
        "used": 0,
    }
    assert await conn.fetchval("SELECT count(*) FROM limit_tokens") == 3
    for key, body, problem in (
        ("noop", {"value": 1}, "a key is queue:NAME, action:NAME, rate:NAME or key:NAME"),
        ("key:noop", {"value": 1}, "which payload field? none is stored for it"),
        ("key:noop", {"value": 1001, "by": "customer"}, "must be 0 to 1000"),
        ("key:noop", {"value": 1, "by": ""}, "by"),
        ("action:noop", {"value": 1, "by": "customer"}, "only a key:NAME limit takes"),
        ("rate:noop", {"value": 1}, "a rate takes per_seconds"),
        ("action:noop", {"value": -1}, "value"),
        ("action:noop", {"value": "3"}, "value"),
        ("action:noop", {"value": 3, "per": 1}, "per"),
    ):
        r = await http.put(f"/limits/{key}", json=body)
        assert r.status_code == 400 and problem in r.json()["detail"], (body, r.text)
    assert [lim["value"] for lim in (await http.get("/limits")).json()] == [3]

    done = cli("limits", "set", "rate:noop", "10/s", url=api)
    assert done.returncode == 0 and "rate:noop = 10 per 1s" in done.stdout, done.stderr
    listed = cli("limits", url=api)
    assert listed.returncode == 0, listed.stderr
    assert "action:noop" in listed.stdout and "10 per 1s" in listed.stdout
    assert "operator" in listed.stdout
    wrong = cli("limits", "set", "rate:noop", "10", url=api)
    assert wrong.returncode == 1 and "a rate: key takes a rate" in wrong.stderr
    assert cli("limits", "unset", "rate:noop", url=api).returncode == 0
    # a per-key limit: the field once, then the value alone
    done = cli("limits", "set", "key:noop", "2", "--by", "customer", url=api)
    assert done.returncode == 0 and "key:noop = 2 running per customer" in done.stdout, done
    r = await http.put("/limits/key:noop", json={"value": 4})
    assert r.status_code == 200 and (r.json()["by"], r.json()["value"]) == ("customer", 4)
    assert r.json()["keys"] == 0
    wrong = cli("limits", "set", "action:noop", "2", "--by", "customer", url=api)
    assert wrong.returncode == 1 and "--by is for a key:NAME limit only" in wrong.stderr
    assert (await http.delete("/limits/key:noop")).status_code == 200
    assert (await http.delete("/limits/action:noop")).status_code == 200
    gone = await http.delete("/limits/action:noop")
    assert gone.status_code == 404 and "no limit action:noop" in gone.text
    assert (await http.get("/limits")).json() == []
    assert await conn.fetchval("SELECT count(*) FROM limit_tokens") == 0


async def test_a_queue_is_paused_and_resumed_over_the_api_and_the_cli(
    http: httpx.AsyncClient, api: str, conn: asyncpg.Connection
) -> None:
    r = await http.post("/queues/reports/pause")
    assert r.status_code == 200 and r.json()["paused"] and r.json()["paused_at"], r.text
    await new(http, queue="reports")  # still accepted
    stats = (await http.get("/stats")).json()
    assert stats["queues"]["reports"]["paused_at"] == r.json()["paused_at"]
    listed = cli("stats", url=api)
    assert listed.returncode == 0 and re.search(r"reports .* paused", listed.stdout), listed.stdout
    resumed = cli("resume", "reports", url=api)
    assert resumed.returncode == 0 and "queue reports runs" in resumed.stdout, resumed.stderr
    assert (await http.get("/stats")).json()["queues"]["reports"]["paused_at"] is None
    assert await conn.fetchval("SELECT count(*) FROM queue_pauses") == 0
    paused = cli("pause", "reports", url=api)
    assert paused.returncode == 0 and "workers start nothing in it" in paused.stdout
    assert (await http.post("/queues/reports/resume")).json() == {
        "queue": "reports",
        "paused": False,
        "paused_at": None,
    }


# --- OpenAPI -----------------------------------------------------------------------------


async def test_openapi_documents_every_route_and_its_errors(http: httpx.AsyncClient) -> None:
    doc = (await http.get("/schema/openapi.json")).json()
    operations = {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}
    expected = {
        ("POST", "/tasks"): {"200", "201", "400", "403", "409", "413", "415", "422", "503"},
        ("POST", "/tasks/batch"): {"201", "400", "403", "409", "413", "415", "422", "503"},
        ("GET", "/tasks"): {"200", "400", "503"},
        ("GET", "/tasks/{task_id}"): {"200", "404", "503"},
        ("GET", "/tasks/{task_id}/transitions"): {"200", "404", "503"},
        ("GET", "/workflows/{workflow_id}"): {"200", "400", "404", "503"},
        ("POST", "/tasks/{task_id}/cancel"): {"200", "403", "404", "409", "503"},
        ("POST", "/tasks/{task_id}/requeue"): {"200", "403", "404", "409", "503"},
        ("GET", "/stats"): {"200", "503"},
        ("GET", "/schedules"): {"200", "503"},
        ("GET", "/limits"): {"200", "503"},
        ("PUT", "/limits/{key}"): {"200", "400", "403", "415", "503"},
        ("DELETE", "/limits/{key}"): {"200", "400", "403", "404", "503"},
        ("POST", "/queues/{queue}/pause"): {"200", "400", "403", "503"},
        ("POST", "/queues/{queue}/resume"): {"200", "400", "403", "503"},
        ("GET", "/healthz"): {"200"},
        ("GET", "/readyz"): {"200", "503"},
        ("GET", "/metrics"): {"200", "503"},
    }
    assert set(operations) == set(expected)
    for key, statuses in expected.items():
        op = operations[key]
        assert statuses <= set(op["responses"]), (key, op["responses"].keys())
        assert op.get("operationId") and (op.get("summary") or op.get("description")), key
    for route in ("/tasks", "/tasks/batch"):
        assert "idempotency key" in operations[("POST", route)]["responses"]["409"]["description"]
    body = operations[("POST", "/tasks")]["requestBody"]["content"]["application/json"]
    assert body["schema"]["examples"], "POST /tasks shows the quick-start example"


def test_schemathesis_finds_no_server_error_or_schema_violation(api: str) -> None:
    """A bounded property-based run over every operation (seeded, so CI is repeatable)."""
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,response_headers_conformance,negative_data_rejection,"
        "unsupported_method"
    )
    command = [
        str(Path(sys.executable).parent / "st"),
        # 413 (a body over the size limit) counts as a rejection of invalid data: a body of
        # megabytes that the fuzzing phase made once was refused so, and reported as accepted
        "--config-file",
        str(Path(__file__).with_name("schemathesis.toml")),
        "run",
        f"{api}/schema/openapi.json",
        "--checks",
        checks,
        "--max-examples",
        "25",
        "--phases",
        "examples,coverage,fuzzing",
        "--seed",
        "20261126",
        # One worker thread: CPython 3.11 keeps the AST constructor's recursion counter per
        # interpreter, not per thread, so two threads that describe Hypothesis strategies at
        # once (each calls ast.parse on a lambda's source) can trip over each other with
        # "SystemError: AST constructor recursion depth mismatch" (reported as seen "rarely in
        # a threaded application" in python/cpython#106905). CI saw it twice in a row with 2.
        "--workers",
        "1",
        "--request-timeout",
        "30",  # a loaded CI machine is slow, not wrong
        "--no-color",
    ]
    for _ in range(3):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
        # Should it still happen (the bug is not about our API), the run is repeated.
        if "AST constructor recursion depth mismatch" not in result.stdout:
            break
    assert result.returncode == 0, result.stdout[-6000:]
    assert " passed" in result.stdout and "failure" not in result.stdout
