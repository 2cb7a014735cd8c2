"""The worker's policy: how a handler ended -> which transition is recorded."""

import asyncio
import uuid
from typing import Any

import pytest

from engine.registry import Handler, PermanentError, TaskContext
from engine.worker import Bury, CancelRunning, Complete, Drop, Fail, Release, decide

HANDLER = Handler("x", lambda c, p: None, None, None, 3, [10], 0.0, True)


def ctx(attempt: int = 1, **flags: bool) -> TaskContext:
    c = TaskContext(
        1,
        "x",
        attempt,
        3,
        uuid.uuid4(),
        None,
        "default",
        "w",
        None,  # type: ignore[arg-type]
        lambda: None,
    )  # type: ignore[arg-type,return-value]
    for k, v in flags.items():
        setattr(c, k, v)
    return c


def ended(result: Any = None, exc: BaseException | None = None, cancel: bool = False) -> Any:
    async def body() -> Any:
        if exc:
            raise exc
        return result

    async def run() -> asyncio.Task[Any]:
        task = asyncio.ensure_future(asyncio.sleep(10) if cancel else body())
        if cancel:
            await asyncio.sleep(0)
            task.cancel()
        await asyncio.wait([task])
        return task

    return asyncio.run(run())


def test_result_completes_as_json() -> None:
    assert decide(HANDLER, ctx(), ended({"ok": 1}), False) == Complete('{"ok":1}')


def test_unencodable_result_is_buried() -> None:
    d = decide(HANDLER, ctx(), ended(object()), False)
    assert isinstance(d, Bury) and d.permanent and "not JSON" in d.error


def test_error_with_attempts_left_fails_with_backoff() -> None:
    assert decide(HANDLER, ctx(1), ended(exc=ValueError("x")), False) == Fail(10, "ValueError: x")


def test_error_on_last_attempt_buries() -> None:
    d = decide(HANDLER, ctx(3), ended(exc=ValueError("x")), False)
    assert d == Bury("ValueError: x (attempt 3 of 3)", permanent=False)


def test_permanent_error_buries_at_once() -> None:
    d = decide(HANDLER, ctx(1), ended(exc=PermanentError("no such user")), False)
    assert d == Bury("PermanentError: no such user", permanent=True)


@pytest.mark.parametrize(
    "releasing, flags, expected",
    [
        (True, {}, Release()),
        (False, {"cancel_requested": True}, CancelRunning()),
        (False, {"lease_lost": True}, Drop("the lease was lost while the handler ran")),
    ],
)
def test_stopped_handlers(releasing: bool, flags: dict[str, bool], expected: object) -> None:
    assert decide(HANDLER, ctx(1, **flags), ended(cancel=True), releasing) == expected
