"""The HTTP server: uvicorn with httptools, and the limits a public server needs on what a
client may send before the application sees it.

uvicorn's httptools protocol keeps every header in memory with no bound (four connections
sending 64 MiB of headers took the API from 88 to 306 MiB) and waits forever for a head
that trickles in. BoundedHttpToolsProtocol refuses, and closes the connection:

- a request line (method and target) over MAX_URL_BYTES: 414;
- more than MAX_HEADERS header fields, or a head (request line and headers) over
  MAX_HEAD_BYTES, counted as the bytes arrive, before they are parsed: 431;
- a head not complete HEAD_TIMEOUT seconds after its connection opened or its previous
  request ended (a slow or idle client): 408.

The body is bounded by the application (`--max-body-bytes`, 413), connections by
LIMIT_CONNECTIONS (uvicorn answers 503 beyond it) and idle keep-alive by uvicorn's
`timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_URL_BYTES = 8 * 1024
MAX_HEAD_BYTES = 32 * 1024
MAX_HEADERS = 100
HEAD_TIMEOUT = float(os.environ.get("TASKLEASE_HEAD_TIMEOUT_SECONDS", "10"))
LIMIT_CONNECTIONS = 1000
KEEP_ALIVE_SECONDS = 5

_REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def _await_head(self, timed: bool = True) -> None:
        """From now on the bytes received are a request head until its headers complete;
        `timed`: it must be complete within HEAD_TIMEOUT."""
        # bytes received while in the head (bounds what the parser buffers), and the bytes
        # and fields parsed (exact, also when a whole head arrives in one read)
        self._in_head, self._received, self._parsed, self._fields = True, 0, 0, 0
        self._head_timer: asyncio.TimerHandle | None = None
        if timed:
            self._head_timer = self.loop.call_later(
                HEAD_TIMEOUT,
                self._refuse,
                408,
                f"request head not received within {HEAD_TIMEOUT:g}s",
            )

    def _head_done(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._received += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            refused = exc.__context__ if isinstance(exc.__context__, _Refused) else None
            if refused is not None:
                return self._refuse(refused.status, str(refused))
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        else:
            # still no end of the head after this much: the parser holds at most one read more
            if self._in_head and self._received > MAX_HEAD_BYTES:
                self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._parsed += len(url)
        if len(self.url) > MAX_URL_BYTES:
            raise _Refused(414, f"request target over {MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        self._parsed += len(name) + len(value) + 4
        if self._fields > MAX_HEADERS:
            raise _Refused(431, f"more than {MAX_HEADERS} header fields")
        if self._parsed > MAX_HEAD_BYTES:
            raise _Refused(431, f"request head over {MAX_HEAD_BYTES} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._await_head(timed=False)  # the clock starts once the response is sent

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_head and self._head_timer is None and not self.transport.is_closing():
            self._await_head()

    def _refuse(self, status: int, message: str) -> None:
        self._head_done()
        if self.transport.is_closing():
            return
        self.logger.warning("refused a request from %s: %s (%d)", self.client, message, status)
        body = message.encode()
        self.transport.write(
            b"".join(
                [
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\n".encode(),
                    b"content-type: text/plain; charset=utf-8\r\n",
                    f"content-length: {len(body)}\r\n".encode(),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()


def config(app: Any, host: str, port: int) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=True,
        http=BoundedHttpToolsProtocol,
        limit_concurrency=LIMIT_CONNECTIONS,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
