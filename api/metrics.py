"""GET /metrics: the cluster's figures in Prometheus text format (prometheus-client).

Task counts, queue lag and pauses are the figures of api/stats.py (read at most every few
seconds, shared with /stats and the dashboard); transitions and
handler durations are the sums of what every process reported to the `processes` table
(engine/reporting.py), so any API replica gives the same cluster-wide answer.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from tasklease.api.stats import Figures
from tasklease.engine.reporting import cumulative, merge
from tasklease.engine.states import TRIGGERS, TaskState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Snapshot:
    """Collects metric families from the figures of api/stats.py."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures
        self.processes = figures.processes

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily(
            "tasklease_tasks", "Tasks by queue and state", labels=["queue", "state"]
        )
        queues = self.figures.queues
        for queue in sorted(set(queues) | {"default"}):
            counts = queues[queue].states if queue in queues else {}
            for state in TaskState:
                tasks.add_metric([queue, state.value], counts.get(state.value, 0))
        yield tasks
        paused = GaugeMetricFamily(
            "tasklease_queue_paused", "1 while the queue is paused", labels=["queue"]
        )
        for queue, q in queues.items():
            paused.add_metric([queue], 1 if q.paused_at else 0)
        yield paused

        due = GaugeMetricFamily(
            "tasklease_queue_due_tasks", "Tasks due and waiting for a worker", labels=["queue"]
        )
        lag = GaugeMetricFamily(
            "tasklease_queue_lag_seconds",
            "Age of the oldest due task still waiting",
            labels=["queue"],
        )
        for queue, q in queues.items():
            if q.oldest_due_seconds is not None:
                due.add_metric([queue], q.due)
                lag.add_metric([queue], q.oldest_due_seconds)
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

        workers = self.figures.live_workers
        yield GaugeMetricFamily(
            "tasklease_workers", "Worker processes seen in the last 15 s", value=len(workers)
        )
        yield GaugeMetricFamily(
            "tasklease_running_tasks",
            "Tasks running on live workers",
            value=sum(p["running"] for p in workers),
        )


def render(figures: Figures) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot(figures))  # type: ignore[arg-type]
    return generate_latest(registry)
