"""A TCP proxy in front of the test database that can be cut like a network partition.

`cut()` stops forwarding in both directions without closing anything: bytes sent either
way are held, and new connections are accepted but not carried to the server, as when a
link goes dark (no RST, no FIN: the client just hears nothing). `heal()` lets the held
bytes through, late, as TCP would after a partition heals.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import parse_qs, urlsplit, urlunsplit


def upstream_of(dsn: str) -> tuple[int, str | tuple[str, int]]:
    """(address family, address) of the server a postgresql:// DSN names."""
    url = urlsplit(dsn)
    host = parse_qs(url.query).get("host", [url.hostname or "localhost"])[0]
    port = url.port or 5432
    if host.startswith("/"):
        return socket.AF_UNIX, f"{host}/.s.PGSQL.{port}"
    return socket.AF_INET, (host, port)


class Proxy:
    def __init__(self, dsn: str) -> None:
        self.family, self.address = upstream_of(dsn)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        url = urlsplit(dsn)
        user = url.username or "postgres"
        auth = user + (f":{url.password}" if url.password else "")
        self.dsn = urlunsplit(("postgresql", f"{auth}@127.0.0.1:{self.port}", url.path, "", ""))
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()
        server = socket.socket(self.family, socket.SOCK_STREAM)
        self._sockets.append(server)
        try:
            server.connect(self.address)
        except OSError:
            client.close()
            return
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                self._open.wait()  # held while the link is cut
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
