"""The `tasklease` command: the services (dev, api, worker, migrate), the operator's commands
on the database (limits, pause, resume), the HTTP API's commands (remote.py) and the tools
(bench, chaos, in engine/tools/)."""

from tasklease.engine.cli.main import database_url, main, parser

__all__ = ["database_url", "main", "parser"]
