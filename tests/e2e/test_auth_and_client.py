"""Bearer-token auth on the real API, and the `tasklease` CLI client against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from tasklease.engine.states import TaskState
from tests.support.db import force_state
from tests.support.procs import REPO, Procs

TOKEN = "s3cret-token"
PROTECTED = [
    ("GET", "/tasks"),
    ("GET", "/tasks/1"),
    ("GET", "/tasks/1/transitions"),
    ("POST", "/tasks"),
    ("POST", "/tasks/batch"),
    ("POST", "/tasks/1/cancel"),
    ("POST", "/tasks/1/requeue"),
    ("GET", "/stats"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/schema/openapi.json"),
]


DASHBOARD = [
    ("GET", "/ui/"),
    ("GET", "/ui/fragments/overview"),
    ("GET", "/ui/tasks?state=DEAD"),
    ("GET", "/ui/tasks/1"),
    ("GET", "/ui/requeue-dead?action=noop"),
    ("POST", "/ui/tasks/1/cancel"),
    ("POST", "/ui/tasks/1/requeue"),
    ("POST", "/ui/requeue-dead"),
]


async def test_token_guards_every_dashboard_page_but_login_and_static(procs: Procs) -> None:
    _, url = procs.api(env={"TASKLEASE_API_TOKEN": TOKEN})
    async with httpx.AsyncClient(base_url=url) as http:
        for method, path in DASHBOARD:
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):  # the cookie, not bearer
                r = await http.request(method, path, headers=headers)
                assert r.status_code in (302, 303), (method, path, r.text)
                assert r.headers["location"].startswith("/ui/login?next="), (method, path)
            forged = await http.request(
                method, path, headers={"Cookie": f"tasklease_session=9999999999.{'0' * 64}"}
            )
            assert forged.status_code in (302, 303), (method, path)
        polled = await http.get("/ui/fragments/overview", headers={"HX-Request": "true"})
        assert (polled.status_code, polled.headers["hx-redirect"]) == (
            401,
            "/ui/login?next=%2Fui%2F",
        )
        assert (await http.get("/ui/login")).status_code == 200
        assert (await http.get("/ui/static/htmx.min.js")).status_code == 200
        assert (await http.get("/ui/static/ui.css")).status_code == 200


async def test_token_guards_every_route_but_healthz(procs: Procs) -> None:
    _, url = procs.api(env={"TASKLEASE_API_TOKEN": TOKEN})
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/healthz")).status_code == 200
        for method, path in PROTECTED:
            for header in (None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"):
                headers = {"Authorization": header} if header else {}
                r = await http.request(method, path, headers=headers, json={"payload": {}})
                assert r.status_code == 401, (method, path, header, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["detail"] == "missing or wrong bearer token"
            ok = await http.request(
                method,
                path,
                headers={"Authorization": f"Bearer {TOKEN}"},
                json={"payload": {"action": "noop"}},
            )
            assert ok.status_code != 401, (method, path, ok.text)
        doc = (
            await http.get("/schema/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        ).json()
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_without_a_token_the_api_is_open(procs: Procs) -> None:
    api, url = procs.api(env={"TASKLEASE_API_TOKEN": None})
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/stats")).status_code == 200
    assert "authentication: none" in api.output() and "(loopback only)" in api.output()


def cli(*args: str, url: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TASKLEASE_API_TOKEN"}
    if token:
        env["TASKLEASE_API_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "tasklease.engine.cli", *args, "--url", url],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_client_round_trip(procs: Procs, conn: asyncpg.Connection) -> None:
    _, url = procs.api(env={"TASKLEASE_API_TOKEN": TOKEN})

    submitted = cli(
        "submit",
        "email_user",
        "--payload",
        '{"user_id": 42}',
        "--in",
        "1h",
        "--idempotency-key",
        "cli-1",
        "--json",
        url=url,
        token=TOKEN,
    )
    assert submitted.returncode == 0, submitted.stderr
    task = json.loads(submitted.stdout)
    due = datetime.fromisoformat(task["due_at"].replace("Z", "+00:00"))
    assert 3500 < (due - datetime.now(UTC)).total_seconds() <= 3600
    again = cli(
        "submit",
        "email_user",
        "--payload",
        '{"user_id": 42}',
        "--idempotency-key",
        "cli-1",
        url=url,
        token=TOKEN,
    )
    assert again.stdout.startswith(f"task {task['id']} email_user PENDING")

    listed = cli("ls", "--state", "pending", url=url, token=TOKEN)
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split()[:3] == [
        "ID",
        "ACTION",
        "STATE",
    ]
    assert listed.stdout.splitlines()[1].split()[:4] == [
        str(task["id"]),
        "email_user",
        "PENDING",
        "0/5",
    ]

    shown = cli("show", str(task["id"]), url=url, token=TOKEN)
    assert "state:" in shown.stdout and "submit" in shown.stdout and "- -> PENDING" in shown.stdout

    cancelled = cli("cancel", str(task["id"]), url=url, token=TOKEN)
    assert cancelled.stdout.strip() == f"task {task['id']} is now CANCELLED"
    refused = cli("cancel", str(task["id"]), url=url, token=TOKEN)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"tasklease: 409: task {task['id']} is CANCELLED: only "
        "PENDING, FAILED, WAITING or RUNNING tasks can be cancelled"
    )

    dead = json.loads(cli("submit", "noop", "--json", url=url, token=TOKEN).stdout)
    await force_state(conn, dead["id"], TaskState.DEAD)
    requeued = cli("requeue", str(dead["id"]), "--json", url=url, token=TOKEN)
    assert json.loads(requeued.stdout)["state"] == "PENDING"

    stats = cli("stats", url=url, token=TOKEN)
    assert stats.returncode == 0 and stats.stdout.startswith("QUEUE")
    stats_json = json.loads(cli("stats", "--json", url=url, token=TOKEN).stdout)
    assert stats_json["states"]["CANCELLED"] == 1

    denied = cli("stats", url=url)
    assert denied.returncode == 1 and "401: missing or wrong bearer token" in denied.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["submit", "noop", "--payload", "[1]"], "the payload must be a JSON object"),
        (["submit", "noop", "--payload", "{"], "not JSON"),
        (["submit", "noop", "--in", "soon"], "is not a duration"),
        (["submit", "noop", "--due-at", "2026-01-20T12:00:00"], "needs a time zone"),
        (["submit", "noop", "--due-at", "2026-01-20T12:00:00Z", "--in", "5m"], "not allowed with"),
        (["ls", "--state", "SLEEPING"], "invalid choice"),
    ],
)
def test_cli_client_usage_errors(args: list[str], message: str) -> None:
    result = cli(*args, url="http://127.0.0.1:1")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_cli_client_unreachable_api_is_one_line() -> None:
    result = cli("stats", url="http://127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("tasklease: cannot reach the API at http://127.0.0.1:1")
    assert len(result.stderr.strip().splitlines()) == 1
