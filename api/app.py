"""The Litestar application: thin routes over engine.store."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotFoundException,
    SerializationException,
    ValidationException,
)
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from api.schemas import Health, TaskCreate, TaskRead, TransitionRead
from engine.registry import Handler
from engine.store import TRANSIENT_ERRORS, Store

log = logging.getLogger("tasklease.api")
MAX_BODY_BYTES = 1024 * 1024


class UnprocessableTask(HTTPException):
    status_code = 422


def payload_field(message: str) -> str:
    """`payload.user_id` from msgspec's "… - at `$.user_id`" / "missing required field `x`"."""
    at = re.search(r"at `\$(.*?)`", message)
    missing = re.search(r"(?:missing required|unknown) field `(.*?)`", message)
    return "payload" + (at.group(1) if at else "") + (f".{missing.group(1)}" if missing else "")


def _store(state: State) -> Store:
    store: Store = state.store
    return store


@post("/tasks", operation_id="submitTask", status_code=HTTP_201_CREATED)
async def submit_task(data: TaskCreate, state: State) -> Response[TaskRead]:
    """Submit a task; a repeated idempotency key returns the existing task with 200."""
    handlers: dict[str, Handler] = state.handlers
    action = data.action if data.action is not None else data.payload.get("action")
    if not isinstance(action, str) or not action:
        raise UnprocessableTask(
            "no action: give `action`, or `payload.action`",
            extra={"known_actions": sorted(handlers)},
        )
    handler = handlers.get(action)
    if handler is None:
        raise UnprocessableTask(
            f"unknown action {action!r}; known actions: {', '.join(sorted(handlers))}",
            extra={"known_actions": sorted(handlers)},
        )
    payload_json = msgspec.json.encode(data.payload)
    try:
        handler.validate(payload_json)
    except msgspec.ValidationError as exc:
        raise UnprocessableTask(
            f"payload does not fit action {action!r}: {exc}",
            extra={"field": payload_field(str(exc))},
        ) from None
    submitted = await _store(state).submit(
        action,
        payload_json.decode(),
        queue=data.queue,
        priority=data.priority,
        max_attempts=data.max_attempts or handler.max_attempts,
        due_at=data.due_at,
        idempotency_key=data.idempotency_key,
    )
    task = TaskRead.from_row(submitted.task)
    if submitted.created:
        log.info(
            "task %d %s submitted: -> PENDING (submit), due %s",
            task.id,
            action,
            task.due_at.isoformat(),
        )
    return Response(task, status_code=HTTP_201_CREATED if submitted.created else HTTP_200_OK)


@get("/tasks/{task_id:int}", operation_id="getTask")
async def get_task(task_id: int, state: State) -> TaskRead:
    """One task."""
    row = await _store(state).get(task_id)
    if row is None:
        raise NotFoundException(f"no task {task_id}")
    return TaskRead.from_row(row)


@get("/tasks/{task_id:int}/transitions", operation_id="getTaskTransitions")
async def get_task_transitions(task_id: int, state: State) -> list[TransitionRead]:
    """A task's history, oldest first."""
    store = _store(state)
    rows = await store.history(task_id)
    if not rows and await store.get(task_id) is None:
        raise NotFoundException(f"no task {task_id}")
    return [TransitionRead(**dict(r)) for r in rows]


@get("/healthz", operation_id="health")
async def healthz() -> Health:
    """The process is up (it does not touch the database)."""
    return Health("ok")


def bad_request(request: Request[Any, Any, Any], exc: ClientException) -> Response[Any]:
    """Say which field is wrong, or that the JSON itself is broken, in `detail`."""
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        problems = []
        for item in exc.extra:
            message, key = str(item.get("message", "")), item.get("key")
            if message == "'data'":
                message = "the body is empty: send a JSON object with a `payload`"
            problems.append(message if key in (None, "data") else f"`{key}`: {message}")
        detail = "invalid request: " + "; ".join(problems)
    elif isinstance(exc.__cause__, SerializationException):
        detail = f"malformed JSON body: {exc.detail}"
    else:
        detail = exc.detail
    body = {"status_code": exc.status_code, "detail": detail, "extra": exc.extra or {}}
    return Response(body, status_code=exc.status_code, headers=exc.headers)


def database_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.warning("database unavailable: %s", exc)
    return Response(
        {"status_code": 503, "detail": "database unavailable, retry shortly", "extra": {}},
        status_code=503,
        headers={"Retry-After": "2"},
    )


def create_app(dsn: str, handlers: dict[str, Handler], *, pool_size: int = 10) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.store = await Store.connect(dsn, min_size=0, max_size=pool_size)
        app.state.handlers = handlers
        try:
            yield
        finally:
            await app.state.store.close()

    return Litestar(
        route_handlers=[submit_task, get_task, get_task_transitions, healthz],
        lifespan=[lifespan],
        exception_handlers={
            ClientException: bad_request,
            **{exc: database_unavailable for exc in TRANSIENT_ERRORS},
        },
        request_max_body_size=MAX_BODY_BYTES,
        logging_config=None,
        openapi_config=OpenAPIConfig(title="tasklease", version="0.1.0", path="/schema"),
    )
