"""Rows no submission can make today, written straight into the database (by an older
tasklease, or by hand in SQL), and every dashboard page and GET route of the API reading them:
4xx or a page, never a 5xx.

Timestamps: 'infinity', '-infinity', year 1, years PostgreSQL holds and Python cannot (BC,
after 9999). JSON: nesting deeper than Python's decoders go, numbers beyond float and int64,
odd unicode. Text: control and bidirectional characters, markup.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasklease.engine.states import TaskState
from tests.support.procs import Procs

pytestmark = pytest.mark.slow

TIMES = {
    "-infinity": "0001-01-01T00:00:00Z",
    "infinity": "9999-12-31T23:59:59.999999Z",
    "0001-01-01 00:00:00+00": "0001-01-01T00:00:00Z",
    "4713-01-01 00:00:00+00 BC": "0001-01-01T00:00:00Z",
    "294276-12-31 23:59:59+00": "9999-12-31T23:59:59.999999Z",
    "10000-01-01 00:00:00+00": "9999-12-31T23:59:59.999999Z",
    "9999-12-31 23:59:59.999999+00": "9999-12-31T23:59:59.999999Z",
    "1969-12-31 23:59:59+00": "1969-12-31T23:59:59Z",
}
DEPTH = 3000  # PostgreSQL stores it; msgspec and Python's json stop near 1,000
DEEP = '{"action": "noop", "deep": ' + "[" * DEPTH + "]" * DEPTH + "}"
NUMBERS = (
    '{"action": "noop", "float": 1e308, "int70": 1180591620717411303424, '
    '"huge": 1e400, "tiny": -1.5e-400, "neg": -0.0}'
)
ODD = "\u202eevil\u202c \u0301e\U0001f4a9 \uffff \u2028\u2029 \x01\x7f </script><b>x</b> &amp; '\""
UNICODE = json.dumps({"action": "noop", "s": ODD, "big": "é" * 100_000})
RESULTS = ["1e400", '"just text"', "null", "[1, 2, 3]", DEEP, NUMBERS, UNICODE]


@pytest.fixture
def api(procs: Procs) -> Iterator[str]:
    _, url = procs.api(env={"TASKLEASE_API_TOKEN": None})
    yield url


async def hostile_rows(conn: asyncpg.Connection) -> dict[str, list[int]]:
    """Tasks in every state with each odd timestamp in every timestamp column, odd payloads
    and results, and their history; a schedule and a process row with odd times too."""
    ids: dict[str, list[int]] = {}
    insert = """
        INSERT INTO tasks (action, queue, payload, state, attempt, max_attempts, due_at,
                           created_at, updated_at, lease_expires_at, lease_token,
                           cancel_requested_at, result, last_error, worker, idempotency_key,
                           lease_seconds, timeout_seconds)
        VALUES ($1, $2, $3::jsonb, $4::task_state, $5, 5, $6::text::timestamptz,
                $6::text::timestamptz, $6::text::timestamptz,
                CASE WHEN $4::task_state = 'RUNNING' THEN $6::text::timestamptz END,
                CASE WHEN $4::task_state = 'RUNNING' THEN gen_random_uuid() END,
                $7::text::timestamptz, $8::jsonb, $9, $10, $11, $12, $13)
        RETURNING id"""
    history = """
        INSERT INTO task_transitions (task_id, trigger, from_state, to_state, attempt, worker,
                                      at, detail)
        VALUES ($1, 'submit', NULL, 'PENDING', 0, NULL, $2::text::timestamptz, NULL),
               ($1, 'claim', 'PENDING', 'RUNNING', 1, $3, $2::text::timestamptz, $4)"""
    payloads = [DEEP, NUMBERS, UNICODE]
    n = 0
    for when in TIMES:
        for state in TaskState:
            payload = payloads[n % len(payloads)]
            result = RESULTS[n % len(RESULTS)] if state is TaskState.COMPLETED else None
            attempt = 0 if state is TaskState.PENDING else 1
            task_id = await conn.fetchval(
                insert,
                "noop" if n % 2 else "odd\u202e\U0001f4a9 <b>",
                "default" if n % 3 else "q&<\"'>",
                payload,
                state.value,
                attempt,
                when,
                when if state is TaskState.RUNNING else None,
                result,
                f"ValueError: {ODD}\n\nTraceback {ODD}" if n % 2 else None,
                f"w{ODD}" if state is TaskState.RUNNING else None,
                f"key-{n}-{ODD}",
                float("nan") if n % 4 == 0 else None,
                float("inf") if n % 4 == 1 else None,
            )
            await conn.execute(history, task_id, when, f"w{ODD}", ODD)
            ids.setdefault(when, []).append(task_id)
            n += 1
    # the timestamps of one task disagree with each other
    mixed = await conn.fetchval(
        insert, "noop", "default", NUMBERS, "RUNNING", 1, "-infinity", "infinity", None, None,
        "w", "mixed", None, None,
    )  # fmt: skip
    await conn.execute(
        "UPDATE tasks SET created_at = 'infinity', updated_at = '4713-01-01 BC' WHERE id = $1",
        mixed,
    )
    await conn.execute(history, mixed, "294276-01-01 00:00:00+00", "w", None)
    ids["mixed"] = [mixed]
    await conn.execute(
        """INSERT INTO schedules (name, action, every_seconds, payload, next_run_at,
                                  last_slot_at, last_task_id, updated_at)
           VALUES ('odd', 'noop', 'NaN', $1::jsonb, 'infinity', '-infinity', 9223372036854775807,
                   '294276-01-01 00:00:00+00'),
                  ('numbers', 'noop', 1e300, $2::jsonb, '4713-01-01 00:00:00+00 BC', NULL, NULL,
                   '0001-01-01 00:00:00+00')""",
        DEEP,
        NUMBERS,
    )
    await conn.execute(
        """INSERT INTO processes (id, kind, host, pid, queues, concurrency, running, counters,
                                  started_at, last_seen_at)
           VALUES ('from-the-future', 'worker', $1, 1, ARRAY['default'], 1, 0, '{}',
                   '-infinity', 'infinity'),
                  ('from-the-past', 'api', $1, 2, ARRAY['default'], 1, 0, '{}',
                   '4713-01-01 00:00:00+00 BC', '-infinity')""",
        ODD,
    )
    return ids


def no_server_error(r: httpx.Response) -> httpx.Response:
    where = f"{r.request.method} {r.request.url}"
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:800]}"
    return r


def deep_json(text: str) -> Any:
    """Python's json decoder recurses once per level: allow the deep payloads."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, DEPTH * 4))
    try:
        return json.loads(text)
    finally:
        sys.setrecursionlimit(limit)


async def test_every_page_and_route_reads_hostile_rows(api: str, conn: asyncpg.Connection) -> None:
    ids = await hostile_rows(conn)
    every = sorted(i for group in ids.values() for i in group)
    async with httpx.AsyncClient(base_url=api, timeout=60) as http:
        # --- the JSON API: every GET route ---
        listed: list[dict[str, Any]] = []
        cursor = None
        while True:
            params = {"limit": "7"} | ({"cursor": cursor} if cursor else {})
            page = deep_json(no_server_error(await http.get("/tasks", params=params)).text)
            listed += page["tasks"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(t["id"] for t in listed) == every
        for state in TaskState:
            r = no_server_error(await http.get("/tasks", params={"state": state.value}))
            assert r.status_code == 200
        for params in ({"queue": "q&<\"'>"}, {"action": "odd\u202e\U0001f4a9 <b>"}):
            assert deep_json(no_server_error(await http.get("/tasks", params=params)).text)
        for when, shown in TIMES.items():
            for task_id in ids[when]:
                task = deep_json(no_server_error(await http.get(f"/tasks/{task_id}")).text)
                assert (task["due_at"], task["created_at"], task["updated_at"]) == (shown,) * 3
                if task["state"] == "RUNNING":
                    assert task["lease_expires_at"] == shown
                    assert task["cancel_requested_at"] == shown
                steps = deep_json(
                    no_server_error(await http.get(f"/tasks/{task_id}/transitions")).text
                )
                assert [s["at"] for s in steps] == [shown, shown]
        numbers = next(t for t in listed if t["payload"].get("int70"))
        assert numbers["payload"]["int70"] == 2**70 and float(numbers["payload"]["float"]) == 1e308
        assert "1" + "0" * 400 in (await http.get(f"/tasks/{numbers['id']}")).text
        odd = next(t for t in listed if "s" in t["payload"])
        assert odd["payload"]["s"] == ODD
        deep = next(t for t in listed if "deep" in t["payload"])
        assert "[" * DEPTH in (await http.get(f"/tasks/{deep['id']}")).text
        stats = no_server_error(await http.get("/stats")).json()
        assert sum(stats["states"].values()) == len(every)
        assert stats["oldest_due_seconds"] > 0
        metrics = no_server_error(await http.get("/metrics")).text
        assert {f.name for f in text_string_to_metric_families(metrics)} >= {"tasklease_tasks"}
        schedules = deep_json(no_server_error(await http.get("/schedules")).text)
        assert {s["name"]: s["next_run_at"] for s in schedules} == {
            "numbers": "0001-01-01T00:00:00Z",
            "odd": "9999-12-31T23:59:59.999999Z",
        }

        # --- the dashboard: every page that shows tasks, workers, schedules or counts ---
        pages = [
            "/ui/",
            "/ui/fragments/overview",
            "/ui/tasks",
            "/ui/tasks?limit=500",
            "/ui/tasks?limit=3",
            f"/ui/tasks?limit=3&cursor={every[len(every) // 2]}",
            "/ui/tasks?queue=q%26%3C%22%27%3E",
            "/ui/tasks?action=odd%E2%80%AE%F0%9F%92%A9%20%3Cb%3E",
            f"/ui/tasks?q={every[0]}",
            "/ui/tasks?q=mixed",
            "/ui/tasks?" + urlencode({"q": f"key-3-{ODD}"}),
            "/ui/requeue-dead?action=noop",
            "/ui/requeue-dead?action=odd%E2%80%AE%F0%9F%92%A9%20%3Cb%3E",
        ] + [f"/ui/tasks?state={s.value}" for s in TaskState]
        pages += [f"/ui/tasks/{i}" for i in every]
        for path in pages:
            r = no_server_error(await http.get(path))
            assert r.status_code == 200, (path, r.status_code)
            assert "<b>x</b>" not in r.text, f"{path}: unescaped markup"
        listing = (await http.get("/ui/tasks?limit=500")).text
        assert all(f'data-task="{i}"' in listing for i in every)
        assert "9999-12-31" in listing and "0001-01-01" in listing
        detail = (await http.get(f"/ui/tasks/{deep['id']}")).text
        assert "[" * DEPTH in detail  # shown as stored when it cannot be pretty-printed
        detail = (await http.get(f"/ui/tasks/{numbers['id']}")).text
        assert "1180591620717411303424" in detail
