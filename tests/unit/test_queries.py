import re
from pathlib import Path

from tasklease.engine.queries import CLAIM, CLAIM_LIMITED, QUERIES, load
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


def test_both_claims_take_the_same_six_parameters_and_read_limits_in_one_place() -> None:
    for claim in (CLAIM, CLAIM_LIMITED):
        assert {int(n) for n in re.findall(r"\$(\d+)", claim)} == set(range(1, 7))
    # the claim without limits reads the limits table once (to say 'limited'), and writes
    # no token
    assert CLAIM.count("FROM limits") == 1 and "limit_tokens" not in CLAIM
    assert "limit_key_tokens" not in CLAIM and "limit_key_tokens" in CLAIM_LIMITED


def test_both_claims_record_and_return_what_they_started_alike() -> None:
    """The two claims are written out in full (docs/architecture.md): their history rows and
    the rows they return for each start, takeover and expiry stay the same text, so that a
    change to one cannot miss the other."""

    def tail(claim: str) -> str:
        start = claim.index("), logged AS (")
        return claim[start : claim.index("UNION ALL\n--", start)]

    assert "'reclaim'" in tail(CLAIM) and "FROM dead" in tail(CLAIM)
    assert tail(CLAIM) == tail(CLAIM_LIMITED)


def test_only_the_claim_with_limits_reads_their_tokens() -> None:
    """The claim a queue runs while no limit applies touches no token table, nor the
    per-key limits' parts."""
    for part in ("limit_key_tokens", "tasks_running_keyed", "full_keys", "kwants", "limit_tokens"):
        assert part in CLAIM_LIMITED and part not in CLAIM, part
    # a task it expires holds no token: it starts nothing (takes over nothing) where a limit
    # applies to its queue or its actions, whose tokens are the only ones a task there holds
    assert "LIMIT (SELECT CASE WHEN paused OR limited THEN 0 ELSE $3 END FROM stop)" in CLAIM


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
        # (task_claim_due expires only where no limit applies: see the test above)
        writers = [
            q for q in QUERIES.values() if f"'{trigger}'" in q.sql and q.name != "task_claim_due"
        ]
        assert writers, trigger
        for q in writers:
            assert "UPDATE limit_tokens k SET task_id = NULL" in q.sql, (trigger, q.name)
            # and the token of its value under a per-key limit
            assert "UPDATE limit_key_tokens k SET task_id = NULL" in q.sql, (trigger, q.name)
