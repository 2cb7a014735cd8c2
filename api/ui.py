"""The web dashboard at /ui: server-rendered pages over engine.store and engine.operations.

Pages are Jinja templates (api/templates/ui); htmx and a little plain JavaScript come from
api/static, served at /ui/static. With TASKLEASE_API_TOKEN set, a page needs a session
cookie obtained by typing the token at /ui/login; POSTs must come from the dashboard's own
origin (see same_origin).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, ResponseHeader, State
from litestar.exceptions import (
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Parameter
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from markupsafe import Markup, escape

from tasklease.engine import operations
from tasklease.engine.reporting import alive, minute_now, per_minute
from tasklease.engine.states import TaskState
from tasklease.engine.store import Store

log = logging.getLogger("tasklease.api")
HERE = Path(__file__).resolve().parent
COOKIE = "tasklease_session"
SESSION_SECONDS = 12 * 3600
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
WORKERS_SEEN_SECONDS = 300  # workers shown on the overview: seen in the last 5 minutes
FAILURES = ("fail", "bury", "expire")
MAX_ID = 2**63 - 1  # bigint
TaskId = Annotated[int, Parameter(ge=1, le=MAX_ID)]
MAX_TEXT = 200  # an action's or queue's name, an idempotency key (engine/tasks.py)
MAX_NEXT = 2048  # where the login sends back to: a path of the dashboard

# Messages shown after an action, chosen by code in the URL; the values filled in are
# checked (ids and counts are digits, a state is a state, an action name is cut at 200
# characters; Jinja escapes it), so a crafted link can change little of what the page says.
NOTICES = {
    "cancelled": ("ok", "Task {id} cancelled."),
    "cancel_requested": (
        "ok",
        "Cancellation of task {id} requested: its worker stops the handler at its next "
        "heartbeat and records RUNNING → CANCELLED.",
    ),
    "cancel_conflict": (
        "error",
        "Task {id} is {state}: only PENDING, FAILED, WAITING or RUNNING tasks can be cancelled.",
    ),
    "requeued": ("ok", "Task {id} requeued: PENDING, due now, attempts reset."),
    "requeue_conflict": ("error", "Task {id} is {state}: only DEAD tasks can be requeued."),
    "requeued_all": ("ok", "{n} DEAD task(s) of {action} requeued: PENDING, due now."),
    "paused": (
        "ok",
        "Queue {queue} paused: workers start nothing in it until it is resumed; "
        "submissions are still accepted.",
    ),
    "resumed": ("ok", "Queue {queue} resumed."),
}


# --- sessions and cross-site requests ------------------------------------------------------


def whole(text: str | None, digits: int = 19) -> int | None:
    """A whole number written in ASCII digits (str.isdigit also takes "²", which int()
    refuses), at most `digits` long; else None."""
    if text is None or not re.fullmatch(rf"[0-9]{{1,{digits}}}", text):
        return None
    return int(text)


def plain_task_id(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """A task id in a path is written in ASCII digits. Litestar's `int` path parameter takes
    whatever int() takes, so /tasks/٣ (an Arabic-Indic three), /tasks/+3, /tasks/%203 and
    /tasks/0_3 named task 3 (and POST /tasks/٣/cancel cancelled it)."""
    if "task_id" not in connection.path_params:
        return
    found = re.search(r"/tasks/([^/]*)", connection.scope["path"])
    if found is None or not re.fullmatch(r"[0-9]{1,19}", found.group(1)):
        written = found.group(1) if found else ""
        raise ValidationException(
            f"invalid request: `task_id`: {written[:40]!r} is not a task id (ASCII digits)"
        )


def charset(parameters: str) -> str | None:
    """The charset a Content-Type's parameters (after the `;`) name, lower case, unquoted."""
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def host_name(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The name in the Host header, without its port or an IPv6 address's brackets. Not
    `request.url.hostname`: Litestar's URL parses the port eagerly and raises ValueError
    (a 500) for `Host: x:abc`."""
    host = connection.headers.get("host", "").strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0]


def here(connection: ASGIConnection[Any, Any, Any, Any]) -> tuple[str, str]:
    """This request's path and query string, from the ASGI scope (see host_name)."""
    path = connection.scope.get("root_path", "") + connection.scope["path"]
    return path, connection.scope.get("query_string", b"").decode("latin-1")


def session_value(token: str, session_id: str) -> str:
    """`id.mac`: the cookie names a server-side session (table ui_sessions) and holds a MAC
    keyed by the token, never the token itself: a new token ends every session."""
    mac = hmac.new(token.encode(), f"tasklease-ui:{session_id}".encode(), hashlib.sha256)
    return f"{session_id}.{mac.hexdigest()}"


def session_id(token: str, value: str | None) -> str | None:
    """The session a cookie names when its MAC is right (its row must exist too)."""
    sid, _, _ = (value or "").partition(".")
    if not re.fullmatch(r"[0-9a-f]{32}", sid):
        return None
    # as bytes: compare_digest refuses str with non-ASCII characters (TypeError, a 500)
    given = (value or "").encode("utf-8", "surrogateescape")
    return sid if hmac.compare_digest(session_value(token, sid).encode(), given) else None


class LoginThrottle:
    """Failed logins per client address: after `limit` within `window` seconds, the login
    answers 429 until the oldest of them is that old, whatever token is given."""

    def __init__(self, limit: int = 5, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self.failures: dict[str, collections.deque[float]] = {}

    def wait(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        recent = self.failures.get(client)
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if not recent:
            self.failures.pop(client, None)
            return 0.0
        return max(0.0, recent[0] + self.window - now) if len(recent) >= self.limit else 0.0

    def failed(self, client: str, now: float | None = None) -> None:
        if len(self.failures) > 10_000:  # many addresses: forget the idle ones
            for key in [k for k, v in self.failures.items() if not v or len(v) < self.limit]:
                del self.failures[key]
        now = time.monotonic() if now is None else now
        self.failures.setdefault(client, collections.deque(maxlen=self.limit)).append(now)

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


THROTTLE = LoginThrottle()


def same_origin(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """Browsers say where a POST comes from (Sec-Fetch-Site, else Origin); it must be us. A
    request with neither is not from a browser, so it cannot be a cross-site forgery."""
    site = connection.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = connection.headers.get("origin")
    if origin is None:
        return True
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # `http://[::1`: no origin of ours
        return False
    return origin != "null" and netloc == connection.headers.get("host")


class LoginRequired(NotAuthorizedException):
    pass


async def ui_guard(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    if connection.scope.get("method") == "POST" and not same_origin(connection):
        raise PermissionDeniedException("cross-site request refused")
    token: str | None = connection.app.state.api_token
    if not token or handler.opt.get("public"):
        return
    sid = session_id(token, connection.cookies.get(COOKIE))
    if sid is None or not await _store(connection.app.state).ui_session_alive(sid):
        raise LoginRequired("log in first")


def to_login(request: Request[Any, Any, Any], exc: LoginRequired) -> Response[Any]:
    """A page goes to the login form and comes back; htmx polling reloads the whole page."""
    if request.headers.get("hx-request"):
        target = "/ui/login?" + urlencode({"next": "/ui/"})
        return Response(b"", status_code=401, headers={"HX-Redirect": target})
    path, query = here(request)
    back = path + (f"?{query}" if query else "")
    if request.method != "GET" or len(back) > MAX_NEXT:
        back = "/ui/"
    return Redirect("/ui/login?" + urlencode({"next": back}))


def refused(request: Request[Any, Any, Any], exc: PermissionDeniedException) -> Response[Any]:
    return Response(exc.detail, status_code=403, media_type="text/plain")


# --- template helpers ----------------------------------------------------------------------


RELATIVE_SECONDS = 365 * 86400  # further away than a year: the date, not "in 3 y"


def ago(at: datetime | None, now: datetime | None = None) -> str:
    """`3 min ago`, `in 2 h`: relative to now, coarse on purpose; further than a year away,
    the date (rows written by SQL may say year 1 or 9999: `in 2914000 d` helps no one)."""
    if at is None:
        return "—"
    seconds = ((now or datetime.now(UTC)) - at).total_seconds()
    if abs(seconds) >= RELATIVE_SECONDS:
        return utc(at).date().isoformat()
    text = span(abs(seconds))
    if abs(seconds) < 1:
        return "just now"
    return f"{text} ago" if seconds > 0 else f"in {text}"


def span(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def utc(at: datetime) -> datetime:
    """In UTC; as it is when it cannot be moved there (a zone's offset past year 9999)."""
    try:
        return at.astimezone(UTC)
    except (OverflowError, ValueError):
        return at


def rfc3339(at: datetime | None) -> str:
    return "" if at is None else utc(at).isoformat().replace("+00:00", "Z")


def clock(at: datetime | None) -> str:
    """Absolute, to the millisecond, in UTC (isoformat: strftime writes year 1 as `1`)."""
    if at is None:
        return "—"
    return utc(at).isoformat(sep=" ", timespec="milliseconds").replace("+00:00", " UTC")


def pretty(raw: str | None) -> str:
    """Indented JSON; as stored when it cannot be (nesting deeper than msgspec goes)."""
    if raw is None:
        return "null"
    try:
        return msgspec.json.format(raw, indent=2)
    except (RecursionError, msgspec.DecodeError):
        return raw


def _engine(engine: JinjaTemplateEngine) -> None:
    engine.engine.filters.update(ago=ago, span=span, rfc3339=rfc3339, clock=clock, pretty=pretty)
    engine.engine.globals.update(states=[s.value for s in TaskState])


TEMPLATES = TemplateConfig(
    directory=HERE / "templates", engine=JinjaTemplateEngine, engine_callback=_engine
)


def _store(state: State) -> Store:
    store: Store = state.store
    return store


def page(
    request: Request[Any, Any, Any], name: str, status_code: int = 200, **context: Any
) -> Template:
    notice = NOTICES.get(request.query_params.get("notice", ""))
    if notice is not None:
        given = ("id", "state", "n", "action", "queue")
        fields = {k: request.query_params.get(k, "") for k in given}
        fields = {
            "id": fields["id"] if whole(fields["id"]) is not None else "?",
            "n": fields["n"] if whole(fields["n"]) is not None else "?",
            "state": fields["state"] if fields["state"] in TaskState.__members__ else "?",
            "action": fields["action"][:200],
            "queue": fields["queue"][:200],
        }
        context["notice"] = (notice[0], notice[1].format(**fields))
    context.update(auth=bool(request.app.state.api_token), path=here(request)[0])
    return Template(template_name=f"ui/{name}", context=context, status_code=status_code)


def see(target: str, cookies: list[Cookie] | None = None) -> Redirect:
    """After a POST: 303, so the browser GETs the page it is sent to."""
    return Redirect(target, status_code=303, cookies=cookies or [])


def link(path: str, **params: Any) -> str:
    given = {k: v for k, v in params.items() if v not in (None, "")}
    return path + ("?" + urlencode(given) if given else "")


# --- overview ------------------------------------------------------------------------------


async def overview_context(state: State) -> dict[str, Any]:
    figures = await state.stats.figures()
    dead = await _store(state).dead_by_action()
    recent = [p for p in figures.processes if p["seen_seconds_ago"] <= 3600]
    series = per_minute([p["counters"] for p in recent], minute_now())
    workers = [
        {**dict(p), "alive": alive(p)}
        for p in figures.processes
        if p["kind"] == "worker" and p["seen_seconds_ago"] <= WORKERS_SEEN_SECONDS
    ]
    return {
        "states": figures.states,
        "queues": figures.queues,
        "oldest_due": figures.oldest_due_seconds,
        "chart": chart(
            [c["complete"] for c in series], [sum(c[t] for t in FAILURES) for c in series]
        ),
        "workers": workers,
        "dead": list(dead),
        "now": datetime.now(UTC),
    }


def chart(
    done: list[int], failed: list[int], width: int = 600, height: int = 120
) -> dict[str, Any]:
    """Bars per minute for an inline SVG: completions below, failures stacked above."""
    top = max([d + f for d, f in zip(done, failed, strict=True)] + [1])
    step = width / len(done)
    bars = []
    for i, (d, f) in enumerate(zip(done, failed, strict=True)):
        hd, hf = height * d / top, height * f / top
        bars.append(
            {
                "x": round(i * step + 1, 1),
                "w": round(step - 2, 1),
                "done_y": round(height - hd, 1),
                "done_h": round(hd, 1),
                "fail_y": round(height - hd - hf, 1),
                "fail_h": round(hf, 1),
                "label": f"{len(done) - i - 1} min ago: {d} completed, {f} failed",
            }
        )
    last = done[-5:], failed[-5:]
    return {
        "bars": bars,
        "width": width,
        "height": height,
        "top": top,
        "done": sum(done),
        "failed": sum(failed),
        "done_rate": sum(last[0]) / 5,
        "failed_rate": sum(last[1]) / 5,
    }


@get("/", name="ui-overview")
async def overview(request: Request[Any, Any, Any], state: State) -> Template:
    return page(request, "overview.html", **await overview_context(state))


@get("/fragments/overview")
async def overview_fragment(request: Request[Any, Any, Any], state: State) -> Template:
    return page(request, "_overview.html", **await overview_context(state))


# --- tasks ---------------------------------------------------------------------------------


@get("/tasks")
async def task_list(
    request: Request[Any, Any, Any],
    state: State,
    task_state: Annotated[str | None, Parameter(query="state")] = None,
    action: str | None = None,
    queue: str | None = None,
    q: str | None = None,
    limit: str | None = None,
    cursor: str | None = None,
) -> Template:
    store = _store(state)
    problems = []
    filters = {"state": task_state or None, "action": action or None, "queue": queue or None}
    for name, value in (*filters.items(), ("q", q)):
        if value is not None and "\x00" in value:  # PostgreSQL text cannot hold it
            problems.append(f"{name} {value!r} holds a NUL character")
            if name == "q":
                q = None
            else:
                filters[name] = None
    if filters["state"] is not None and filters["state"] not in TaskState.__members__:
        problems.append(f"unknown state {filters['state']!r}")
        filters["state"] = None
    size = PAGE_SIZE if not limit else whole(limit, 4)
    if size is None:
        problems.append(f"limit {limit!r} is not a number")
        size = PAGE_SIZE
    size = min(max(size, 1), MAX_PAGE_SIZE)
    before = whole(cursor) if cursor else None
    if before is not None and before > MAX_ID:
        before = None
    if cursor and before is None:
        problems.append(f"cursor {cursor!r} is not a task id")
    search = (q or "").strip()
    next_link = None
    if search:
        found = {}
        number = whole(search)
        if number is not None and 0 < number < 2**63:
            row = await store.get(number)
            if row is not None:
                found[row["id"]] = row
        if len(search) <= 200:
            row = await store.get_by_idempotency_key(search)
            if row is not None:
                found[row["id"]] = row
        rows = sorted(found.values(), key=lambda r: -r["id"])
    else:
        rows = await store.list_tasks(limit=size + 1, before=before, **filters)
        if len(rows) > size:
            rows = rows[:size]
            next_link = link("/ui/tasks", **filters, limit=limit, cursor=rows[-1]["id"])
    return page(
        request,
        "tasks.html",
        400 if problems else 200,
        tasks=rows,
        filters=filters,
        q=search,
        limit=size,
        problems=problems,
        next_link=next_link,
        first_link=link("/ui/tasks", **filters, limit=limit) if before is not None else None,
        actions=sorted(state.handlers),
        now=datetime.now(UTC),
    )


@get("/tasks/{task_id:int}")
async def task_detail(request: Request[Any, Any, Any], state: State, task_id: TaskId) -> Template:
    store = _store(state)
    task = await store.get(task_id)
    if task is None:
        return page(request, "missing.html", status_code=404, task_id=task_id)
    steps, previous = [], None
    for r in await store.history(task_id):
        steps.append({**dict(r), "after": None if previous is None else (r["at"] - previous)})
        previous = r["at"]
    message, _, trace = (task["last_error"] or "").partition("\n\n")
    edges = await store.task_edges(task_id)  # two index probes; none for most tasks
    return page(
        request,
        "task.html",
        task=task,
        dependencies=[e for e in edges if e["kind"] == "dependency"],
        dependants=[e for e in edges if e["kind"] == "dependant"],
        steps=steps,
        error_message=message,
        error_trace=trace,
        cancellable=task["state"] in operations.CANCELLABLE,
        now=datetime.now(UTC),
    )


# --- workflows (docs/workflows.md) --------------------------------------------------------

NODE_W, NODE_H, GAP_X, GAP_Y = 170, 46, 60, 18


def levels(ids: list[int], waits: dict[int, list[int]]) -> dict[int, int]:
    """Each task's column: 0 when it waits for nothing in the graph, else one past the
    furthest of what it waits for (a graph is acyclic: submissions with cycles are refused)."""
    level: dict[int, int] = {}

    def of(task: int, seen: frozenset[int] = frozenset()) -> int:
        if task not in level:
            inside = [d for d in waits.get(task, []) if d in waits and d not in seen]
            level[task] = 1 + max((of(d, seen | {task}) for d in inside), default=-1)
        return level[task]

    for task in ids:
        of(task)
    return level


def workflow_svg(tasks: list[Mapping[str, Any]], edges: list[Mapping[str, Any]]) -> Markup:
    """The workflow as an SVG graph, drawn here: a column per level, a box per task (its
    state's colour, a link to its page), an arrow from each dependency to its dependant
    (dashed while it holds the dependant back)."""
    ids = [t["id"] for t in tasks]
    waits: dict[int, list[int]] = {i: [] for i in ids}
    for e in edges:
        if e["task_id"] in waits:
            waits[e["task_id"]].append(e["depends_on"])
    level = levels(ids, waits)
    rows: dict[int, int] = {}
    place: dict[int, tuple[int, int]] = {}
    for t in tasks:
        col = level[t["id"]]
        place[t["id"]] = (col, rows.get(col, 0))
        rows[col] = rows.get(col, 0) + 1

    def xy(task: int) -> tuple[int, int]:
        col, row = place[task]
        return 10 + col * (NODE_W + GAP_X), 10 + row * (NODE_H + GAP_Y)

    width = 20 + (max(level.values(), default=0) + 1) * (NODE_W + GAP_X) - GAP_X
    height = 20 + max(rows.values(), default=1) * (NODE_H + GAP_Y) - GAP_Y
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="workflow graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>',
    ]
    for e in edges:
        if e["task_id"] not in place or e["depends_on"] not in place:
            continue
        (x1, y1), (x2, y2) = xy(e["depends_on"]), xy(e["task_id"])
        dash = "" if e["satisfied"] else ' stroke-dasharray="5,4"'
        mid_y1, mid_y2 = y1 + NODE_H // 2, y2 + NODE_H // 2
        curve = (
            f"M{x1 + NODE_W},{mid_y1} C{x1 + NODE_W + GAP_X // 2},{mid_y1} "
            f"{x2 - GAP_X // 2},{mid_y2} {x2},{mid_y2}"
        )
        title = f"{e['task_id']} waits for {e['depends_on']} ({escape(e['on_failure'])})"
        parts.append(
            f'<path class="edge" d="{curve}" marker-end="url(#arrow)"{dash}>'
            f"<title>{title}</title></path>"
        )
    for t in tasks:
        x, y = xy(t["id"])
        state = escape(t["state"])
        parts.append(
            f'<a href="/ui/tasks/{t["id"]}"><g class="node state-{state.lower()}" '
            f'id="node-{t["id"]}"><rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" '
            f'rx="6"/><text x="{x + 8}" y="{y + 18}">{t["id"]} · {escape(t["action"][:18])}'
            f'</text><text x="{x + 8}" y="{y + 36}" class="state">{state}</text></g></a>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


@get("/workflows/{workflow_id:int}")
async def workflow_detail(
    request: Request[Any, Any, Any], state: State, workflow_id: TaskId
) -> Template:
    store = _store(state)
    row = await store.workflow(workflow_id)
    if row is None:
        return page(request, "missing.html", status_code=404, task_id=workflow_id, what="workflow")
    tasks = await store.workflow_tasks(workflow_id)
    edges = await store.edges([t["id"] for t in tasks])
    counts = collections.Counter(t["state"] for t in tasks)
    return page(
        request,
        "workflow.html",
        workflow=row,
        tasks=tasks,
        counts=sorted(counts.items()),
        graph=workflow_svg(tasks, edges),
        now=datetime.now(UTC),
    )


@post("/tasks/{task_id:int}/cancel")
async def cancel(state: State, task_id: TaskId) -> Redirect:
    outcome, row = await operations.cancel(_store(state), task_id)
    detail = f"/ui/tasks/{task_id}"
    if outcome is operations.Outcome.NOT_FOUND or row is None:
        return see(detail)
    if outcome is operations.Outcome.CONFLICT:
        return see(link(detail, notice="cancel_conflict", id=task_id, state=row["state"]))
    done = outcome is operations.Outcome.DONE
    state.counters.count("cancel" if done else "cancel_request")
    log.info("task %d: %s (dashboard)", task_id, "cancelled" if done else "cancellation requested")
    return see(link(detail, notice="cancelled" if done else "cancel_requested", id=task_id))


@post("/tasks/{task_id:int}/requeue")
async def requeue(state: State, task_id: TaskId) -> Redirect:
    outcome, row = await operations.requeue(_store(state), task_id)
    detail = f"/ui/tasks/{task_id}"
    if outcome is operations.Outcome.NOT_FOUND or row is None:
        return see(detail)
    if outcome is operations.Outcome.CONFLICT:
        return see(link(detail, notice="requeue_conflict", id=task_id, state=row["state"]))
    state.counters.count("requeue")
    log.info("task %d: DEAD -> PENDING (requeue, dashboard)", task_id)
    return see(link(detail, notice="requeued", id=task_id))


@post("/queues/{queue:str}/pause")
async def pause_queue(state: State, queue: str) -> Redirect:
    await _store(state).pause_queue(queue)
    log.info("queue %s paused (dashboard)", queue)
    return see(link("/ui/", notice="paused", queue=queue))


@post("/queues/{queue:str}/resume")
async def resume_queue(state: State, queue: str) -> Redirect:
    if await _store(state).resume_queue(queue):
        log.info("queue %s resumed (dashboard)", queue)
    return see(link("/ui/", notice="resumed", queue=queue))


@get("/requeue-dead")
async def requeue_dead_confirm(
    request: Request[Any, Any, Any], state: State, action: str = ""
) -> Template:
    dead = {r["action"]: r["tasks"] for r in await _store(state).dead_by_action()}
    return page(request, "requeue_dead.html", action=action, count=dead.get(action, 0))


@post("/requeue-dead")
async def requeue_dead(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    form = await request.form()
    action = str(form.get("action", ""))
    if len(action) > MAX_TEXT or "\x00" in action:  # no action has such a name
        return Response(
            f"action: no action is named so (at most {MAX_TEXT} characters, no NUL)",
            status_code=400,
            media_type="text/plain",
        )
    moved = await operations.requeue_action(_store(state), action) if action else 0
    state.counters.count("requeue", moved)
    log.info("%d DEAD task(s) of %s: DEAD -> PENDING (requeue, dashboard)", moved, action)
    return see(link("/ui/tasks", action=action, notice="requeued_all", n=moved))


# --- login ---------------------------------------------------------------------------------


def _next(target: str | None) -> str:
    """Only back into the dashboard: never to another site (`//evil`), nor to a URL longer
    than any of its pages needs."""
    if target and target.startswith("/ui") and not target.startswith("//"):
        return target if len(target) <= MAX_NEXT else "/ui/"
    return "/ui/"


@get("/login", opt={"public": True})
async def login_form(request: Request[Any, Any, Any], next: str | None = None) -> Response[Any]:
    if not request.app.state.api_token:
        return Redirect(_next(next))
    return page(request, "login.html", next=_next(next))


@post("/login", opt={"public": True})
async def login(request: Request[Any, Any, Any]) -> Response[Any]:
    token: str | None = request.app.state.api_token
    form: Mapping[str, Any] = await request.form()
    target = _next(str(form.get("next", "")))
    if not token:
        return see(target)
    client = request.client.host if request.client else "?"
    wait = THROTTLE.wait(client)
    if wait:
        log.warning("dashboard login from %s refused: too many wrong tokens", client)
        response = page(
            request,
            "login.html",
            status_code=429,
            next=target,
            error=f"Too many wrong tokens: try again in {math.ceil(wait)} s.",
        )
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response
    given = str(form.get("token", ""))
    if not hmac.compare_digest(given.encode(), token.encode()):
        THROTTLE.failed(client)
        log.warning("dashboard login from %s refused: wrong token", client)
        return page(request, "login.html", status_code=401, next=target, error="Wrong token.")
    THROTTLE.succeeded(client)
    host = host_name(request)
    sid = secrets.token_hex(16)
    await _store(request.app.state).start_ui_session(sid, SESSION_SECONDS)
    cookie = Cookie(
        key=COOKIE,
        value=session_value(token, sid),
        path="/ui",
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        # Browsers keep Secure cookies from https and from loopback (a secure context).
        secure=request.scope.get("scheme") == "https" or host in LOOPBACK,
    )
    return see(target, [cookie])


@post("/logout", opt={"public": True})
async def logout(request: Request[Any, Any, Any]) -> Redirect:
    """Ends the session on the server too: the cookie, if copied, opens nothing any more."""
    token: str | None = request.app.state.api_token
    sid = session_id(token, request.cookies.get(COOKIE)) if token else None
    if sid is not None:
        await _store(request.app.state).end_ui_session(sid)
    return see("/ui/login", [Cookie(key=COOKIE, value="", path="/ui", max_age=0)])


SECURITY_HEADERS = [
    ResponseHeader(
        name="Content-Security-Policy",
        value="default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'",
    ),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="Referrer-Policy", value="same-origin"),
    ResponseHeader(name="Cache-Control", value="no-store"),
]

router = Router(
    path="/ui",
    route_handlers=[
        overview,
        overview_fragment,
        task_list,
        task_detail,
        workflow_detail,
        cancel,
        requeue,
        requeue_dead_confirm,
        requeue_dead,
        pause_queue,
        resume_queue,
        login_form,
        login,
        logout,
    ],
    guards=[ui_guard, plain_task_id],
    opt={"ui": True},
    include_in_schema=False,
    response_headers=SECURITY_HEADERS,
    exception_handlers={LoginRequired: to_login, PermissionDeniedException: refused},
)


def plain_path(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """A NUL in a file name is no file of ours (the file system would refuse it: a 500)."""
    if "\x00" in connection.scope["path"]:
        raise NotFoundException("no such file")


static = create_static_files_router(
    path="/ui/static",
    directories=[HERE / "static"],
    guards=[plain_path],
    opt={"public": True},
    include_in_schema=False,
    name="ui-static",
)
