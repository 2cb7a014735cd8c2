import re

from tasklease.engine.queries import CLAIM, CLAIM_LIMITED, QUERIES, load
from tasklease.engine.states import TRANSITIONS


def test_every_query_is_named_and_described() -> None:
    assert QUERIES
    for q in QUERIES.values():
        assert q.doc, f"{q.name} needs a one-line description"
        assert q.sql and not q.sql.rstrip().endswith(";")


def test_every_transition_statement_names_its_guard() -> None:
    transitions = [n for n in QUERIES if n.startswith("task_") and "_if_" in n]
    assert {
        "task_complete_many_if_leased",
        "task_fail_many_if_leased",
        "task_bury_many_if_leased",
        "task_release_if_leased",
        "task_cancel_if_waiting",
        "task_cancel_if_leased",
        "task_requeue_if_dead",
        "task_heartbeat_if_leased",
    } <= set(transitions)


def test_every_trigger_is_written_by_some_statement() -> None:
    sql = " ".join(q.sql for q in QUERIES.values())
    for t in TRANSITIONS:
        assert f"'{t.trigger}'" in sql, f"no statement records {t.trigger}"


def test_loader_splits_on_names() -> None:
    qs = load("-- name: a\n-- first\nSELECT 1;\n\n-- name: b\n-- second\n-- more\nSELECT 2;\n")
    assert {n: (q.doc, q.sql) for n, q in qs.items()} == {
        "a": ("first", "SELECT 1"),
        "b": ("second more", "SELECT 2"),
    }


def test_the_claim_has_a_form_without_limits_and_one_with() -> None:
    params = re.compile(r"\$(\d+)")
    assert {int(n) for n in params.findall(CLAIM)} == set(range(1, 7))
    assert {int(n) for n in params.findall(CLAIM_LIMITED)} == set(range(1, 12))
    assert "tasklease_claim_slots" not in CLAIM and "action_starts" not in CLAIM
    assert "tasklease_claim_slots" in CLAIM_LIMITED
    for sql in (CLAIM, CLAIM_LIMITED):
        assert "-- limits" not in sql and "-- no limits" not in sql
