"""The Litestar application: thin routes over engine.store and engine.operations."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Litestar, Request, Response, delete, get, post, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    SerializationException,
    ValidationException,
)
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, Example, SecurityScheme
from litestar.params import Body, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED
from litestar.types import Empty, Message, Scope

from tasklease.api import metrics, ui
from tasklease.api.schemas import (
    EdgeRead,
    ErrorBody,
    Health,
    LimitRead,
    LimitWrite,
    QueueState,
    QueueStats,
    Ready,
    ScheduleRead,
    Stats,
    TaskBatchCreate,
    TaskBatchRead,
    TaskCreate,
    TaskPage,
    TaskRead,
    TransitionRead,
    WorkerStats,
    WorkflowRead,
)
from tasklease.api.stats import ReadModel
from tasklease.engine import database, jsontext, operations, tasks, workflows
from tasklease.engine.registry import Handler
from tasklease.engine.reporting import Counters, Reporter
from tasklease.engine.states import TaskState
from tasklease.engine.store import (
    TRANSIENT_ERRORS,
    DependencyRefused,
    InvalidLimit,
    KeyTaken,
    Limit,
    NewTask,
    Store,
)

log = logging.getLogger("tasklease.api")
MAX_ID = 2**63 - 1  # bigint
TaskId = Annotated[int, Parameter(ge=1, le=MAX_ID, description="the task's id")]
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# A JSON body nesting deeper is refused before it is decoded (msgspec's decoder recurses and
# ran out of stack near 1,000 levels: a 500). A payload may nest MAX_PAYLOAD_DEPTH (64).
MAX_BODY_DEPTH = 100
QUICK_START = {"due_at": "2026-01-20T12:00:00Z", "payload": {"action": "email_user", "user_id": 42}}

_ERRORS = {
    400: (
        "Malformed JSON, or a missing, unknown or wrong-typed field (named in `detail`)",
        "invalid request: `due_at`: Invalid RFC3339 encoded datetime",
    ),
    401: (
        "TASKLEASE_API_TOKEN is set and the bearer token is missing or wrong",
        "missing or wrong bearer token",
    ),
    404: ("No such task (or limit)", "no task 7"),
    409: (
        "The task's state does not allow this",
        "task 7 is COMPLETED: only DEAD tasks can be requeued",
    ),
    403: (
        "A browser's cross-site request (Sec-Fetch-Site or Origin not this API's)",
        "cross-site request refused",
    ),
    413: ("The body is larger than the limit (1 MiB by default)", "Request Entity Too Large"),
    415: (
        "A body that is not `Content-Type: application/json`",
        "Content-Type must be application/json, not text/plain",
    ),
    422: (
        "Unknown action, or a payload that does not fit the action's schema",
        "unknown action 'send_fax'; known actions: email_user, noop",
    ),
    503: (
        "The database is unreachable or its schema is not current; retry after `Retry-After`",
        "database unavailable, retry shortly",
    ),
}


def errors(*codes: int) -> dict[int, ResponseSpec]:
    return {
        code: ResponseSpec(
            ErrorBody,
            description=_ERRORS[code][0],
            generate_examples=False,
            examples=[Example(value={"status_code": code, "detail": _ERRORS[code][1]})],
        )
        for code in codes
    }


# 409 on a submission: its own description and example (errors() has the state conflict's)
KEY_CONFLICT = ResponseSpec(
    ErrorBody,
    description="The idempotency key is already used by a task with other content (action, "
    "payload, queue, priority, max_attempts, lease_seconds or timeout_seconds; due_at is not "
    "compared): `extra.task_id` is that task, `extra.index` the batch's task. Nothing written",
    generate_examples=False,
    examples=[
        Example(
            value={
                "status_code": 409,
                "detail": "idempotency_key 'k1' is already used by task 17 with a different "
                "payload",
                "extra": {"idempotency_key": "k1", "task_id": 17, "fields": ["payload"]},
            }
        )
    ],
)


class UnprocessableTask(HTTPException):
    status_code = 422


class Conflict(HTTPException):
    status_code = 409


def _store(state: State) -> Store:
    store: Store = state.store
    return store


async def checked_body(request: Request[Any, Any, Any]) -> bytes:
    """The JSON body, checked before any decoder sees it: UTF-8 (RFC 8259), nested at most
    MAX_BODY_DEPTH levels."""
    body = await request.body()
    problem = jsontext.not_utf8(body)
    if problem is None and jsontext.nested_deeper_than(body, MAX_BODY_DEPTH):
        problem = f"arrays and objects nest more than {MAX_BODY_DEPTH} levels"
    if problem is not None:
        raise ClientException(f"malformed JSON body: {problem}")
    return body


class JsonRequest(Request[Any, Any, Any]):
    """Litestar decodes a route's `data` through json(): checked first (checked_body). A
    route with `opt={"strict": Type}` gets its body decoded once, strictly, straight into
    Type: Litestar's own decoding coerces ("3" -> 3, 0 -> 1970-01-01), which would accept a
    wrong-typed field instead of naming it; its signature model then passes the Struct on."""

    async def json(self) -> Any:
        body = await checked_body(self)
        kind = self.route_handler.opt.get("strict")
        if kind is None or self._json is not Empty:
            return await super().json()
        try:
            self._json = msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as exc:
            # malformed JSON is reported as such first, whatever a field's type
            await super().json()
            raise ValidationException(f"invalid request: {exc}".replace("$.", "")) from None
        except msgspec.DecodeError:
            return await super().json()  # raises Litestar's own malformed-JSON error
        return self._json


def prepare(data: TaskCreate, handlers: dict[str, Handler], index: int | None = None) -> NewTask:
    """engine.tasks.prepare, its InvalidTask as a 422 that names what is wrong (a
    MalformedTask, which no action could accept, as a 400)."""
    try:
        return tasks.prepare(data, handlers, index)
    except tasks.InvalidTask as exc:
        extra: dict[str, Any] = {}
        if exc.known_actions is not None:
            extra["known_actions"] = exc.known_actions
        if exc.field is not None:
            extra["field"] = exc.field
        if isinstance(exc, tasks.MalformedTask):
            raise ClientException(str(exc), extra=extra) from None
        raise UnprocessableTask(str(exc), extra=extra or None) from None


def key_conflict(taken: KeyTaken, *, batch: bool) -> Conflict:
    """409 naming the key, the task that holds it (or the batch's earlier task giving it), and
    in a batch the task's index."""
    exc = tasks.IdempotencyConflict.of(taken.conflicts[0], batch=batch)
    extra: dict[str, Any] = {
        "idempotency_key": exc.key,
        "task_id": exc.task_id,
        "fields": list(exc.fields),
    }
    if batch:
        extra["index"] = exc.index
    if exc.earlier is not None:
        extra["earlier"] = exc.earlier
    return Conflict(str(exc), extra=extra)


@post(
    "/tasks",
    operation_id="submitTask",
    status_code=HTTP_201_CREATED,
    opt={"strict": TaskCreate},
    responses={
        200: ResponseSpec(
            TaskRead,
            generate_examples=False,
            description="The task that already holds this idempotency key, with the same content",
        ),
        409: KEY_CONFLICT,
        **errors(400, 401, 403, 413, 415, 422, 503),
    },
)
async def submit_task(
    data: Annotated[TaskCreate, Body(examples=[Example(summary="quick start", value=QUICK_START)])],
    state: State,
) -> Response[TaskRead]:
    """Submit a task. 201 with the new task; 200 with the existing one for a repeated
    idempotency key with the same content; 409 when that task's content differs."""
    new = prepare(data, state.handlers)
    if workflows.is_graph([data]):
        graph = _planned([data], None, None, batch=False)
        submitted = (await _submit_graph(state, [new], graph))[0]
        state.counters.count("submit")
        task = TaskRead.from_row(submitted.task)
        log.info(
            "task %d %s submitted: -> %s (submit), waiting for %d of %d dependencies",
            task.id,
            task.action,
            task.state,
            task.waiting_for,
            task.dependencies,
        )
        return Response(task, status_code=HTTP_201_CREATED)
    try:
        submitted = (await _store(state).submit_many([new]))[0]
    except KeyTaken as taken:
        raise key_conflict(taken, batch=False) from None
    task = TaskRead.from_row(submitted.task)
    if submitted.created:
        state.counters.count("submit")
        log.info(
            "task %d %s submitted: -> PENDING (submit), due %s",
            task.id,
            task.action,
            task.due_at.isoformat(),
        )
    return Response(task, status_code=HTTP_201_CREATED if submitted.created else HTTP_200_OK)


@post(
    "/tasks/batch",
    operation_id="submitTasks",
    status_code=HTTP_201_CREATED,
    opt={"strict": TaskBatchCreate},
    responses={409: KEY_CONFLICT, **errors(400, 401, 403, 413, 415, 422, 503)},
)
async def submit_tasks(data: TaskBatchCreate, state: State) -> TaskBatchRead:
    """Submit many tasks in one transaction: all are written, or none (the first bad one is
    named). Repeated idempotency keys with the same content return the existing tasks; with
    other content, 409 naming the first such task (nothing is written)."""
    new = [prepare(t, state.handlers, i) for i, t in enumerate(data.tasks)]
    if workflows.is_graph(data.tasks, data.on_finish):
        return await _submit_workflow(state, data, new)
    try:
        submitted = await _store(state).submit_many(new)
    except KeyTaken as taken:
        raise key_conflict(taken, batch=True) from None
    created = sum(s.created for s in submitted)
    state.counters.count("submit", created)
    log.info("batch of %d submitted: %d new -> PENDING (submit)", len(new), created)
    return TaskBatchRead([TaskRead.from_row(s.task) for s in submitted])


def _planned(
    specs: list[TaskCreate],
    on_failure: tasks.OnFailure | None,
    on_finish: TaskCreate | None,
    *,
    batch: bool,
) -> workflows.Plan:
    try:
        return workflows.plan(specs, on_failure=on_failure, on_finish=on_finish, batch=batch)
    except tasks.InvalidTask as exc:
        raise UnprocessableTask(
            str(exc), extra={"field": exc.field} if exc.field else None
        ) from None


async def _submit_graph(state: State, new: list[NewTask], graph: workflows.Plan) -> list[Any]:
    try:
        return await _store(state).submit_graph(
            new, graph.edges, workflow=graph.workflow, on_finish=graph.on_finish
        )
    except DependencyRefused as exc:
        raise UnprocessableTask(str(exc), extra={"field": "depends_on"}) from None


async def _submit_workflow(
    state: State, batch: TaskBatchCreate, new: list[NewTask]
) -> TaskBatchRead:
    """A batch that is a graph (docs/workflows.md): checked (refs, cycles), then written with
    its edges in one statement."""
    graph = _planned(batch.tasks, batch.on_failure, batch.on_finish, batch=True)
    if batch.on_finish is not None:
        new = [*new, prepare(batch.on_finish, state.handlers, len(new))]
    submitted = await _submit_graph(state, new, graph)
    rows = [TaskRead.from_row(s.task) for s in submitted]
    state.counters.count("submit", len(rows))
    log.info("workflow of %d tasks submitted (%d edges)", len(rows), len(graph.edges))
    finish = rows.pop() if batch.on_finish is not None else None
    return TaskBatchRead(rows, workflow_id=rows[0].workflow_id if rows else None, on_finish=finish)


@get("/tasks", operation_id="listTasks", responses=errors(400, 401, 503))
async def list_tasks(
    state: State,
    task_state: Annotated[TaskState | None, Parameter(query="state")] = None,
    action: Annotated[str | None, Parameter(max_length=200)] = None,
    queue: Annotated[str | None, Parameter(max_length=200)] = None,
    limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
    cursor: Annotated[
        str | None,
        Parameter(pattern=r"^[0-9]{1,19}$", description="next_cursor of the previous page"),
    ] = None,
) -> TaskPage:
    """A page of tasks, newest first, filtered by state, action and queue."""
    before = int(cursor) if cursor is not None else None
    if before is not None and before > MAX_ID:  # 19 digits, beyond bigint
        raise ValidationException(f"invalid request: `cursor`: {cursor} is not a task id")
    rows = await _store(state).list_tasks(
        limit=limit + 1, before=before, state=task_state, action=action, queue=queue
    )
    page = rows[:limit]
    more = len(rows) > limit
    return TaskPage([TaskRead.from_row(r) for r in page], str(page[-1]["id"]) if more else None)


@get("/tasks/{task_id:int}", operation_id="getTask", responses=errors(400, 401, 404, 503))
async def get_task(task_id: TaskId, state: State) -> TaskRead:
    """One task."""
    row = await _store(state).get(task_id)
    if row is None:
        raise NotFoundException(f"no task {task_id}")
    return TaskRead.from_row(row)


@get(
    "/tasks/{task_id:int}/transitions",
    operation_id="getTaskTransitions",
    responses=errors(400, 401, 404, 503),
)
async def get_task_transitions(task_id: TaskId, state: State) -> list[TransitionRead]:
    """A task's history, oldest first."""
    store = _store(state)
    rows = await store.history(task_id)
    if not rows and await store.get(task_id) is None:
        raise NotFoundException(f"no task {task_id}")
    return [TransitionRead(**dict(r)) for r in rows]


@get(
    "/workflows/{workflow_id:int}",
    operation_id="getWorkflow",
    responses=errors(400, 401, 404, 503),
)
async def get_workflow(
    workflow_id: Annotated[int, Parameter(ge=1, le=MAX_ID, description="the workflow's id")],
    state: State,
) -> WorkflowRead:
    """A workflow (a batch that declared a graph): every member with its state, the edges,
    counts by state, and whether all have finished."""
    read = await workflow_of(_store(state), workflow_id)
    if read is None:
        raise NotFoundException(f"no workflow {workflow_id}")
    return read


async def workflow_of(store: Store, workflow_id: int) -> WorkflowRead | None:
    row = await store.workflow(workflow_id)
    if row is None:
        return None
    members = [TaskRead.from_row(r) for r in await store.workflow_tasks(workflow_id)]
    edges = [EdgeRead(**dict(r)) for r in await store.edges([t.id for t in members])]
    counts: dict[str, int] = {}
    for t in members:
        counts[t.state.value] = counts.get(t.state.value, 0) + 1
    return WorkflowRead(
        id=row["id"],
        created_at=row["created_at"],
        on_finish=row["on_finish"],
        finished=all(t.finished for t in members),
        states=counts,
        tasks=members,
        edges=edges,
    )


def answered(
    task_id: int, outcome: operations.Outcome, row: Any, allowed: str
) -> tuple[operations.Outcome, Any]:
    """404 for no such task, 409 (naming its state) when the operation does not apply."""
    if outcome is operations.Outcome.NOT_FOUND or row is None:
        raise NotFoundException(f"no task {task_id}")
    if outcome is operations.Outcome.CONFLICT:
        raise Conflict(
            f"task {task_id} is {row['state']}: only {allowed}", extra={"state": row["state"]}
        )
    return outcome, row


@post(
    "/tasks/{task_id:int}/cancel",
    operation_id="cancelTask",
    status_code=HTTP_200_OK,
    responses=errors(400, 401, 403, 404, 409, 503),
)
async def cancel_task(task_id: TaskId, state: State) -> TaskRead:
    """Cancel a task: PENDING or FAILED at once; RUNNING by asking its worker, which stops the
    handler and records RUNNING -> CANCELLED (see `cancel_requested_at`). 409 otherwise."""
    outcome, row = answered(
        task_id,
        *await operations.cancel(_store(state), task_id),
        allowed="PENDING, FAILED, WAITING or RUNNING tasks can be cancelled",
    )
    state.counters.count("cancel" if outcome is operations.Outcome.DONE else "cancel_request")
    log.info(
        "task %d: %s",
        task_id,
        "PENDING/FAILED -> CANCELLED (cancel)"
        if outcome is operations.Outcome.DONE
        else "cancellation requested",
    )
    return TaskRead.from_row(row)


@post(
    "/tasks/{task_id:int}/requeue",
    operation_id="requeueTask",
    status_code=HTTP_200_OK,
    responses=errors(400, 401, 403, 404, 409, 503),
)
async def requeue_task(task_id: TaskId, state: State) -> TaskRead:
    """Requeue a DEAD task: back to PENDING, due now, attempts reset. 409 unless DEAD."""
    _, row = answered(
        task_id,
        *await operations.requeue(_store(state), task_id),
        allowed="DEAD tasks can be requeued",
    )
    state.counters.count("requeue")
    log.info("task %d: DEAD -> PENDING (requeue)", task_id)
    return TaskRead.from_row(row)


@get("/stats", operation_id="getStats", responses=errors(401, 503))
async def get_stats(state: State) -> Stats:
    """Tasks by state and by queue, due tasks waiting and the age of the oldest, paused
    queues, workers. Read at most every few seconds (TASKLEASE_STATS_SECONDS, default 5)
    however many ask; this API's own writes are seen at once."""
    figures = await state.stats.figures()
    queues = {
        name: QueueStats(q.states, q.due, q.oldest_due_seconds, q.paused_at)
        for name, q in figures.queues.items()
    }
    workers = figures.live_workers
    return Stats(
        figures.states,
        queues,
        figures.oldest_due_seconds,
        WorkerStats(len(workers), sum(p["running"] for p in workers)),
    )


async def figures_changed(message: Message, scope: Scope) -> None:
    """Anything but a read, answered: the next figures are read afresh (api/stats.py)."""
    if message["type"] == "http.response.start" and scope.get("method") not in ("GET", "HEAD"):
        stats = getattr(scope["app"].state, "stats", None)
        if stats is not None:
            stats.changed()


@get("/schedules", operation_id="listSchedules", responses=errors(401, 503))
async def list_schedules(state: State) -> list[ScheduleRead]:
    """Periodic tasks as the workers declare them, with the next run time of each."""
    return [ScheduleRead.from_row(r) for r in await _store(state).schedules()]


QueueName = Annotated[str, Parameter(min_length=1, max_length=200)]


@post(
    "/queues/{queue:str}/pause",
    operation_id="pauseQueue",
    status_code=HTTP_200_OK,
    responses=errors(400, 401, 403, 503),
)
async def pause_queue(queue: QueueName, state: State) -> QueueState:
    """Pause a queue: from their next claim, workers start nothing in it (no claim, no
    takeover) until it is resumed; submissions are still accepted, running tasks finish.
    Kept in the database: a worker started meanwhile does not claim from it either."""
    paused_at = await _store(state).pause_queue(queue)
    log.info("queue %s paused", queue)
    return QueueState(queue=queue, paused=True, paused_at=paused_at)


@post(
    "/queues/{queue:str}/resume",
    operation_id="resumeQueue",
    status_code=HTTP_200_OK,
    responses=errors(400, 401, 403, 503),
)
async def resume_queue(queue: QueueName, state: State) -> QueueState:
    """Resume a paused queue (a queue that is not paused stays as it is); its workers are
    woken at once."""
    if await _store(state).resume_queue(queue):
        log.info("queue %s resumed", queue)
    return QueueState(queue=queue, paused=False, paused_at=None)


@get("/limits", operation_id="listLimits", responses=errors(401, 503))
async def list_limits(state: State) -> list[LimitRead]:
    """The global limits, the same for every worker, with what holds their tokens now."""
    return [LimitRead.from_row(r) for r in await _store(state).limits()]


@put(
    "/limits/{key:str}",
    operation_id="setLimit",
    status_code=HTTP_200_OK,
    responses=errors(400, 401, 403, 415, 503),
    opt={"strict": LimitWrite},
)
async def set_limit(key: str, data: LimitWrite, state: State) -> LimitRead:
    """Give a global limit a value (`queue:NAME`, `action:NAME`: running at once;
    `rate:NAME`: starts per `per_seconds`; `key:NAME`: running at once per value of the
    payload field `by`). Workers' declarations leave it alone until it is deleted. Lowering
    it stops new starts beyond it; running tasks are not stopped."""
    store = _store(state)
    try:
        limit = Limit(key, data.value, data.per_seconds, data.by)
        await store.set_limit(limit, declared=False)
    except InvalidLimit as exc:
        raise ClientException(str(exc)) from None
    log.info(
        "limit %s set to %d%s",
        key,
        data.value,
        f" per {data.per_seconds:g}s" if data.per_seconds else "",
    )
    return next(LimitRead.from_row(r) for r in await store.limits() if r["key"] == key)


@delete(
    "/limits/{key:str}",
    operation_id="deleteLimit",
    status_code=HTTP_200_OK,
    responses=errors(400, 401, 403, 404, 503),
)
async def delete_limit(key: str, state: State) -> dict[str, str]:
    """Remove a global limit. A worker whose code declares it writes it again when it starts."""
    if not await _store(state).unset_limits([key], declared_only=False):
        raise NotFoundException(f"no limit {key}")
    log.info("limit %s removed", key)
    return {"removed": key}


@get("/healthz", operation_id="health", opt={"public": True})
async def healthz() -> Health:
    """The process is up (it does not touch the database). Never needs a token."""
    return Health("ok")


@get(
    "/readyz",
    operation_id="ready",
    responses={
        503: ResponseSpec(
            Ready,
            description="The database is unreachable or its schema is not current",
            generate_examples=False,
        )
    },
)
async def readyz(state: State) -> Response[Ready]:
    """Ready to serve: the database answers and its schema is current (else 503)."""
    problem = await database.readiness(_store(state).pool)
    if problem is not None:
        return Response(
            Ready("unavailable", detail=problem), status_code=503, headers={"Retry-After": "2"}
        )
    return Response(Ready("ready", schema=database.schema_head()))


@get(
    "/metrics", operation_id="metrics", media_type=metrics.CONTENT_TYPE, responses=errors(401, 503)
)
async def get_metrics(state: State) -> Response[bytes]:
    """Prometheus text format: the whole cluster's figures, from the database."""
    return Response(metrics.render(await state.stats.figures()), media_type=metrics.CONTENT_TYPE)


# --- errors and auth ---------------------------------------------------------------------


def bad_request(request: Request[Any, Any, Any], exc: ClientException) -> Response[Any]:
    """Say which field is wrong, or that the JSON itself is broken, in `detail`."""
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        problems = []
        for item in exc.extra:
            message, key = str(item.get("message", "")), item.get("key")
            if message == "'data'":
                message = "the body is empty: send a JSON object"
            problems.append(message if key in (None, "data") else f"`{key}`: {message}")
        detail = "invalid request: " + "; ".join(problems)
    elif isinstance(exc.__cause__, SerializationException):
        detail = f"malformed JSON body: {exc.detail}"
    else:
        detail = exc.detail
    body = {"status_code": exc.status_code, "detail": detail, "extra": exc.extra or {}}
    return Response(body, status_code=exc.status_code, headers=exc.headers)


def refused_value(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """A value the database cannot hold (a NUL in a query parameter, say) is the client's."""
    detail = f"invalid value: {getattr(exc, 'message', None) or exc}"
    return Response({"status_code": 400, "detail": detail, "extra": {}}, status_code=400)


def database_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.warning("database unavailable: %s", exc)
    return Response(
        {"status_code": 503, "detail": "database unavailable, retry shortly", "extra": {}},
        status_code=503,
        headers={"Retry-After": "2"},
    )


def require_token(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """With TASKLEASE_API_TOKEN set, every route but /healthz needs `Bearer <token>`. The
    dashboard's pages (/ui) check their session cookie themselves (api/ui.py)."""
    token: str | None = connection.app.state.api_token
    if not token or handler.opt.get("public") or handler.opt.get("ui"):
        return
    scheme, _, given = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise NotAuthorizedException(
            "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


def task_id_digits(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """A task id in the path is ASCII digits (ui.plain_task_id; the dashboard's own guards
    check it after its login)."""
    if not handler.opt.get("ui"):
        ui.plain_task_id(connection, handler)


async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The application's guards, in order, as one coroutine: Litestar runs a sync guard in a
    worker thread (a hand-over and back per guard per request, about a tenth of the API's CPU
    for a one-task POST /tasks), and copies the route handler for each guard."""
    refuse_cross_site(connection, handler)
    require_token(connection, handler)
    task_id_digits(connection, handler)


class UnsupportedMediaType(HTTPException):
    status_code = 415


def refuse_cross_site(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """No web page the operator visits may submit, cancel or requeue: a POST must not come
    cross-site from a browser (api/ui.py's same_origin), and a body must be JSON, which a
    plain HTML form or a `text/plain` fetch cannot send without asking CORS first."""
    if connection.scope.get("method") != "POST" or handler.opt.get("ui"):
        return
    if not ui.same_origin(connection):
        raise PermissionDeniedException("cross-site request refused")
    has_body = connection.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in connection.headers
    )
    media, _, parameters = connection.headers.get("content-type", "").partition(";")
    media = media.strip().lower()
    if has_body and media != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {media or 'missing'}"
        )
    charset = ui.charset(parameters)
    if has_body and charset not in (None, "utf-8", "utf8"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json in UTF-8 (RFC 8259), not charset={charset}"
        )


def create_app(
    dsn: str,
    handlers: dict[str, Handler],
    *,
    api_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    pool_size: int = 10,
) -> Litestar:
    counters = Counters()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        store = await Store.connect(dsn, min_size=0, max_size=pool_size)
        reporter = Reporter(store, counters, kind="api")
        app.state.store = store
        app.state.stats = ReadModel(store)
        reporter.start()
        try:
            yield
        finally:
            await reporter.stop()
            await store.close()

    security: list[dict[str, list[str]]] | None = [{"bearer": []}] if api_token else None
    return Litestar(
        route_handlers=[
            submit_task,
            submit_tasks,
            list_tasks,
            get_task,
            get_task_transitions,
            get_workflow,
            cancel_task,
            requeue_task,
            get_stats,
            list_schedules,
            list_limits,
            set_limit,
            pause_queue,
            resume_queue,
            delete_limit,
            healthz,
            readyz,
            get_metrics,
            ui.router,
            ui.static,
        ],
        lifespan=[lifespan],
        before_send=[figures_changed],
        state=State({"handlers": handlers, "counters": counters, "api_token": api_token}),
        guards=[guard],
        exception_handlers={
            ClientException: bad_request,
            asyncpg.DataError: refused_value,
            **{exc: database_unavailable for exc in TRANSIENT_ERRORS},
        },
        template_config=ui.TEMPLATES,
        request_class=JsonRequest,
        request_max_body_size=max_body_bytes,
        logging_config=None,
        openapi_config=OpenAPIConfig(
            title="tasklease",
            version="0.1.0",
            path="/schema",
            description="A durable task scheduler on PostgreSQL.",
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
            ),
            security=security,
        ),
    )
