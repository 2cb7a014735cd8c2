import asyncio
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasklease.engine import registry
from tasklease.engine.registry import Handler, HandlerError, PermanentError, handler


@pytest.fixture(autouse=True)
def clean_registry() -> Any:
    saved = dict(registry.REGISTRY)
    yield
    registry.REGISTRY.clear()
    registry.REGISTRY.update(saved)


class Order(msgspec.Struct):
    order_id: int
    note: str = ""


def test_decorator_registers_with_options() -> None:
    @handler("charge", lease_seconds=30, max_attempts=3, backoff=[1, 2])
    async def charge(ctx: registry.TaskContext, payload: Order) -> None: ...

    h = registry.REGISTRY["charge"]
    assert (h.fn, h.payload_type, h.lease_seconds, h.max_attempts, h.is_async) == (
        charge,
        Order,
        30,
        3,
        True,
    )
    assert h.lease(120) == 30


def test_sync_handler_and_plain_payload() -> None:
    @handler("plain")
    def plain(ctx: registry.TaskContext, payload: dict[str, Any]) -> None: ...

    h = registry.REGISTRY["plain"]
    assert h.is_async is False and h.payload_type is None and h.lease(120) == 120


def test_one_handler_per_action() -> None:
    @handler("dup")
    async def first(ctx: registry.TaskContext, payload: dict[str, Any]) -> None: ...

    with pytest.raises(HandlerError, match="already handled by"):

        @handler("dup")
        async def second(ctx: registry.TaskContext, payload: dict[str, Any]) -> None: ...


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"backoff": []}, "backoff"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(HandlerError, match=message):
        handler("bad", **kwargs)


def test_handler_must_take_ctx_and_payload() -> None:
    with pytest.raises(HandlerError, match=r"must take \(ctx, payload\)"):

        @handler("arity")
        async def wrong(ctx: registry.TaskContext) -> None: ...


def make(backoff: registry.Backoff = registry.DEFAULT_BACKOFF, jitter: float = 0.0) -> Handler:
    return Handler("x", lambda c, p: None, Order, None, 5, backoff, jitter, False)


def test_default_backoff_is_1_5_15_minutes_then_growing() -> None:
    h = make()
    delays = [h.retry_delay(a) for a in range(1, 7)]
    assert delays[:3] == [60, 300, 900]
    assert delays[3] > 900 and delays[4] > delays[3] and delays[5] <= registry.BACKOFF_CAP


def test_backoff_sequence_repeats_last_and_callable_is_used() -> None:
    assert [make([5, 10]).retry_delay(a) for a in (1, 2, 3, 9)] == [5, 10, 10, 10]
    assert make(lambda attempt: attempt * 7).retry_delay(3) == 21


def test_jitter_stays_within_bounds_and_varies() -> None:
    h = make([100], jitter=0.1)
    delays = {h.retry_delay(1) for _ in range(200)}
    assert all(90 <= d <= 110 for d in delays) and len(delays) > 1


def test_decode_validates_payload() -> None:
    h = make()
    assert h.decode(b'{"order_id": 3}') == Order(3)
    with pytest.raises(PermanentError, match="order_id"):
        h.decode(b'{"order_id": "three"}')
    with pytest.raises(msgspec.ValidationError, match="missing required field `order_id`"):
        h.validate(b'{"note": "no id"}')


def test_context_heartbeat_delegates() -> None:
    calls: list[int] = []

    async def beat() -> bool:
        calls.append(1)
        return False

    ctx = registry.TaskContext(
        1,
        "x",
        2,
        2,
        uuid.uuid4(),
        None,
        "default",
        "w",
        beat,
    )
    assert asyncio.run(ctx.heartbeat()) is False and calls == [1]
    assert ctx.is_last_attempt
    # its logger is made on first use, and says which task a line is about
    assert ctx._logger is None
    assert ctx.logger.process("hello", {}) == ("task 1 x: hello", {})
    assert ctx.logger is ctx.logger


def test_load_imports_builtins_and_named_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.HANDLERS_ENV, "tests.support.handlers")
    loaded = registry.load()
    assert {"email_user", "noop", "test_sleep", "test_fail"} <= set(loaded)
    with pytest.raises(HandlerError, match="cannot import handler module 'no_such_mod'"):
        registry.load(["no_such_mod"])


@given(
    delays=st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=6),
    attempt=st.integers(min_value=1, max_value=50),
    jitter=st.floats(min_value=0, max_value=0.5),
)
def test_retry_delay_is_the_listed_delay_within_jitter(
    delays: list[float], attempt: int, jitter: float
) -> None:
    base = delays[min(attempt, len(delays)) - 1]
    delay = make(delays, jitter).retry_delay(attempt)
    assert base * (1 - jitter) - 1e-6 <= delay <= base * (1 + jitter) + 1e-6


@given(attempt=st.integers(min_value=1, max_value=100))
def test_default_backoff_never_shrinks_and_is_capped(attempt: int) -> None:
    h = make()
    assert h.retry_delay(attempt) <= h.retry_delay(attempt + 1) <= registry.BACKOFF_CAP
