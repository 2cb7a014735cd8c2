"""The code docs/library.md shows is the code examples/library.py runs (tested end to end in
tests/e2e/test_library_example.py), so the page cannot go stale."""

import inspect
from pathlib import Path

import pytest

from examples import library

DOC = (Path(__file__).resolve().parents[2] / "docs" / "library.md").read_text()


@pytest.mark.parametrize("name", ["send_receipt", "place_order", "place_order_sync"])
def test_the_page_quotes_the_example(name: str) -> None:
    source = inspect.getsource(getattr(library, name))
    assert source in DOC, f"docs/library.md does not show examples/library.py's {name} as is"


def test_readme_imports_from_tasklease() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "from engine" not in readme and "from tasklease import" in readme


@pytest.mark.parametrize(
    "name",
    [
        "Order",
        "charge_card",
        "email_receipt",
        "make_invoice",
        "archive_order",
        "order_report",
        "place_order",
    ],
)
def test_the_workflows_page_quotes_the_example(name: str) -> None:
    from examples import workflows

    doc = (Path(__file__).resolve().parents[2] / "docs" / "workflows.md").read_text()
    source = inspect.getsource(getattr(workflows, name))
    assert source in doc, f"docs/workflows.md does not show examples/workflows.py's {name} as is"
