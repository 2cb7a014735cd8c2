"""What the `tasklease` command's modules share: the one-line error, the database it uses,
and positive numbers as arguments."""

from __future__ import annotations

import argparse

from tasklease.engine import database
from tasklease.engine.embedded import EmbeddedError


class Fatal(Exception):
    """An error told to the user in one line; exit status 1."""


def positive(kind: type[int] | type[float]):  # type: ignore[no-untyped-def]
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
        return number

    return parse


def database_url(*, start: bool = True) -> str:
    """The DSN, starting or joining the embedded server when DATABASE_URL is not set."""
    dsn, server = database.resolve()
    if server is not None and start:
        try:
            server.ensure_running()
        except EmbeddedError as exc:
            raise Fatal(str(exc)) from None
    return dsn
