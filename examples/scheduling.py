"""The examples of docs/scheduling.md, runnable as they are:

    tasklease worker --handlers examples.scheduling
    tasklease api --handlers examples.scheduling

tests/e2e/test_examples.py runs them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from tasklease import Snooze, TaskContext, handler, schedule


class Email(msgspec.Struct):
    to: str
    subject: str = ""


# Rate limit: the e-mail provider accepts 10 messages a second from all our workers together.
@handler("send_email", rate_limit="10/s", max_attempts=8)
async def send_email(ctx: TaskContext, payload: Email) -> dict[str, str]:
    return {"sent_to": payload.to}


# Global concurrency limit and timeout: the reporting database takes two heavy queries at a
# time, and an attempt that runs past 10 minutes is stopped and retried with backoff.
@handler("build_report", global_limit=2, timeout=600, lease_seconds=60)
async def build_report(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    return {"report": payload.get("name", "adhoc"), "attempt": ctx.attempt}


class Invoice(msgspec.Struct):
    customer_id: str
    amount: int


# Per-key limit: at most 5 invoices of one customer in flight at once, so that one customer's
# month-end batch cannot take every slot from the others (limit key:send_invoice).
@handler("send_invoice", limit_by="customer_id", global_limit=5)
async def send_invoice(ctx: TaskContext, payload: Invoice) -> dict[str, Any]:
    return {"customer_id": payload.customer_id, "amount": payload.amount}


# Periodic, declared on the handler: every night at 03:00, Paris time, daylight saving and all.
@handler("nightly_report", cron="0 3 * * *", timezone="Europe/Paris")
async def nightly_report(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, str | None]:
    return {"slot": ctx.idempotency_key}


# Periodic, declared as configuration, with a payload: every minute; a ping missed while no
# worker ran is not worth sending late.
schedule("status-ping", "ping", every=60, payload={"target": "status-page"}, missed="skip")


@handler("ping")
async def ping(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
    return {"pinged": payload["target"]}


class Export(msgspec.Struct):
    ready_at: datetime


# Snooze: wait for an export another system prepares, without spending attempts on it.
@handler("wait_for_export", max_attempts=3)
async def wait_for_export(ctx: TaskContext, payload: Export) -> dict[str, str]:
    left = (payload.ready_at - datetime.now(UTC)).total_seconds()
    if left > 0:
        raise Snooze(left, "export not ready yet")
    return {"export": "fetched"}
