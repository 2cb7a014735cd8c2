"""Hostile input against a real `tasklease api` process: never a 5xx, never a write on a 4xx.

Hypothesis builds the classes of input that once got 500s (docs/reliability.md, "Hostile
input"): deep nesting, numbers past every range, text that is not UTF-8 or that PostgreSQL
cannot store, other encodings and charsets, odd JSON shapes, odd ids, query strings, cookies,
Host and Origin headers, and hostile forms for the dashboard. Requests go over a raw socket,
so any byte can be sent. After each one the rows of tasks and task_transitions are counted:
a 4xx wrote nothing; a body that was taken reads back through the API and the dashboard.
Every run is seeded (derandomize) and bounded in examples: about 900 requests, 8 s on an
idle 2-core machine. The inputs that found the 500s are pinned in FOUND.
"""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from tasklease.engine.database import with_database
from tests.conftest import create_database, drop_database, pooled
from tests.support.procs import Procs

pytestmark = pytest.mark.slow
TOKEN = "fuzz-token"
LIMIT = 1024 * 1024  # the API's default body limit
FUZZ = settings(
    derandomize=True,  # the same examples on every run, in CI too
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # shrinking runs on a failure only
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# --- the API, its database and a raw HTTP client -----------------------------------------


@pytest.fixture(scope="module")
async def fuzz_db(admin_dsn: str, template: str) -> AsyncIterator[str]:
    name = await create_database(admin_dsn, template)
    yield with_database(admin_dsn, name)
    await drop_database(admin_dsn, name)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Api:
    port: int
    dsn: str
    cookie: str  # a live dashboard session
    done: int  # a COMPLETED task: cancel and requeue refuse it (409), writing nothing
    db: psycopg.Connection[Any]

    def send(
        self,
        method: str,
        target: bytes,
        body: bytes = b"",
        headers: dict[bytes, bytes] | None = None,
        auth: bool = True,
    ) -> Reply:
        """One request on its own connection, any bytes allowed; a hang fails the test."""
        head = {b"Host": b"127.0.0.1:%d" % self.port, b"Connection": b"close"}
        if auth:
            head[b"Authorization"] = b"Bearer " + TOKEN.encode()
        if body or method == "POST":
            head[b"Content-Length"] = b"%d" % len(body)
        head.update(headers or {})
        if currently_in_test_context():  # shown with a failing example (this Hypothesis
            # prints the failing example's arguments empty)
            note(f"{method} {target[:300]!r} {head!r} body ({len(body)} bytes): {body[:300]!r}")
        lines = [method.encode() + b" " + target + b" HTTP/1.1"]
        lines += [name + b": " + value for name, value in head.items()]
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            # the server may answer (413, 400) and close before it has read all of it
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            data = b""
            with contextlib.suppress(ConnectionResetError):  # closed on a body it did not read
                while chunk := s.recv(65536):
                    data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), (target[:200], data[:300])
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return Reply(int(status_line.split()[1]), fields, rest)

    def rows(self) -> tuple[int, int]:
        """Rows in tasks and task_transitions: any write adds a transition."""
        counted = self.db.execute(
            "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM task_transitions)"
        ).fetchone()
        assert counted is not None
        return counted[0], counted[1]


@pytest.fixture(scope="module")
def api(fuzz_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    dsn, env = pooled(fuzz_db)  # through PgBouncer in the pooler pass
    procs = Procs(tmp_path_factory.mktemp("fuzz"), {"DATABASE_URL": dsn, **env})
    _, url = procs.api(env={"TASKLEASE_API_TOKEN": TOKEN})
    with psycopg.connect(fuzz_db, autocommit=True) as db:
        api = Api(int(url.rsplit(":", 1)[1]), fuzz_db, "", 0, db)
        task = api.send("POST", b"/tasks", QUICK, {b"Content-Type": b"application/json"})
        assert task.status == 201, task.body
        api.done = task.json()["id"]
        db.execute("UPDATE tasks SET state = 'COMPLETED', attempt = 1 WHERE id = %s", [api.done])
        login = api.send(
            "POST",
            b"/ui/login",
            f"token={TOKEN}&next=/ui/".encode(),
            {b"Content-Type": b"application/x-www-form-urlencoded"},
            auth=False,
        )
        assert login.status == 303, login.body
        api.cookie = login.headers["set-cookie"].partition(";")[0]
        try:
            yield api
        finally:
            procs.stop_all()


def check_answer(api: Api, reply: Reply, before: tuple[int, int], refuse: bool) -> None:
    """No 5xx; a refusal is a 4xx with the error shape and wrote nothing."""
    event(f"{reply.status}")  # --hypothesis-show-statistics: how the examples were answered
    assert reply.status < 500, (reply.status, reply.body[:500])
    if refuse:
        assert 400 <= reply.status < 500, (reply.status, reply.body[:500])
    if reply.status >= 400:
        assert api.rows() == before, "a refused request wrote"
        if reply.body and reply.headers.get("content-type", "").startswith("application/json"):
            error = reply.json()
            assert error["status_code"] == reply.status and error["detail"], error


# --- hostile JSON ------------------------------------------------------------------------

QUICK = b'{"payload": {"action": "noop"}}'
# Where a fragment goes (`@`).
SLOTS = [
    b'{"payload": {"action": "noop", "x": @}}',
    b'{"payload": {"action": "noop", "items": [1, @, 3]}}',
    b'{"payload": {"action": "email_user", "user_id": @}}',
    b'{"payload": {"action": "noop"}, "priority": @}',
    b'{"payload": {"action": "noop"}, "max_attempts": @}',
    b'{"payload": {"action": "noop"}, "lease_seconds": @}',
    b'{"payload": {"action": "noop"}, "queue": @}',
    b'{"payload": {"action": "noop"}, "idempotency_key": @}',
    b'{"payload": {"action": "noop"}, "due_at": @}',
    b'{"payload": {"action": @}}',
    b'{"payload": @}',
    b"@",
]
KEY_SLOT = b'{"payload": {"action": "noop", @: 1}}'


@dataclass
class Fragment:
    text: bytes
    bad: bool  # wrong wherever it goes (malformed, not storable, too deep or too big)


def nested(depth: int, kind: str, closed: bool) -> Fragment:
    opening, closing = {"array": (b"[", b"]"), "object": (b'{"a":', b"}")}[kind]
    inner = b"1" if kind == "object" else b""
    text = opening * depth + inner + (closing * depth if closed else b"")
    # a payload may nest 64 levels; a fragment sits one level inside it at least
    return Fragment(text, bad=depth >= 64 or not closed)


NOT_NUMBERS = ["NaN", "Infinity", "-Infinity", "0x10", "01", "+1", "1.", ".5", "1e", "--1", "1_0"]
OUT_OF_RANGE = ["1e400", "-1e400", "1e99999999999999999999", "9" * 4301]
NUMBERS = ["-0", "1e-400", "4.9e-324", "1.7976931348623157e308", "9223372036854775808"]
numbers = st.one_of(
    st.sampled_from(NOT_NUMBERS + OUT_OF_RANGE).map(lambda n: Fragment(n.encode(), bad=True)),
    st.sampled_from(NUMBERS).map(lambda n: Fragment(n.encode(), bad=False)),
    st.integers(min_value=2**63 - 2, max_value=2**1200).map(
        lambda n: Fragment(str(n).encode(), bad=False)
    ),
    st.integers(min_value=-(2**1200), max_value=-(2**63)).map(
        lambda n: Fragment(str(n).encode(), bad=False)
    ),
    st.integers(min_value=-2000, max_value=2000).map(
        lambda e: Fragment(f"1e{e}".encode(), bad=abs(e) > 308 and e > 0)
    ),
)

# Byte sequences that are not UTF-8: a lone continuation byte, overlong forms (of "/" and of
# NUL), a surrogate as CESU-8, past U+10FFFF, a five-byte form, truncated, latin-1 "é".
NOT_UTF8 = [b"\x80", b"\xc0\xaf", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
NOT_UTF8 += [b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xff", b"\xfe", b"caf\xe9"]
# Escapes a decoder must refuse (lone surrogates) or PostgreSQL cannot store (NUL).
BAD_ESCAPES = [rb"\ud800", rb"\udfff", rb"\ud800\u0041", rb"\udc00\ud800", rb"\u0000"]


def quoted(inner: bytes, bad: bool) -> Fragment:
    return Fragment(b'"' + inner + b'"', bad=bad)


strings = st.one_of(
    st.tuples(st.text(max_size=20), st.sampled_from(NOT_UTF8), st.text(max_size=5)).map(
        lambda t: quoted(t[0].encode() + t[1] + t[2].encode(), bad=True)
    ),
    st.tuples(st.text(max_size=20), st.sampled_from(BAD_ESCAPES)).map(
        lambda t: quoted(json.dumps(t[0])[1:-1].encode() + t[1], bad=True)
    ),
    st.integers(min_value=1, max_value=31).map(lambda c: quoted(b"a" + bytes([c]), bad=True)),
    st.text().map(lambda t: quoted(json.dumps(t)[1:-1].encode(), bad=False)),
    st.sampled_from([LIMIT - 100, LIMIT + 1]).map(lambda n: quoted(b"x" * n, bad=n > LIMIT)),
)

# due_at (its own slot): taken from 1970-01-01T00:00:00Z up to 2200-01-01T00:00:00Z, with
# a time zone.
DUE_FROM, DUE_BEFORE = datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)
ODD_TIMES = [
    ("0000-01-01T00:00:00Z", True),
    ("infinity", True),
    ("-infinity", True),
    ("+275760-09-13T00:00:00Z", True),
    ("2026-01-20T12:00:00", True),  # no time zone
    ("2026-13-01T00:00:00Z", True),
    ("2026-02-30T00:00:00Z", True),
    ("2026-06-30T23:59:60Z", False),  # a leap second: taken or refused, never a 5xx
    ("2026-01-20T12:00:00.123456789Z", False),
    ("2026-01-20T12:00:00+24:00", True),
]


def rfc3339(year: int, second: int, offset_minutes: int | None) -> Fragment:
    """A time in the form RFC 3339 gives, in any year, and whether it is out of bounds."""
    stamp = datetime(year, 1, 1) + timedelta(seconds=second)
    if offset_minutes is None:
        return Fragment(f'"{stamp.isoformat()}"'.encode(), bad=True)
    sign, minutes = "+-"[offset_minutes < 0], abs(offset_minutes)
    zone = "Z" if offset_minutes == 0 else f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    try:
        utc = stamp.replace(tzinfo=UTC) - timedelta(minutes=offset_minutes)
        bad = not DUE_FROM <= utc < DUE_BEFORE
    except OverflowError:  # before year 1 or after 9999 in UTC
        bad = True
    return Fragment(f'"{stamp.isoformat()}{zone}"'.encode(), bad=bad)


due_ats = st.one_of(
    st.builds(
        rfc3339,
        st.one_of(st.integers(1, 9999), st.sampled_from([1969, 1970, 2199, 2200])),
        st.one_of(st.integers(0, 365 * 86400 - 1), st.sampled_from([0, 365 * 86400 - 1])),
        st.one_of(st.none(), st.integers(-23 * 60 - 59, 23 * 60 + 59), st.just(0)),
    ),
    st.sampled_from(ODD_TIMES).map(lambda t: Fragment(f'"{t[0]}"'.encode(), bad=t[1])),
)

fragments = st.one_of(
    st.builds(
        nested,
        st.one_of(
            st.sampled_from([63, 64, 99, 100, 101, 1000, 10_000, 100_000]), st.integers(1, 3000)
        ),
        st.sampled_from(["array", "object"]),
        st.booleans(),
    ),
    numbers,
    strings,
)


def place(slot: bytes, fragment: Fragment) -> tuple[bytes, bool]:
    """The body, and whether it must be refused."""
    return slot.replace(b"@", fragment.text), fragment.bad


BODY = '{"payload": {"action": "noop", "t": "h\u00e9"}, "queue": "\u00fcml"}'
ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
ENCODINGS += ["utf-8-sig", "latin-1", "cp1252"]


def many_keys(n: int) -> tuple[bytes, bool]:
    """A payload with n keys, most of them repeated (the last one counts)."""
    keys = b", ".join(b'"k%d": %d' % (i % 7, i) for i in range(n))
    return b'{"payload": {"action": "noop", ' + keys + b"}}", False


bodies = st.one_of(
    st.builds(place, st.sampled_from(SLOTS), fragments),
    st.builds(place, st.just(b'{"payload": {"action": "noop"}, "due_at": @}'), due_ats),
    strings.map(lambda f: (KEY_SLOT.replace(b"@", f.text), f.bad)),
    st.sampled_from(ENCODINGS).map(lambda e: (BODY.encode(e), True)),
    st.sampled_from([b"", b"null", b"[]", b'"x"', b"1", b"true", b"{}", b" ", b"\x00"]).map(
        lambda b: (b, True)
    ),
    st.integers(min_value=0, max_value=len(QUICK) - 1).map(lambda n: (QUICK[:n], True)),
    st.binary(max_size=64).map(lambda b: (b, True)),
    st.integers(min_value=2, max_value=60_000).map(many_keys),
)
content_types = st.sampled_from(
    [b"application/json"] * 24
    + [b"application/json; charset=utf-8", b"APPLICATION/JSON;charset=UTF-8"]
    + [b"application/json; charset=latin-1", b"application/json; charset=utf-16"]
    + [b'application/json; charset="x"', b"text/plain", b"application/json;;", b""]
)
REFUSED_TYPES = {b"application/json; charset=latin-1", b"application/json; charset=utf-16"}
REFUSED_TYPES |= {b'application/json; charset="x"', b"text/plain", b""}


@settings(FUZZ, max_examples=300)
@given(body=bodies, content_type=content_types, batch=st.booleans())
def test_hostile_json_bodies_get_a_4xx_and_write_nothing(
    api: Api, body: tuple[bytes, bool], content_type: bytes, batch: bool
) -> None:
    text, wrong = body
    if batch:
        text = b'{"tasks": [' + QUICK + b", " + text + b"]}"
    headers = {b"Content-Type": content_type} if content_type else {}
    before = api.rows()
    reply = api.send("POST", b"/tasks/batch" if batch else b"/tasks", text, headers)
    check_answer(api, reply, before, refuse=wrong or content_type in REFUSED_TYPES)
    if reply.status < 300:  # taken: it reads back, through the API and the dashboard
        for task in reply.json()["tasks"] if batch else [reply.json()]:
            for path in (f"/tasks/{task['id']}", f"/ui/tasks/{task['id']}"):
                shown = api.send("GET", path.encode(), headers={b"Cookie": api.cookie.encode()})
                assert shown.status == 200, (path, shown.status, shown.body[:300])


@settings(FUZZ, max_examples=40)
@given(body=bodies, content_type=content_types, action=st.sampled_from(["cancel", "requeue"]))
def test_hostile_bodies_to_cancel_and_requeue_write_nothing(
    api: Api, body: tuple[bytes, bool], content_type: bytes, action: str
) -> None:
    """They take no body: a finished task stays finished (409), whatever comes with it."""
    headers = {b"Content-Type": content_type} if content_type else {}
    before = api.rows()
    reply = api.send("POST", f"/tasks/{api.done}/{action}".encode(), body[0], headers)
    check_answer(api, reply, before, refuse=True)


# --- hostile ids, query strings and headers ----------------------------------------------


def encoded(raw: bytes) -> bytes:
    return urllib.parse.quote_from_bytes(raw, safe="").encode()


# Ids that must not name a task: not ASCII digits (other scripts' digits, signs, spaces,
# underscores, exponents), beyond bigint, zero, or bytes that are no text at all.
hostile_ids = st.one_of(
    st.tuples(
        st.text("0123456789", max_size=3),
        st.text(st.characters(categories=["Nd"], exclude_characters="0123456789"), min_size=1),
    ).map(lambda t: encoded((t[0] + t[1]).encode())),
    st.sampled_from([b"+1", b"%201", b"1_0", b"1e3", b"0x1", b"-1", b"0", b"1.0", b"%00", b"1%00"]),
    st.sampled_from([b"%FF", b"%ED%A0%80", b"%C0%80", b"9" * 5000]),
    st.integers(min_value=2**63, max_value=10**40).map(lambda n: str(n).encode()),
    st.binary(min_size=1, max_size=12).filter(lambda b: not b.isdigit()).map(encoded),
)
query_values = st.one_of(
    st.binary(max_size=40).map(encoded),
    st.integers(min_value=-(10**30), max_value=10**30).map(lambda n: str(n).encode()),
    st.sampled_from([b"9223372036854775807", b"9223372036854775808", b"9999999999999999999"]),
    st.sampled_from([b"%D9%A3", b"%C2%B2", b"%00", b"%", b"%zz", b"%ud800", b"PENDING", b"dead"]),
    st.just(b"a" * 7000),
)
query_names = st.sampled_from(
    [b"state", b"action", b"queue", b"limit", b"cursor", b"q", b"next", b"notice", b"id", b"n"]
) | st.binary(max_size=8).map(encoded)
queries = st.lists(st.tuples(query_names, query_values), max_size=4).map(
    lambda pairs: b"&".join(name + b"=" + value for name, value in pairs)
)


@settings(FUZZ, max_examples=100)
@given(
    task_id=hostile_ids,
    route=st.sampled_from(["", "/transitions", "/cancel", "/requeue"]),
    ui=st.booleans(),
)
def test_hostile_task_ids_are_refused_and_write_nothing(
    api: Api, task_id: bytes, route: str, ui: bool
) -> None:
    if ui and route == "/transitions":
        route = ""
    method = "POST" if route in ("/cancel", "/requeue") else "GET"
    target = (b"/ui" if ui else b"") + b"/tasks/" + task_id + route.encode()
    before = api.rows()
    reply = api.send(method, target, headers={b"Cookie": api.cookie.encode()})
    check_answer(api, reply, before, refuse=True)


GET_PATHS = [
    *(b"/tasks", b"/stats", b"/schedules", b"/metrics", b"/readyz", b"/healthz"),
    *(b"/ui/", b"/ui/tasks", b"/ui/requeue-dead", b"/ui/login", b"/ui/fragments/overview"),
    *(b"/ui/tasks/%d", b"/tasks/%d", b"/tasks/%d/transitions", b"/ui/static/ui.js"),
]


@settings(FUZZ, max_examples=100)
@given(
    path=st.sampled_from(GET_PATHS),
    query=queries,
    session=st.booleans(),
)
def test_hostile_query_strings_never_get_a_5xx(
    api: Api, path: bytes, query: bytes, session: bool
) -> None:
    if b"%d" in path:
        path = path % api.done
    headers = {b"Cookie": api.cookie.encode()} if session else {}
    before = api.rows()
    reply = api.send("GET", path + b"?" + query, headers=headers)
    check_answer(api, reply, before, refuse=False)
    assert api.rows() == before, "a GET wrote"


# Header values: any byte but CR, LF and NUL (which end or break the head: the server's
# parser answers 400 to those, tested apart in test_http_limits.py).
header_bytes = st.binary(max_size=60).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
)
cookies = st.one_of(
    header_bytes.map(lambda b: b"tasklease_session=" + b),
    st.tuples(st.text("0123456789abcdef", min_size=32, max_size=32), header_bytes).map(
        lambda t: b"tasklease_session=" + t[0].encode() + b"." + t[1]
    ),
    header_bytes,
)
hosts = st.one_of(
    st.sampled_from([b"x:abc", b"x:-1", b"x:99999999", b"a:b:c", b"[::1", b"[", b"[]:80", b""]),
    header_bytes,
)
origins = st.one_of(
    st.sampled_from([b"http://[::1", b"http://[", b"http://x:abc", b"null", b"\xff://\xff"]),
    header_bytes,
)


@settings(FUZZ, max_examples=100)
@given(
    path=st.sampled_from(
        [
            *(b"/ui/", b"/ui/tasks?cursor=1", b"/ui/tasks/%d", b"/ui/requeue-dead?action=noop"),
            *(b"/ui/login?next=/ui/tasks", b"/ui/fragments/overview", b"/tasks", b"/stats"),
        ]
    ),
    cookie=st.none() | cookies,
    host=st.none() | hosts,
    origin=st.none() | origins,
    htmx=st.booleans(),
)
def test_hostile_cookies_hosts_and_origins_never_get_a_5xx(
    api: Api,
    path: bytes,
    cookie: bytes | None,
    host: bytes | None,
    origin: bytes | None,
    htmx: bool,
) -> None:
    if b"%d" in path:
        path = path % api.done
    headers = {b"Cookie": api.cookie.encode() if cookie is None else cookie}
    if host is not None:
        headers[b"Host"] = host
    if origin is not None:
        headers[b"Origin"] = origin
    if htmx:
        headers[b"HX-Request"] = b"true"
    before = api.rows()
    reply = api.send("GET", path, headers=headers)
    check_answer(api, reply, before, refuse=False)


# --- the dashboard's forms ---------------------------------------------------------------

form_values = st.one_of(
    st.binary(max_size=40).map(encoded),
    st.sampled_from([b"noop", b"%00", b"noop%00", b"%FF", b"%ED%A0%80", b"//evil", b"/ui/%0d%0a"]),
    st.sampled_from([b"a" * 300, b"/ui/" + b"a" * 20_000, b"a" * 900_000]),
)
forms = st.one_of(
    st.lists(
        st.tuples(st.sampled_from([b"action", b"next", b"token", b""]) | query_names, form_values),
        max_size=3,
    ).map(
        lambda pairs: (
            b"application/x-www-form-urlencoded",
            b"&".join(name + b"=" + value for name, value in pairs),
        )
    ),
    st.tuples(
        st.sampled_from(
            [
                *(b"multipart/form-data", b"multipart/form-data; boundary=x", b"text/plain"),
                *(b"application/json", b"application/x-www-form-urlencoded; charset=utf-16", b""),
            ]
        ),
        st.one_of(
            st.binary(max_size=80),
            st.just(b'--x\r\nContent-Disposition: form-data; name="action"\r\n\r\nnoop\r\n--x--'),
            st.just(b"[" * 10_000),
        ),
    ),
)


@settings(FUZZ, max_examples=100)
@given(
    route=st.sampled_from(
        [
            b"/ui/requeue-dead",
            b"/ui/login",
            b"/ui/logout",
            b"/ui/tasks/%d/cancel",
            b"/ui/tasks/%d/requeue",
        ]
    ),
    form=forms,
    cookie=st.one_of(st.none(), st.none(), cookies),
    origin=st.one_of(st.none(), st.none(), st.none(), origins),
)
def test_hostile_dashboard_forms_never_get_a_5xx_nor_write(
    api: Api, route: bytes, form: tuple[bytes, bytes], cookie: bytes | None, origin: bytes | None
) -> None:
    """No DEAD task exists and the task named is COMPLETED: whatever is posted, no task may
    change (a login that fails is throttled, 429, which is fine)."""
    if b"%d" in route:
        route = route % api.done
    if route == b"/ui/logout" and cookie is None:
        cookie = b"tasklease_session=other"  # keep the fixture's session alive
    content_type, body = form
    headers = {b"Cookie": api.cookie.encode() if cookie is None else cookie}
    if content_type:
        headers[b"Content-Type"] = content_type
    if origin is not None:
        headers[b"Origin"] = origin
    before = api.rows()
    reply = api.send("POST", route, body, headers, auth=False)
    event(f"{reply.status}")
    assert reply.status < 500, (reply.status, reply.body[:500])
    assert api.rows() == before, (route, form, reply.status)
    if reply.status in (302, 303):  # a redirect stays short enough to follow
        assert len(reply.headers.get("location", "")) <= 8192


# --- the inputs that found 500s, pinned ---------------------------------------------------

NESTED = b'{"payload": {"action": "noop", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}}"
FOUND: list[tuple[str, bytes, dict[bytes, bytes], bytes, int, str]] = [
    # class: nesting (msgspec RecursionError)
    ("POST", b"/tasks", {}, NESTED, 400, "nest more than 100 levels"),
    ("POST", b"/tasks", {}, b"[" * 100_000 + b"]" * 100_000, 400, "nest more than 100"),
    ("POST", b"/tasks", {}, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400, "nest more than"),
    ("POST", b"/tasks/batch", {}, b'{"tasks": [' + NESTED + b"]}", 400, "nest more than 100"),
    ("POST", b"/tasks", {}, b"[" * 5000, 400, "nest more than 100"),
    # class: encodings (msgspec UnicodeDecodeError)
    ("POST", b"/tasks", {}, BODY.encode("latin-1"), 400, "the body is not UTF-8: byte 38"),
    ("POST", b"/tasks", {}, b'{"payload": {"action": "noop", "x": "\xc0\x80"}}', 400, "not UTF-8"),
    ("POST", b"/tasks", {}, b'{"payload": {"action": "noop", "x": "\xed\xa0\x80"}}', 400, "UTF-8"),
    ("POST", b"/tasks", {}, b'{"payload": {"action": "noop", "x": "\xff"}}', 400, "not UTF-8"),
    # class: headers the dashboard parsed (TypeError in compare_digest, ValueError in urlsplit
    # and in Litestar's request.url)
    (
        "GET",
        b"/ui/tasks",
        {b"Cookie": b"tasklease_session=" + b"0" * 32 + b".\xc3\xa9"},
        b"",
        302,
        "",
    ),
    (
        "POST",
        b"/ui/logout",
        {b"Cookie": b"tasklease_session=" + b"0" * 32 + b".\xff"},
        b"",
        303,
        "",
    ),
    ("POST", b"/tasks", {b"Origin": b"http://[::1"}, QUICK, 403, "cross-site"),
    ("POST", b"/ui/requeue-dead", {b"Origin": b"http://["}, b"", 403, "cross-site"),
    ("GET", b"/ui/", {b"Host": b"x:abc"}, b"", 200, ""),
    ("GET", b"/ui/tasks?cursor=1", {b"Host": b"x:99999999"}, b"", 200, ""),
    ("GET", b"/ui/tasks/1", {b"Host": b"a:b:c"}, b"", 200, ""),
    ("GET", b"/ui/tasks", {b"Host": b"x:-1", b"Cookie": b""}, b"", 302, ""),
]


@pytest.mark.parametrize(("method", "target", "headers", "body", "status", "needle"), FOUND)
def test_the_inputs_that_got_500s_get_a_clear_answer(
    api: Api,
    method: str,
    target: bytes,
    headers: dict[bytes, bytes],
    body: bytes,
    status: int,
    needle: str,
) -> None:
    if target.startswith(b"/ui/") and b"Cookie" not in headers:
        headers = {**headers, b"Cookie": api.cookie.encode()}
    if target == b"/ui/tasks/1":
        target = b"/ui/tasks/%d" % api.done
    if body and b"Content-Type" not in headers:
        headers = {**headers, b"Content-Type": b"application/json"}
    before = api.rows()
    reply = api.send(method, target, body, headers)
    assert reply.status == status, (reply.status, reply.body[:500])
    assert needle.encode() in reply.body, reply.body[:500]
    assert api.rows() == before
