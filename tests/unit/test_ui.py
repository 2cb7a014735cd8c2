"""The dashboard's session cookie, cross-site check and redirects, without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tasklease.api.ui import _next, ago, chart, same_origin, session_valid, session_value


class Conn:
    def __init__(self, **headers: str) -> None:
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}


def test_session_cookie_is_a_mac_of_the_token_that_expires() -> None:
    value = session_value("tok", 2_000_000_000)
    assert "tok" not in value and value.startswith("2000000000.")
    assert session_valid("tok", value, now=1_999_999_999)
    assert not session_valid("tok", value, now=2_000_000_001)
    assert not session_valid("other", value, now=0)
    forged = "3000000000." + value.partition(".")[2]  # a later expiry, the old MAC
    assert not session_valid("tok", forged, now=0)
    for junk in (None, "", ".", "x.y", "1" * 30):
        assert not session_valid("tok", junk, now=0)


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


def test_chart_stacks_failures_on_completions() -> None:
    c = chart([0] * 58 + [4, 2], [0] * 58 + [0, 2], width=600, height=100)
    assert (c["top"], c["done"], c["failed"]) == (4, 6, 2)
    last = c["bars"][-1]
    assert (last["done_h"], last["fail_h"], last["fail_y"]) == (50.0, 50.0, 0.0)
    assert last["label"] == "0 min ago: 2 completed, 2 failed"
