"""The worker's policy: how a handler ended -> which transition is recorded."""

import uuid
from typing import Any

import pytest

from tasklease.engine.outcomes import (
    CANCEL,
    LEASE_LOST,
    RELEASE,
    Bury,
    CancelRunning,
    Complete,
    Drop,
    Fail,
    Release,
    decide,
)
from tasklease.engine.registry import Handler, PermanentError, TaskContext

HANDLER = Handler("x", lambda c, p: None, None, None, 3, [10], 0.0, True)


def ctx(attempt: int = 1) -> TaskContext:
    return TaskContext(1, "x", attempt, 3, uuid.uuid4(), None, "default", "w", lambda: None)  # type: ignore[arg-type,return-value]


def test_result_completes_as_json() -> None:
    assert decide(HANDLER, ctx(), result={"ok": 1}) == Complete('{"ok":1}')
    assert decide(HANDLER, ctx(), result=None) == Complete("null")


def test_unencodable_result_is_buried() -> None:
    d = decide(HANDLER, ctx(), result=object())
    assert isinstance(d, Bury) and d.permanent and "cannot be encoded as JSON" in d.error


def test_error_with_attempts_left_fails_with_backoff() -> None:
    assert decide(HANDLER, ctx(1), error=ValueError("x")) == Fail(10, "ValueError: x")


def test_error_on_last_attempt_buries() -> None:
    d = decide(HANDLER, ctx(3), error=ValueError("x"))
    assert d == Bury("ValueError: x (attempt 3 of 3)", permanent=False)


def test_a_raised_error_keeps_its_traceback_after_the_description() -> None:
    try:
        raise ValueError("x")
    except ValueError as exc:
        d = decide(HANDLER, ctx(1), error=exc)
    assert isinstance(d, Fail)
    first, _, rest = d.error.partition("\n\n")
    assert first == "ValueError: x"
    assert rest.startswith("Traceback (most recent call last):") and 'raise ValueError("x")' in rest


def test_permanent_error_buries_at_once() -> None:
    d = decide(HANDLER, ctx(1), error=PermanentError("no such user"))
    assert d == Bury("PermanentError: no such user", permanent=True)


@pytest.mark.parametrize(
    "stopped, expected",
    [
        (RELEASE, Release()),
        (CANCEL, CancelRunning()),
        (LEASE_LOST, Drop("the lease was lost while the handler ran")),
    ],
)
def test_stopped_handlers(stopped: str, expected: Any) -> None:
    assert decide(HANDLER, ctx(1), error=ValueError("ignored"), stopped=stopped) == expected
