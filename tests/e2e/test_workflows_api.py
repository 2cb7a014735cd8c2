"""Workflows over HTTP (docs/workflows.md): a graph in one batch with client-side refs,
GET /workflows/{id}, `tasklease workflow ID`, and bad graphs refused with a 422."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from tasklease.engine.database import with_database
from tests.conftest import create_database, drop_database, pooled
from tests.e2e.test_auth_and_client import cli
from tests.support.db import connect_db
from tests.support.procs import Procs

ORDER: list[dict[str, Any]] = [
    {"ref": "charge", "action": "noop", "payload": {}},
    {"ref": "email", "action": "noop", "payload": {}, "depends_on": ["charge"]},
    {"ref": "invoice", "action": "noop", "payload": {}, "depends_on": ["charge"]},
    {
        "ref": "archive",
        "action": "noop",
        "payload": {},
        "depends_on": ["email", {"task": "invoice", "on_failure": "run"}],
    },
]


@pytest.fixture(scope="module")
async def api_db(admin_dsn: str, template: str) -> AsyncIterator[str]:
    name = await create_database(admin_dsn, template)
    yield with_database(admin_dsn, name)
    await drop_database(admin_dsn, name)


@pytest.fixture(scope="module")
def api(api_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dsn, env = pooled(api_db)
    procs = Procs(tmp_path_factory.mktemp("api"), {"DATABASE_URL": dsn, **env})
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


async def test_a_graph_in_one_batch_and_its_workflow(http: httpx.AsyncClient, api: str) -> None:
    r = await http.post(
        "/tasks/batch",
        json={"tasks": ORDER, "on_finish": {"action": "noop", "payload": {"report": True}}},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    charge, email, invoice, archive = body["tasks"]
    assert [t["state"] for t in body["tasks"]] == ["PENDING", "WAITING", "WAITING", "WAITING"]
    assert archive["waiting_for"] == 2 and archive["dependencies"] == 2
    finish = body["on_finish"]
    assert finish["state"] == "WAITING" and finish["dependencies"] == 4
    workflow_id = body["workflow_id"]
    assert {t["workflow_id"] for t in [*body["tasks"], finish]} == {workflow_id}

    r = await http.get(f"/workflows/{workflow_id}")
    assert r.status_code == 200, r.text
    wf = r.json()
    assert wf["on_finish"] == finish["id"] and wf["finished"] is False
    assert wf["states"] == {"PENDING": 1, "WAITING": 4}
    assert [t["id"] for t in wf["tasks"]] == [t["id"] for t in [*body["tasks"], finish]]
    edges = {(e["task_id"], e["depends_on"], e["on_failure"]) for e in wf["edges"]}
    assert {
        (email["id"], charge["id"], "cancel"),
        (invoice["id"], charge["id"], "cancel"),
        (archive["id"], email["id"], "cancel"),
        (archive["id"], invoice["id"], "run"),
    } <= edges
    assert len(edges) == 4 + 4

    shown = cli("workflow", str(workflow_id), url=api)
    assert shown.returncode == 0, shown.stderr
    assert f"workflow {workflow_id}: 5 tasks, 1 PENDING, 4 WAITING" in shown.stdout
    assert f"{email['id']}*, {invoice['id']}* (run)" in shown.stdout

    r = await http.get("/workflows/987654321")
    assert r.status_code == 404


async def test_one_task_waits_for_existing_ones(http: httpx.AsyncClient, api: str) -> None:
    first = (await http.post("/tasks", json={"action": "noop", "payload": {}})).json()
    r = await http.post(
        "/tasks", json={"action": "noop", "payload": {}, "depends_on": [first["id"]]}
    )
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "WAITING" and r.json()["workflow_id"] is None
    submitted = cli("submit", "noop", "--depends-on", str(first["id"]), url=api)
    assert submitted.returncode == 0, submitted.stderr
    assert "WAITING" in submitted.stdout


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {
                "tasks": [
                    {"ref": "a", "action": "noop", "payload": {}, "depends_on": ["b"]},
                    {"ref": "b", "action": "noop", "payload": {}, "depends_on": ["a"]},
                ]
            },
            422,
            "cycle: tasks[0] ('a') -> tasks[1] ('b') -> tasks[0]",
        ),
        (
            {"tasks": [{"action": "noop", "payload": {}, "depends_on": ["nope"]}]},
            422,
            "no task of this batch has ref 'nope'",
        ),
        (
            {"tasks": [{"action": "noop", "payload": {}, "depends_on": [987654321]}]},
            422,
            "task 987654321 does not exist",
        ),
        (
            {"tasks": [{"action": "noop", "payload": {}, "depends_on": [1], "on_failure": "x"}]},
            400,
            "on_failure",
        ),
        (
            {"tasks": [{"action": "noop", "payload": {}, "depends_on": [0]}]},
            400,
            "depends_on",
        ),
    ],
)
async def test_bad_graphs_are_refused_whole(
    http: httpx.AsyncClient,
    conn: asyncpg.Connection,
    body: dict[str, Any],
    status: int,
    message: str,
) -> None:
    before = await conn.fetchval("SELECT count(*) FROM tasks")
    r = await http.post("/tasks/batch", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert await conn.fetchval("SELECT count(*) FROM tasks") == before


async def test_a_ref_means_nothing_to_one_task(http: httpx.AsyncClient) -> None:
    r = await http.post("/tasks", json={"action": "noop", "payload": {}, "depends_on": ["a"]})
    assert r.status_code == 422, r.text
    assert "ref 'a'" in r.json()["detail"]


async def test_the_dashboard_draws_a_workflow_and_links_tasks_to_their_dependencies(
    http: httpx.AsyncClient,
) -> None:
    body = (await http.post("/tasks/batch", json={"tasks": ORDER})).json()
    charge, email, invoice, archive = body["tasks"]
    page = await http.get(f"/ui/workflows/{body['workflow_id']}")
    assert page.status_code == 200, page.text[:500]
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="graph"' in page.text
    for t in body["tasks"]:
        assert f'id="node-{t["id"]}"' in page.text
        assert f'href="/ui/tasks/{t["id"]}"' in page.text
    assert page.text.count('class="edge"') == 4
    assert f"{archive['id']} waits for {invoice['id']} (run)" in page.text

    task = await http.get(f"/ui/tasks/{archive['id']}")
    assert task.status_code == 200
    assert f'href="/ui/workflows/{body["workflow_id"]}"' in task.text
    assert "Waiting for 2 of its 2 dependencies" in task.text
    waits = task.text[task.text.index('id="dependencies"') :]
    assert f'href="/ui/tasks/{email["id"]}"' in waits[: waits.index("</ul>")]
    first = await http.get(f"/ui/tasks/{charge['id']}")
    dependants = first.text[first.text.index('id="dependants"') :]
    assert f'href="/ui/tasks/{invoice["id"]}"' in dependants[: dependants.index("</ul>")]

    assert (await http.get("/ui/workflows/987654321")).status_code == 404
