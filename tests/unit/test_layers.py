"""The layers of docs/architecture.md: schema <- engine <- api; handlers see the public API."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = {"schema", "engine", "api", "handlers", "examples"}
ALLOWED = {
    "schema": {"schema"},
    "engine": {"schema", "engine"},
    "api": {"engine", "api"},
    "handlers": {"engine"},
    "examples": {"engine"},  # handler modules from the docs, written as a user would
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    for path in (REPO / layer).rglob("*.py"):
        for module in imports(path):
            top = module.split(".")[0]
            # the CLI is where everything is put together: it serves the API
            composition_root = path == REPO / "engine" / "cli.py" and top == "api"
            if top in OURS and not composition_root:
                assert top in ALLOWED[layer], f"{path.relative_to(REPO)} imports {module}"
            if layer in ("handlers", "examples") and top == "engine":
                assert module == "engine", f"{path.relative_to(REPO)}: use `from engine import …`"
