"""What a client may send before the application sees it (api/server.py), against a real API
process over raw sockets: oversized heads are refused early and a slow head times out."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tests.support.procs import Procs

pytestmark = pytest.mark.slow


def exchange(url: str, head: bytes, *, chunk: int = 65536, read_timeout: float = 10) -> bytes:
    """Send `head` (stopping early if the server closes), then read the whole answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=read_timeout) as s:
        try:
            for i in range(0, len(head), chunk):
                s.sendall(head[i : i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while we were still sending: the answer is waiting
        answer = b""
        try:
            while data := s.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
        return answer


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


@pytest.fixture
def api(procs: Procs) -> tuple[str, int]:
    proc, url = procs.api(env={"TASKLEASE_HEAD_TIMEOUT_SECONDS": "1"})
    return url, proc.pid


def request(*headers: bytes, target: bytes = b"/healthz") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(headers) + b"\r\n"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (request(b"X-Big: " + b"a" * 8000 + b"\r\n"), 200),  # big but within the limits
        (request(*(b"X-%d: v\r\n" % i for i in range(90))), 200),
        (request(b"X-Big: " + b"a" * 40_000 + b"\r\n"), 431),
        (request(b"X-Big: " + b"a" * 8 * 1024 * 1024 + b"\r\n"), 431),
        (request(*(b"X-%d: v\r\n" % i for i in range(101))), 431),
        (request(*(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))), 431),
        (request(target=b"/healthz?" + b"q" * 9000), 414),
    ],
)
def test_oversized_heads_are_refused(api: tuple[str, int], head: bytes, expected: int) -> None:
    url, _ = api
    answer = exchange(url, head)
    assert status(answer) == expected, answer[:300]
    # the server is still fine for everyone else
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_a_slow_head_times_out(api: tuple[str, int]) -> None:
    url, _ = api
    started = time.monotonic()
    answer = exchange(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
    assert status(answer) == 408, answer
    assert time.monotonic() - started < 8
    idle = exchange(url, b"")  # a connection that sends nothing is closed too
    assert status(idle) == 408, idle


def test_huge_heads_on_several_connections_do_not_grow_the_server(api: tuple[str, int]) -> None:
    url, pid = api
    before = psutil.Process(pid).memory_info().rss
    for _ in range(4):
        assert status(exchange(url, request(b"X-Big: " + b"a" * 64 * 1024 * 1024))) == 431
    grown = psutil.Process(pid).memory_info().rss - before
    assert grown < 32 * 1024 * 1024, f"the API grew by {grown / 2**20:.0f} MiB"
