"""The layers of docs/architecture.md: schema <- engine <- api; handlers see the public API;
the CLI (engine/cli/) and the tools (engine/tools/) sit on top of the engine, which never
imports them.

Everything is imported through the one top-level package, `tasklease`: the old top-level
names (`engine`, `api`, `schema`, `handlers`) exist only as folders of the repository.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = {"schema", "engine", "api", "handlers"}
ALLOWED = {
    "schema": {"schema"},
    "engine": {"schema", "engine"},
    "api": {"engine", "api"},
    "handlers": {"public"},
    "examples": {"public"},  # handler modules from the docs, written as a user would
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = {alias.name for alias in node.names}
            if node.module == "tasklease" and names <= LAYERS:  # `from tasklease import schema`
                found |= {f"tasklease.{name}" for name in names}
            else:
                found.add(node.module)
    return found


def layer_of(module: str) -> str | None:
    """The layer a module belongs to: `public` for the `tasklease` package itself."""
    parts = module.split(".")
    if parts[0] != "tasklease":
        return None
    if len(parts) == 1 or parts[1] not in LAYERS:
        return "public"
    return parts[1]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    for path in (REPO / layer).rglob("*.py"):
        for module in imports(path):
            assert module.split(".")[0] not in LAYERS | {"examples"} or (
                layer == "examples" and (module.startswith("examples"))
            ), f"{path.relative_to(REPO)} imports {module}: import it from tasklease"
            found = layer_of(module)
            # the CLI and the tools are where everything is put together: they serve the API
            composition_root = path.parent.name in ("cli", "tools") and found == "api"
            if found is not None and not composition_root:
                assert found in ALLOWED[layer], f"{path.relative_to(REPO)} imports {module}"


def test_the_runtime_engine_does_not_import_the_cli_or_the_tools() -> None:
    for path in (REPO / "engine").glob("*.py"):
        for module in imports(path):
            assert not module.startswith(("tasklease.engine.cli", "tasklease.engine.tools")), (
                f"{path.relative_to(REPO)} imports {module}"
            )


def test_the_handler_api_imports_without_the_database_driver() -> None:
    """A module of handlers (and a test of one) needs neither asyncpg nor SQLAlchemy; the
    client's names are still there, loaded when first used."""
    code = (
        "import sys\n"
        "from tasklease import handler, TaskContext, PermanentError, Snooze, schedule, LeaseLost\n"
        "heavy = sorted(m for m in ('asyncpg', 'sqlalchemy', 'litestar') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from tasklease import Client\n"
        "assert 'asyncpg' in sys.modules and Client.__name__ == 'Client'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_tests_import_the_package_not_the_folders() -> None:
    for path in (REPO / "tests").rglob("*.py"):
        for module in imports(path):
            assert module.split(".")[0] not in LAYERS, f"{path.relative_to(REPO)}: {module}"


def test_the_package_maps_each_folder() -> None:
    for layer in LAYERS:
        assert (REPO / "tasklease" / layer).resolve() == REPO / layer
