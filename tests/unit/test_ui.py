"""The dashboard's session cookie, cross-site check and redirects, without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from tasklease.api.ui import (
    LoginThrottle,
    _next,
    ago,
    chart,
    clock,
    pretty,
    rfc3339,
    same_origin,
    session_id,
    session_value,
    whole,
)


class Conn:
    def __init__(self, **headers: str) -> None:
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}


def test_session_cookie_names_a_session_and_carries_a_mac_of_the_token() -> None:
    sid = "0123456789abcdef0123456789abcdef"
    value = session_value("tok", sid)
    assert "tok" not in value and value.startswith(sid + ".")
    assert session_id("tok", value) == sid
    assert session_id("other", value) is None
    forged = "f" * 32 + "." + value.partition(".")[2]  # another session, the old MAC
    assert session_id("tok", forged) is None
    for junk in (None, "", ".", "x.y", "1" * 30, "%C2%B2.x", "\u00b2" * 32 + ".x"):
        assert session_id("tok", junk) is None


@pytest.mark.parametrize(
    ("text", "number"),
    [("7", 7), ("0012", 12), ("²", None), ("٣", None), ("", None), ("-1", None), ("1" * 20, None)],
)
def test_whole_numbers_are_ascii_digits(text: str, number: int | None) -> None:
    assert whole(text) == number


def test_login_throttle_after_five_failures_in_a_minute() -> None:
    throttle = LoginThrottle(limit=5, window=60)
    for i in range(5):
        assert throttle.wait("1.2.3.4", now=i) == 0
        throttle.failed("1.2.3.4", now=i)
    assert throttle.wait("1.2.3.4", now=10) == 50  # until the first failure is a minute old
    assert throttle.wait("5.6.7.8", now=10) == 0  # per client address
    assert throttle.wait("1.2.3.4", now=60.5) == 0
    throttle.failed("1.2.3.4", now=61)
    throttle.succeeded("1.2.3.4")
    assert throttle.wait("1.2.3.4", now=62) == 0


@pytest.mark.parametrize(
    "headers, allowed",
    [
        ({}, True),  # not a browser: no forgery possible
        ({"sec_fetch_site": "same-origin"}, True),
        ({"sec_fetch_site": "cross-site", "origin": "http://ui:8080", "host": "ui:8080"}, False),
        ({"sec_fetch_site": "same-site"}, False),
        ({"origin": "http://ui:8080", "host": "ui:8080"}, True),
        ({"origin": "https://ui:8080", "host": "ui:8080"}, True),  # TLS ends at a proxy
        ({"origin": "http://evil.example", "host": "ui:8080"}, False),
        ({"origin": "null", "host": "ui:8080"}, False),
    ],
)
def test_posts_must_come_from_the_dashboard_itself(headers: dict[str, str], allowed: bool) -> None:
    conn: Any = Conn(**headers)
    assert same_origin(conn) is allowed


def test_login_only_sends_back_into_the_dashboard() -> None:
    assert _next("/ui/tasks?state=DEAD") == "/ui/tasks?state=DEAD"
    for bad in (None, "", "https://evil.example/ui", "//evil.example", "/schema"):
        assert _next(bad) == "/ui/"


def test_relative_times() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert ago(now - timedelta(minutes=3), now) == "3 min ago"
    assert ago(now + timedelta(hours=2), now) == "in 2.0 h"
    assert ago(now, now) == "just now"
    assert ago(None, now) == "—"
    assert ago(now + timedelta(days=300), now) == "in 300 d"


def test_times_far_away_are_dates_and_years_have_four_digits() -> None:
    """Rows written by SQL may hold any time; the database's extremes read as year 1 and 9999
    (engine/store.py), which no relative time helps with."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    first, last = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
    assert ago(first, now) == "0001-01-01"
    assert ago(last, now) == "9999-12-31"
    assert ago(now + timedelta(days=400), now) == "2027-02-05"
    assert clock(first) == "0001-01-01 00:00:00.000 UTC"
    assert clock(last) == "9999-12-31 23:59:59.999 UTC"
    assert rfc3339(first) == "0001-01-01T00:00:00Z"
    assert rfc3339(datetime(2026, 1, 20, 12, tzinfo=UTC)) == "2026-01-20T12:00:00Z"
    # an aware time whose UTC equivalent Python cannot hold stays in its own zone
    east = timezone(timedelta(hours=-5))
    assert clock(datetime.max.replace(tzinfo=east)) == "9999-12-31 23:59:59.999-05:00"


def test_json_too_deep_to_indent_is_shown_as_stored() -> None:
    assert pretty('{"a": [1]}') == '{\n  "a": [\n    1\n  ]\n}'
    deep = "[" * 3000 + "]" * 3000
    assert pretty(deep) == deep
    assert pretty(None) == "null"


def test_chart_stacks_failures_on_completions() -> None:
    c = chart([0] * 58 + [4, 2], [0] * 58 + [0, 2], width=600, height=100)
    assert (c["top"], c["done"], c["failed"]) == (4, 6, 2)
    last = c["bars"][-1]
    assert (last["done_h"], last["fail_h"], last["fail_y"]) == (50.0, 50.0, 0.0)
    assert last["label"] == "0 min ago: 2 completed, 2 failed"
