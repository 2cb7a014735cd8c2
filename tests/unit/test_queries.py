import re
from pathlib import Path

from tasklease.engine.queries import CLAIM, CLAIM_KEYED, QUERIES, load, variant
from tasklease.engine.states import SUBMIT, TRANSITIONS, TaskState


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


# Written by the database itself: the trigger tasks_settle_dependants (migration 0012), in
# the transaction of the dependency's transition, whichever statement made it.
BY_THE_SETTLING_TRIGGER = {"ready", "abandon"}


def test_every_trigger_is_written_by_some_statement() -> None:
    sql = " ".join(q.sql for q in QUERIES.values())
    schema = (Path(__file__).resolve().parents[2] / "schema" / "schema.sql").read_text()
    settling = schema[schema.index("FUNCTION public.tasklease_settle_dependants") :]
    for t in TRANSITIONS:
        where = settling if t.trigger in BY_THE_SETTLING_TRIGGER else sql
        assert f"'{t.trigger}'" in where, f"no statement records {t.trigger}"


def test_every_trigger_a_statement_records_is_declared() -> None:
    """The trigger list is states.py's: no statement writes a trigger it does not declare (the
    check constraint on task_transitions.trigger is held to it by test_schema.py)."""
    declared = {t.trigger for t in TRANSITIONS} | {SUBMIT}
    written = set()
    for q in QUERIES.values():
        for insert in q.sql.split("INSERT INTO task_transitions")[1:]:
            written |= set(re.findall(r"SELECT\s+\w+,\s*'(\w+)'", insert))
    assert "claim" in written and "submit" in written
    assert written <= declared, written - declared


def test_loader_splits_on_names() -> None:
    qs = load("-- name: a\n-- first\nSELECT 1;\n\n-- name: b\n-- second\n-- more\nSELECT 2;\n")
    assert {n: (q.doc, q.sql) for n, q in qs.items()} == {
        "a": ("first", "SELECT 1"),
        "b": ("second more", "SELECT 2"),
    }


def test_the_claim_is_one_statement_with_its_six_parameters() -> None:
    for claim in (CLAIM, CLAIM_KEYED):
        assert {int(n) for n in re.findall(r"\$(\d+)", claim)} == set(range(1, 7))
        assert "--+" not in claim


def test_a_statement_in_two_variants() -> None:
    sql = "a\n--+ keyed {\nb\nc\n--+ }\nd  --+ plain\ne  --+ keyed\nf"
    assert variant(sql, "plain") == "a\nd\nf"
    assert variant(sql, "keyed") == "a\nb\nc\ne\nf"
    qs = load(f"-- name: q\n-- doc\n{sql};\n")
    assert (qs["q"].sql, qs["q_keyed"].sql) == ("a\nd\nf", "a\nb\nc\ne\nf")


def test_only_the_claim_with_per_key_limits_reads_them() -> None:
    """The claim a queue without per-key limits runs touches none of their tables."""
    for table in ("limit_key_tokens", "tasks_running_keyed", "full_keys", "kwants"):
        assert table in CLAIM_KEYED
    assert "kwants" not in CLAIM and "full_keys" not in CLAIM
    # but it frees the token of a task that expires on its last attempt
    assert "UPDATE limit_key_tokens k SET task_id = NULL" in CLAIM


def test_every_statement_that_ends_a_running_task_gives_its_tokens_back() -> None:
    """Its concurrency tokens (and per-key token) are held while a task is RUNNING: whatever
    moves it out of RUNNING frees them in the same statement (docs/scheduling.md)."""
    leaving = {
        t.trigger
        for t in TRANSITIONS
        if TaskState.RUNNING in t.sources and t.dest is not TaskState.RUNNING
    }
    assert leaving == {"complete", "fail", "bury", "release", "snooze", "cancel_running", "expire"}
    for trigger in leaving:
        writers = [q for q in QUERIES.values() if f"'{trigger}'" in q.sql]
        assert writers, trigger
        for q in writers:
            assert "UPDATE limit_tokens k SET task_id = NULL" in q.sql, (trigger, q.name)
            # and the token of its value under a per-key limit
            assert "UPDATE limit_key_tokens k SET task_id = NULL" in q.sql, (trigger, q.name)
