"""`tasklease submit | show | ls | cancel | requeue | stats`: a client of the HTTP API."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

URL_ENV, TOKEN_ENV = "TASKLEASE_URL", "TASKLEASE_API_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ClientError(Exception):
    """Told to the user in one line; exit status 1."""


def duration(text: str) -> timedelta:
    """`90`, `10s`, `5m`, `2h`, `1d`, or combined like `1h30m`."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90, 10s, 5m, 1h30m")
    return timedelta(seconds=sum(float(n) * _UNITS[u or "s"] for n, u in parts))


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("the payload must be a JSON object")
    return value


def rfc3339(text: str) -> str:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a time zone, e.g. Z or +02:00")
    return moment.isoformat()


class Client:
    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the API at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ClientError(f"{response.status_code}: {detail}")
        return response.json()


def _ago(value: str | None) -> str:
    if not value:
        return "-"
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    seconds = (datetime.now(UTC) - moment).total_seconds()
    word = "ago" if seconds >= 0 else "from now"
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} {word}"
    return f"{seconds:.0f}s {word}"


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers, *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _task_row(t: dict[str, Any]) -> list[Any]:
    return [
        t["id"],
        t["action"],
        t["state"],
        f"{t['attempt']}/{t['max_attempts']}",
        t["queue"],
        _ago(t["due_at"]),
        _ago(t["updated_at"]),
    ]


TASK_HEADERS = ["ID", "ACTION", "STATE", "ATTEMPT", "QUEUE", "DUE", "UPDATED"]


def show_task(task: dict[str, Any], history: list[dict[str, Any]]) -> str:
    fields = [
        "id",
        "action",
        "state",
        "attempt",
        "max_attempts",
        "queue",
        "priority",
        "due_at",
        "created_at",
        "updated_at",
        "idempotency_key",
        "worker",
        "lease_expires_at",
        "cancel_requested_at",
        "lease_seconds",
        "timeout_seconds",
        "last_error",
    ]
    width = max(map(len, fields)) + 1
    lines = [f"{f + ':':<{width}} {'-' if task[f] is None else task[f]}" for f in fields]
    lines.append(f"{'payload:':<{width}} {json.dumps(task['payload'])}")
    lines.append(f"{'result:':<{width}} {json.dumps(task['result'])}")
    rows = [
        [
            h["at"],
            h["trigger"],
            f"{h['from_state'] or '-'} -> {h['to_state']}",
            h["attempt"],
            h["worker"],
            h["detail"],
        ]
        for h in history
    ]
    return (
        "\n".join(lines)
        + "\n\nhistory:\n"
        + table(rows, ["AT", "TRIGGER", "TRANSITION", "ATTEMPT", "WORKER", "DETAIL"])
    )


def show_workflow(workflow: dict[str, Any]) -> str:
    """A workflow: its counts, then each member with what it waits for."""
    waits: dict[int, list[str]] = {}
    for e in workflow["edges"]:
        mark = "" if e["satisfied"] else "*"
        policy = "" if e["on_failure"] == "cancel" else f" ({e['on_failure']})"
        waits.setdefault(e["task_id"], []).append(f"{e['depends_on']}{mark}{policy}")
    counts = ", ".join(f"{n} {state}" for state, n in sorted(workflow["states"].items()))
    head = (
        f"workflow {workflow['id']}: {len(workflow['tasks'])} tasks, {counts}"
        f"{' (finished)' if workflow['finished'] else ''}"
    )
    if workflow["on_finish"] is not None:
        head += f"; on_finish: task {workflow['on_finish']}"
    rows = [
        [*_task_row(t)[:4], ", ".join(waits.get(t["id"], [])) or None] for t in workflow["tasks"]
    ]
    body = table(rows, [*TASK_HEADERS[:4], "WAITS FOR (* unsettled)"])
    return f"{head}\n{body}"


def run(args: argparse.Namespace) -> int:
    client = Client(args.url, os.environ.get(TOKEN_ENV))
    out: Any
    text: str
    match args.command:
        case "submit":
            body: dict[str, Any] = {"action": args.action, "payload": args.payload}
            if args.due_at:
                body["due_at"] = args.due_at
            elif args.delay is not None:
                body["due_at"] = (datetime.now(UTC) + args.delay).isoformat()
            for name in (
                "idempotency_key",
                "queue",
                "priority",
                "max_attempts",
                "lease_seconds",
                "timeout_seconds",
            ):
                if getattr(args, name) is not None:
                    body[name] = getattr(args, name)
            if args.depends_on:
                body["depends_on"] = args.depends_on
            if args.on_failure:
                body["on_failure"] = args.on_failure
            out = client.call("POST", "/tasks", json=body)
            text = f"task {out['id']} {out['action']} {out['state']}, due {out['due_at']}"
        case "workflow":
            out = client.call("GET", f"/workflows/{args.id}")
            text = show_workflow(out)
        case "show":
            out = {
                "task": client.call("GET", f"/tasks/{args.id}"),
                "transitions": client.call("GET", f"/tasks/{args.id}/transitions"),
            }
            text = show_task(out["task"], out["transitions"])
        case "ls":
            params = {
                k: v
                for k, v in {
                    "state": args.state,
                    "action": args.action,
                    "queue": args.queue,
                    "limit": args.limit,
                    "cursor": args.cursor,
                }.items()
                if v is not None
            }
            out = client.call("GET", "/tasks", params=params)
            text = table([_task_row(t) for t in out["tasks"]], TASK_HEADERS)
            if out["next_cursor"]:
                text += f"\nmore: tasklease ls --cursor {out['next_cursor']}"
        case "cancel" | "requeue":
            out = client.call("POST", f"/tasks/{args.id}/{args.command}")
            requested = args.command == "cancel" and out["state"] == "RUNNING"
            text = (
                f"task {out['id']}: cancellation requested; its worker will stop it"
                if requested
                else f"task {out['id']} is now {out['state']}"
            )
        case "stats":
            out = client.call("GET", "/stats")
            states = list(out["states"])
            rows = [
                [
                    q,
                    *(s["states"][st] for st in states),
                    s["due"],
                    "-" if s["oldest_due_seconds"] is None else f"{s['oldest_due_seconds']:.1f}s",
                    "paused" if s.get("paused_at") else "",
                ]
                for q, s in sorted(out["queues"].items())
            ]
            rows.append(["(all)", *out["states"].values(), "", "", ""])
            text = table(rows, ["QUEUE", *states, "DUE", "OLDEST DUE", ""])
            text += (
                f"\nworkers alive: {out['workers']['alive']}, "
                f"running tasks: {out['workers']['running']}"
            )
        case "schedules":
            out = client.call("GET", "/schedules")
            rows = [
                [
                    s["name"],
                    s["action"],
                    s["cron"] or f"every {s['every_seconds']:g}s",
                    s["timezone"],
                    s["missed"],
                    s["next_run_at"],
                    s["last_task_id"] or "-",
                ]
                for s in out
            ]
            text = table(rows, ["NAME", "ACTION", "WHEN", "TZ", "MISSED", "NEXT RUN", "LAST TASK"])
        case "pause" | "resume":
            out = client.call("POST", f"/queues/{args.queue}/{args.command}")
            text = (
                f"queue {out['queue']} paused since {out['paused_at']}: workers start nothing "
                "in it until `tasklease resume`"
                if out["paused"]
                else f"queue {out['queue']} runs"
            )
        case "limits":
            if args.op and (args.key is None or (args.op == "set") != (args.value is not None)):
                raise ClientError(
                    "usage: tasklease limits [set KEY VALUE | unset KEY] (see --help)"
                )
            if args.op == "set":
                value, per = limit_value(args.key, args.value)
                if args.by is not None and not args.key.startswith("key:"):
                    raise ClientError(f"limit {args.key}: --by is for a key:NAME limit only")
                body = (
                    {"value": value}
                    | ({"per_seconds": per} if per else {})
                    | ({"by": args.by} if args.by is not None else {})
                )
                out = client.call("PUT", f"/limits/{args.key}", json=body)
                text = f"limit {out['key']} = {_limit_text(out)}"
            elif args.op == "unset":
                out = client.call("DELETE", f"/limits/{args.key}")
                text = f"limit {args.key} removed"
            else:
                out = client.call("GET", "/limits")
                rows = [
                    [
                        lim["key"],
                        _limit_text(lim),
                        lim["used"],
                        "code" if lim["declared"] else "operator",
                        lim["updated_at"],
                    ]
                    for lim in out
                ]
                text = table(rows, ["KEY", "LIMIT", "IN USE", "SET BY", "UPDATED"])
        case _:
            raise ClientError(f"unknown command {args.command}")
    sys.stdout.write((json.dumps(out, indent=2) if args.json else text) + "\n")
    return 0


RATE_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}


def limit_value(key: str, text: str) -> tuple[int, float | None]:
    """VALUE of `tasklease limits set`: N (queue:, action:) or N/s, N/min, N/h (rate:)."""
    count, _, unit = text.partition("/")
    if not count.isdigit() or (unit and unit not in RATE_UNITS):
        raise ClientError(
            f"limit value {text!r} is not a count (5) or a rate (10/s, 600/min, 1000/h)"
        )
    if key.startswith("rate:") != bool(unit):
        raise ClientError(
            f"limit {key}: a rate: key takes a rate (10/s), a queue:, action: or key: key "
            "a count (5)"
        )
    return int(count), RATE_UNITS[unit] if unit else None


def _limit_text(limit: dict[str, Any]) -> str:
    per = limit["per_seconds"]
    if limit.get("by"):
        return f"{limit['value']} running per {limit['by']}"
    return str(limit["value"]) + (f" per {per:g}s" if per else " running")


def add_commands(sub: Any, state_choices: list[str]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"the API (default: ${URL_ENV} or {DEFAULT_URL}); the token comes from ${TOKEN_ENV}",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser(
        "submit",
        parents=[common],
        help="submit a task over the API",
        description="Submit a task. Example: tasklease submit email_user "
        "--payload '{\"user_id\": 42}' --in 10m",
    )
    p.add_argument("action", help="the action, e.g. email_user")
    p.add_argument("--payload", type=json_object, default={}, help="a JSON object (default {})")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--due-at", type=rfc3339, help="RFC 3339 time, e.g. 2026-01-20T12:00:00Z")
    when.add_argument("--in", dest="delay", type=duration, help="run after a delay: 90, 10s, 5m")
    p.add_argument(
        "--idempotency-key",
        help="a repeat with the same content returns the first task (other content: 409)",
    )
    p.add_argument("--queue", help="queue (default: default)")
    p.add_argument("--priority", type=int, help="higher runs first (default 0)")
    p.add_argument("--max-attempts", type=int, help="default: the handler's")
    p.add_argument("--lease-seconds", type=float, help="default: the handler's")
    p.add_argument(
        "--timeout-seconds", type=float, help="stop an attempt after this long (the handler's)"
    )

    p.add_argument(
        "--depends-on",
        type=int,
        action="append",
        metavar="ID",
        help="wait for this task to complete first (repeatable; docs/workflows.md)",
    )
    p.add_argument(
        "--on-failure",
        choices=["cancel", "run", "hold"],
        help="what a dependency ending DEAD or CANCELLED does to it (default cancel)",
    )

    p = sub.add_parser(
        "workflow", parents=[common], help="a workflow: every member's state and dependencies"
    )
    p.add_argument("id", type=int)

    p = sub.add_parser("show", parents=[common], help="a task and its history")
    p.add_argument("id", type=int)

    p = sub.add_parser("ls", parents=[common], help="list tasks, newest first")
    p.add_argument("--state", choices=state_choices, type=str.upper)
    p.add_argument("--action")
    p.add_argument("--queue")
    p.add_argument("--limit", type=int, default=None, help="page size (default 50, max 500)")
    p.add_argument("--cursor", help="from the previous page's `more:` line")

    for name, what in (
        ("cancel", "cancel a task (PENDING/FAILED now, RUNNING via its worker)"),
        ("requeue", "requeue a DEAD task"),
    ):
        p = sub.add_parser(name, parents=[common], help=what)
        p.add_argument("id", type=int)

    sub.add_parser("stats", parents=[common], help="counts by state and queue, queue lag")
    sub.add_parser("schedules", parents=[common], help="periodic tasks and when each runs next")

    p = sub.add_parser(
        "pause",
        parents=[common],
        help="pause a queue: workers start nothing in it until it is resumed",
        description="Pause a queue: from their next claim, workers start nothing in it (no "
        "claim, no takeover of a crashed worker's task) until `tasklease resume`. Submissions "
        "are still accepted; running tasks finish. Kept in the database.",
    )
    p.add_argument("queue")
    p = sub.add_parser("resume", parents=[common], help="resume a paused queue")
    p.add_argument("queue")

    p = sub.add_parser(
        "limits",
        parents=[common],
        help="global limits: list, set or unset",
        description="Global limits, the same for every worker, stored in the database. "
        "KEY is queue:NAME or action:NAME (at most VALUE tasks running at once), rate:NAME "
        "(at most VALUE starts per period, e.g. 10/s, 600/min, 1000/h) or key:NAME (at most "
        "VALUE tasks of the action running at once per value of a payload field, --by FIELD, "
        "which a key: limit declared by code already has). A value set here "
        "stays until unset, whatever the workers' code declares; lowering a limit stops "
        "new starts beyond it, running tasks finish. "
        "Examples: tasklease limits set action:send_email 5; "
        "tasklease limits set rate:send_email 10/s; "
        "tasklease limits set key:send_email 2 --by customer_id; "
        "tasklease limits unset queue:reports",
    )
    p.add_argument("op", nargs="?", choices=["set", "unset"], help="without: list them")
    p.add_argument("key", nargs="?", help="queue:NAME, action:NAME, rate:NAME or key:NAME")
    p.add_argument("value", nargs="?", help="N, or for a rate N/s, N/min, N/h")
    p.add_argument(
        "--by",
        metavar="FIELD",
        help="key:NAME only: the payload field whose values each get the limit "
        "(default: the one the limit has)",
    )
