"""Handlers: the `@handler` decorator, the registry it fills, and what a handler receives.

PermanentError      raise it to send the task to DEAD at once, without retries
any other exception the attempt failed; retried with backoff until max_attempts
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pkgutil
import random
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import msgspec

DEFAULT_LEASE_SECONDS = 120.0
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BACKOFF: tuple[float, ...] = (60, 300, 900)
BACKOFF_GROWTH = 3.0
BACKOFF_CAP = 6 * 3600.0
DEFAULT_JITTER = 0.1

Backoff = Sequence[float] | Callable[[int], float]


class PermanentError(Exception):
    """The task cannot succeed by retrying (bad input, a refused request): bury it now."""


class HandlerError(Exception):
    """A handler declaration or registry lookup is wrong."""


@dataclass
class TaskContext:
    task_id: int
    action: str
    attempt: int
    max_attempts: int
    lease_token: uuid.UUID
    idempotency_key: str | None
    queue: str
    worker: str
    logger: logging.LoggerAdapter[logging.Logger]
    _heartbeat: Callable[[], Awaitable[bool]] = field(repr=False)
    lease_lost: bool = False
    cancel_requested: bool = False

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    async def heartbeat(self) -> bool:
        """Extend the lease now (the worker also does it on its own every lease/3).

        False means the lease is lost: another worker may run the task, and
        whatever this attempt returns will be dropped.
        """
        return await self._heartbeat()


HandlerFn = Callable[[TaskContext, Any], Any]


@dataclass(frozen=True)
class Handler:
    action: str
    fn: HandlerFn
    payload_type: type | None
    lease_seconds: float | None
    max_attempts: int
    backoff: Backoff
    jitter: float
    is_async: bool

    def lease(self, default: float) -> float:
        return self.lease_seconds if self.lease_seconds is not None else default

    def decode(self, payload_json: str | bytes) -> Any:
        """The payload as the handler's declared type (or a dict). PermanentError when it
        does not fit: retrying cannot fix it."""
        try:
            return self.validate(payload_json)
        except msgspec.ValidationError as exc:
            raise PermanentError(f"payload does not fit {self.action}: {exc}") from exc

    def validate(self, payload_json: str | bytes) -> Any:
        """Decode as the worker will; msgspec.ValidationError names the field that is wrong."""
        if self.payload_type is None:
            return msgspec.json.decode(payload_json)
        return msgspec.json.decode(payload_json, type=self.payload_type)

    def retry_delay(self, attempt: int) -> float:
        """Seconds until the next attempt after `attempt` (1-based) failed."""
        if callable(self.backoff):
            base = float(self.backoff(attempt))
        else:
            delays = list(self.backoff)
            base = float(delays[min(attempt, len(delays)) - 1])
            if self.backoff is DEFAULT_BACKOFF and attempt > len(delays):
                base = min(delays[-1] * BACKOFF_GROWTH ** (attempt - len(delays)), BACKOFF_CAP)
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


REGISTRY: dict[str, Handler] = {}


def handler(
    action: str,
    *,
    lease_seconds: float | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff: Backoff = DEFAULT_BACKOFF,
    jitter: float = DEFAULT_JITTER,
) -> Callable[[HandlerFn], HandlerFn]:
    """Register a function as the handler of `action`.

    The function takes (ctx, payload). Annotate the payload with a msgspec Struct to
    have it validated at submission and decoded for you. `backoff` is a sequence of
    delays in seconds (the last one repeats) or a function from the attempt number
    to seconds. Sync functions run in a thread, off the event loop.
    """
    if max_attempts < 1:
        raise HandlerError(f"{action}: max_attempts must be at least 1")
    if lease_seconds is not None and lease_seconds <= 0:
        raise HandlerError(f"{action}: lease_seconds must be positive")
    if not callable(backoff) and not list(backoff):
        raise HandlerError(f"{action}: backoff needs at least one delay")

    def register(fn: HandlerFn) -> HandlerFn:
        if action in REGISTRY and REGISTRY[action].fn is not fn:
            existing = REGISTRY[action].fn
            raise HandlerError(
                f"action {action!r} is already handled by {existing.__module__}.{existing.__name__}"
            )
        REGISTRY[action] = Handler(
            action=action,
            fn=fn,
            payload_type=_payload_type(fn),
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            backoff=backoff,
            jitter=jitter,
            is_async=inspect.iscoroutinefunction(fn),
        )
        return fn

    return register


def _payload_type(fn: HandlerFn) -> type | None:
    params = list(inspect.signature(fn).parameters)
    if len(params) != 2:
        raise HandlerError(f"{fn.__qualname__} must take (ctx, payload)")
    hint = get_type_hints(fn).get(params[1])
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return hint
    return None


BUILTIN_PACKAGE = "handlers"
HANDLERS_ENV = "TASKLEASE_HANDLERS"


def load(modules: Sequence[str] = ()) -> dict[str, Handler]:
    """Import the built-in handlers, the modules named, and those in TASKLEASE_HANDLERS."""
    names = [
        f"{BUILTIN_PACKAGE}.{m.name}"
        for m in pkgutil.iter_modules(importlib.import_module(BUILTIN_PACKAGE).__path__)
    ]
    names += [m for m in modules if m]
    names += [m.strip() for m in os.environ.get(HANDLERS_ENV, "").split(",") if m.strip()]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise HandlerError(f"cannot import handler module {name!r}: {exc}") from exc
    return REGISTRY
