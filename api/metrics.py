"""GET /metrics: the cluster's figures in Prometheus text format (prometheus-client).

Task counts and queue lag are read from the tasks table at scrape time; transitions and
handler durations are the sums of what every process reported to the `processes` table
(engine/reporting.py), so any API replica gives the same cluster-wide answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from tasklease.engine.reporting import alive, cumulative, merge
from tasklease.engine.states import TRIGGERS, TaskState
from tasklease.engine.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Snapshot:
    """Collects metric families from figures already read from the database."""

    def __init__(self, counts: list[Any], lags: list[Any], processes: list[Any]) -> None:
        self.counts, self.lags, self.processes = counts, lags, processes

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily(
            "tasklease_tasks", "Tasks by queue and state", labels=["queue", "state"]
        )
        seen = {(r["queue"], r["state"]): r["tasks"] for r in self.counts}
        for queue in sorted({q for q, _ in seen} | {"default"}):
            for state in TaskState:
                tasks.add_metric([queue, state.value], seen.get((queue, state.value), 0))
        yield tasks

        due = GaugeMetricFamily(
            "tasklease_queue_due_tasks", "Tasks due and waiting for a worker", labels=["queue"]
        )
        lag = GaugeMetricFamily(
            "tasklease_queue_lag_seconds",
            "Age of the oldest due task still waiting",
            labels=["queue"],
        )
        for r in self.lags:
            due.add_metric([r["queue"]], r["due"])
            lag.add_metric([r["queue"]], r["oldest_due_seconds"])
        yield due
        yield lag

        merged = merge([p["counters"] for p in self.processes])
        transitions, durations = merged.transitions, merged.durations
        by_trigger = CounterMetricFamily(
            "tasklease_transitions", "Transitions recorded, by trigger", labels=["trigger"]
        )
        for trigger in TRIGGERS:
            by_trigger.add_metric([trigger], transitions.get(trigger, 0))
        yield by_trigger
        yield CounterMetricFamily(
            "tasklease_submissions", "Tasks submitted", value=transitions.get("submit", 0)
        )
        yield CounterMetricFamily(
            "tasklease_lease_expiries",
            "Leases that ran out and were taken over (reclaim) or ended the task (expire)",
            value=transitions.get("reclaim", 0) + transitions.get("expire", 0),
        )
        yield CounterMetricFamily(
            "tasklease_results_dropped",
            "Outcomes dropped because the worker had lost its lease",
            value=transitions.get("dropped", 0),
        )

        yield CounterMetricFamily(
            "tasklease_self_fenced",
            "Handlers stopped because their lease could not be renewed in time",
            value=transitions.get("fenced", 0),
        )
        blocked = CounterMetricFamily(
            "tasklease_event_loop_blocked",
            "Times a handler blocked its worker's event loop for 1 s or more, by action",
            labels=["action"],
        )
        blocked_seconds = CounterMetricFamily(
            "tasklease_event_loop_blocked_seconds",
            "Seconds handlers kept their worker's event loop blocked, by action",
            labels=["action"],
        )
        for action, b in sorted(merged.blocked.items()):
            blocked.add_metric([action], b["count"])
            blocked_seconds.add_metric([action], b["seconds"])
        yield blocked
        yield blocked_seconds

        hist = HistogramMetricFamily(
            "tasklease_handler_duration_seconds", "Handler run time, by action", labels=["action"]
        )
        for action, h in sorted(durations.items()):
            hist.add_metric([action], cumulative(h["buckets"]), sum_value=h["sum"])
        yield hist

        workers = [p for p in self.processes if p["kind"] == "worker" and alive(p)]
        yield GaugeMetricFamily(
            "tasklease_workers", "Worker processes seen in the last 15 s", value=len(workers)
        )
        yield GaugeMetricFamily(
            "tasklease_running_tasks",
            "Tasks running on live workers",
            value=sum(p["running"] for p in workers),
        )


async def render(store: Store) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        Snapshot(await store.counts(), await store.queue_lag(), await store.processes())
    )  # type: ignore[arg-type]
    return generate_latest(registry)
