"""Counters per minute: what the dashboard's throughput chart reads from `processes`."""

from __future__ import annotations

from collections import Counter

import msgspec

from tasklease.engine.reporting import MINUTES_KEPT, Counters, merge, per_minute


class Clock:
    def __init__(self, minute: int) -> None:
        self.minute = minute

    def __call__(self) -> int:
        return self.minute


def test_counts_go_to_the_current_minute_and_old_minutes_are_dropped() -> None:
    clock = Clock(1000)
    c = Counters(clock)
    c.count("complete", 3)
    c.count("fail")
    clock.minute = 1001
    c.count("complete")
    assert c.minutes == {1000: Counter(complete=3, fail=1), 1001: Counter(complete=1)}
    clock.minute = 1000 + MINUTES_KEPT
    c.count("bury")
    assert sorted(c.minutes) == [1001, 1000 + MINUTES_KEPT]
    assert c.transitions == Counter(complete=4, fail=1, bury=1)


def test_per_minute_sums_processes_over_the_last_hour() -> None:
    a, b = Counters(Clock(500)), Counters(Clock(559))
    a.count("complete", 2)
    b.count("complete", 5)
    b.count("fail")
    old = Counters(Clock(400))
    old.count("complete", 100)
    series = per_minute([a.to_json(), b.to_json(), old.to_json()], now=559)
    assert len(series) == MINUTES_KEPT
    assert series[0] == Counter(complete=2) and series[-1] == Counter(complete=5, fail=1)
    assert sum(series, Counter()) == Counter(complete=7, fail=1)


def test_metrics_merge_ignores_minutes_and_reads_old_rows() -> None:
    c = Counters(Clock(7))
    c.count("complete", 2)
    without_minutes = msgspec.json.encode({"transitions": {"complete": 1}}).decode()
    c.block("slow", 2.5)
    merged = merge([c.to_json(), without_minutes, c.to_json()])
    assert merged.transitions == Counter(complete=5)
    assert merged.blocked == {"slow": {"count": 2, "seconds": 5.0}}
    assert per_minute([without_minutes], now=7) == [Counter()] * MINUTES_KEPT
