"""Hosts in network namespaces (engine/tools/netns.py): a database host with a PostgreSQL server of
its own, reached over TCP through veth links, and worker or API hosts made per test.

Root only: the tests skip, saying why, when namespaces cannot be made here. Everything a
test makes (host namespaces, the processes in them, their links) is removed when it ends,
passed or failed; the session's network (switch, database host, server) when the session
ends; and what a killed test run left is swept away by the next one (netns.sweep()).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from tasklease import schema
from tasklease.engine.database import with_database
from tasklease.engine.store import Store
from tasklease.engine.tools import netns
from tests.conftest import EXECUTIONS_TABLE, create_database, drop_database
from tests.support.procs import Proc, Procs, wait_for_http


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `long` run only when asked for: TASKLEASE_LONG_TESTS=1, or -m long."""
    if os.environ.get("TASKLEASE_LONG_TESTS") == "1" or "long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long: run with TASKLEASE_LONG_TESTS=1 (or -m long)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@dataclass
class Site:
    """The session's network and database server."""

    net: netns.Network
    pg: netns.Postgres
    template: str


@pytest.fixture(scope="session")
async def site() -> AsyncIterator[Site]:
    why = netns.unavailable()
    if why:
        pytest.skip(f"no network namespaces: {why}")
    net = netns.Network(wires=False)
    try:
        pg = netns.Postgres(net.host("db", wire=False), {"fsync": "off"})
        template = "tasklease_hosts_tpl"
        conn = await asyncpg.connect(pg.dsn())
        try:
            await conn.execute(f"CREATE DATABASE {template}")
        finally:
            await conn.close()
        dsn = with_database(pg.dsn(), template)
        await schema.upgrade(dsn)
        tpl = await asyncpg.connect(dsn)
        try:
            await tpl.execute(EXECUTIONS_TABLE)
        finally:
            await tpl.close()
        yield Site(net, pg, template)
    finally:
        net.close()


@pytest.fixture
async def host_db(site: Site) -> AsyncIterator[str]:
    """A migrated database of this test's own on the database host (a TCP DSN)."""
    name = await create_database(site.pg.dsn(), site.template)
    yield with_database(site.pg.dsn(), name)
    await drop_database(site.pg.dsn(), name)


@pytest.fixture
async def host_store(host_db: str) -> AsyncIterator[Store]:
    s = await Store.connect(host_db, max_size=4)
    yield s
    await s.close()


@pytest.fixture
async def host_conn(host_db: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(host_db)
    yield c
    await c.close()


@dataclass
class Hosts:
    """Hosts made for one test, and tasklease processes run in them."""

    site: Site
    procs: Procs
    made: list[netns.Host] = field(default_factory=list)

    def add(self, name: str, *, wire: bool = False) -> netns.Host:
        host = self.site.net.host(name, wire=wire)
        self.made.append(host)
        return host

    def worker(self, host: netns.Host, name: str, *extra: str) -> Proc:
        return self.procs.start(
            name,
            "worker",
            "--handlers",
            "tests.support.handlers",
            "--poll-interval",
            "0.05",
            *extra,
            prefix=tuple(host.argv()),
        )

    def api(self, host: netns.Host) -> str:
        proc = self.procs.start(
            "api",
            "api",
            "--host",
            host.ip,
            "--port",
            "8080",
            "--handlers",
            "tests.support.handlers",
            prefix=tuple(host.argv()),
        )
        url = f"http://{host.ip}:8080"
        wait_for_http(f"{url}/healthz", proc)
        return url

    def remove(self) -> None:
        for host in self.made:
            self.site.net.remove_host(host.name)


@pytest.fixture
def hosts(
    site: Site, host_db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Hosts]:
    made = Hosts(site, Procs(tmp_path, {"DATABASE_URL": host_db}))
    try:
        yield made
    finally:
        for host in made.made:
            if host.faults[-1:] == ["cut"]:
                host.heal()  # so that its processes can stop cleanly
        made.procs.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(made.procs.dump())
        made.remove()
