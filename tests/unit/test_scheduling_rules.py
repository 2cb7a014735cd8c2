"""Declarations of scheduling options: slots, missed-run decisions, limits, snooze."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from tasklease.engine.registry import HandlerError, Snooze, parse_rate
from tasklease.engine.schedules import MISFIRE_GRACE, Schedule, ScheduleError, decide, schedule

T = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # the night Paris moves to summer time


def test_interval_slots_are_whole_multiples_since_the_epoch() -> None:
    s = Schedule("s", "noop", every=600)
    assert s.latest_slot(T) == T.replace(minute=30)
    assert s.next_slot(T) == T.replace(minute=40)
    assert s.next_slot(T.replace(minute=33)) == T.replace(minute=40)


def test_cron_slots_follow_the_time_zone_through_a_dst_change() -> None:
    s = Schedule("s", "noop", cron="0 3 * * *", timezone="Europe/Paris")
    # 03:00 in Paris is 01:00 UTC after the change (CEST) and 02:00 UTC before it (CET)
    assert s.next_slot(T) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert s.latest_slot(T) == datetime(2026, 3, 28, 2, 0, tzinfo=UTC)
    assert s.next_slot(s.next_slot(T)) == datetime(2026, 3, 30, 1, 0, tzinfo=UTC)


def test_a_slot_exactly_now_is_the_latest() -> None:
    s = Schedule("s", "noop", cron="30 0 * * *")
    assert s.latest_slot(T) == T
    assert s.next_slot(T) == T + timedelta(days=1)


@pytest.mark.parametrize(
    ("missed", "late", "runs"),
    [
        ("once", 0, True),
        ("once", 5 * 3600, True),
        ("skip", 1, True),
        ("skip", MISFIRE_GRACE + 1, False),
    ],
)
def test_missed_policy(missed: str, late: float, runs: bool) -> None:
    s = Schedule("s", "noop", cron="0 * * * *", missed=missed)
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC) + timedelta(seconds=late)
    d = decide(s, now)
    assert d.slot == s.latest_slot(now) and d.run is runs


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({}, "either cron or every"),
        ({"cron": "* * * * *", "every": 5}, "either cron or every"),
        ({"cron": "61 * * * *"}, "not a valid cron expression"),
        ({"every": 0}, "positive number of seconds"),
        ({"every": 5, "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"every": 5, "missed": "all"}, "'once' or 'skip'"),
    ],
)
def test_bad_schedules_are_named(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ScheduleError, match=problem):
        schedule("bad_one", "noop", **kwargs)


@pytest.mark.parametrize(
    ("rate", "parsed"),
    [("10/s", (10, 1.0)), ("600/min", (600, 60.0)), ("5/h", (5, 3600.0)), ((3, 2.5), (3, 2.5))],
)
def test_rate_limits(rate: Any, parsed: tuple[int, float]) -> None:
    assert parse_rate("a", rate) == parsed


@pytest.mark.parametrize("rate", ["10", "ten/s", "10/week", "0/s", (1, 0)])
def test_bad_rate_limits_are_named(rate: Any) -> None:
    with pytest.raises(HandlerError, match="rate_limit"):
        parse_rate("a", rate)


def test_snooze_needs_a_delay() -> None:
    assert Snooze(5).seconds == 5.0 and str(Snooze(5)) == "snoozed for 5s"
    with pytest.raises(ValueError, match="0 seconds or more"):
        Snooze(-1)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"timeout": 0}, "timeout must be positive"),
        ({"global_limit": 0}, "global_limit must be at least 1"),
        ({"cron": "nope"}, "not a valid cron expression"),
    ],
)
def test_bad_handler_options_are_named(kwargs: dict[str, Any], problem: str) -> None:
    from tasklease.engine.registry import handler

    with pytest.raises((HandlerError, ScheduleError), match=problem):
        handler("bad_options", **kwargs)


class Greeting(msgspec.Struct):
    user_id: int


def test_a_schedule_must_fit_its_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasklease.engine import registry, schedules

    async def greet(ctx: Any, payload: Greeting) -> None: ...

    handlers = {
        "greet": registry.Handler(
            action="greet",
            fn=greet,
            payload_type=Greeting,
            lease_seconds=None,
            max_attempts=5,
            backoff=(60,),
            jitter=0.1,
            is_async=True,
        )
    }
    monkeypatch.setitem(schedules.SCHEDULES, "welcome", Schedule("welcome", "greet", every=60))
    with pytest.raises(HandlerError, match="schedule 'welcome': payload does not fit"):
        registry.check_schedules(handlers)
    monkeypatch.setitem(schedules.SCHEDULES, "welcome", Schedule("welcome", "fax", every=60))
    with pytest.raises(HandlerError, match="no handler for action 'fax'"):
        registry.check_schedules(handlers)
    monkeypatch.setitem(
        schedules.SCHEDULES,
        "welcome",
        Schedule("welcome", "greet", every=60, payload={"user_id": 7}),
    )
    registry.check_schedules(handlers)
