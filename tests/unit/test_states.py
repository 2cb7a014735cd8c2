"""The declaration in engine/states.py is the one source of truth; these keep it so."""

from pathlib import Path

import pytest

from tasklease.engine import states
from tasklease.engine.states import BY_TRIGGER, MACHINE, TRANSITIONS, TaskState

DOC = Path(__file__).resolve().parents[2] / "docs" / "state-machine.md"


def test_states_are_the_designed_six_and_waiting() -> None:
    assert [s.value for s in TaskState] == [
        "PENDING",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "DEAD",
        "CANCELLED",
        # added by the workflows issue (docs/state-machine.md, docs/workflows.md)
        "WAITING",
    ]


def test_declaration_matches_design_table() -> None:
    S = TaskState
    table = {(t.trigger, tuple(t.sources), t.dest) for t in TRANSITIONS}
    assert table == {
        ("claim", (S.PENDING, S.FAILED), S.RUNNING),
        ("reclaim", (S.RUNNING,), S.RUNNING),
        ("expire", (S.RUNNING,), S.DEAD),
        ("complete", (S.RUNNING,), S.COMPLETED),
        ("fail", (S.RUNNING,), S.FAILED),
        ("bury", (S.RUNNING,), S.DEAD),
        ("cancel", (S.PENDING, S.FAILED, S.WAITING), S.CANCELLED),
        ("cancel_running", (S.RUNNING,), S.CANCELLED),
        ("release", (S.RUNNING,), S.PENDING),
        ("requeue", (S.DEAD,), S.PENDING),
        # added by the scheduling issue (docs/state-machine.md says so beside DESIGN's table)
        ("snooze", (S.RUNNING,), S.PENDING),
        # added by the workflows issue (docs/workflows.md)
        ("ready", (S.WAITING,), S.PENDING),
        ("abandon", (S.WAITING,), S.CANCELLED),
    }


@pytest.mark.parametrize("trigger", [t.trigger for t in TRANSITIONS])
@pytest.mark.parametrize("state", list(TaskState))
def test_transitions_machine_agrees(trigger: str, state: TaskState) -> None:
    """The `transitions` machine built from the declaration fires exactly where it says."""
    machine = states.build_machine(state)
    allowed = state in BY_TRIGGER[trigger].sources
    assert states.can_fire(trigger, state) is allowed
    if allowed:
        getattr(machine, trigger)()
        assert machine.state == BY_TRIGGER[trigger].dest.value
    else:
        with pytest.raises(Exception, match="Can't trigger"):
            getattr(machine, trigger)()


def test_final_states_have_no_way_out() -> None:
    for s in states.FINAL_STATES:
        assert MACHINE.get_triggers(s.value) == []


def test_is_path() -> None:
    S = TaskState
    good = [
        ("submit", None, S.PENDING),
        ("claim", S.PENDING, S.RUNNING),
        ("fail", S.RUNNING, S.FAILED),
        ("claim", S.FAILED, S.RUNNING),
        ("complete", S.RUNNING, S.COMPLETED),
    ]
    assert states.is_path(good)
    assert not states.is_path(good[1:])  # must start with submit
    assert not states.is_path([*good, ("requeue", S.COMPLETED, S.PENDING)])
    assert not states.is_path([good[0], ("complete", S.PENDING, S.COMPLETED)])
    assert not states.is_path([good[0], ("claim", S.FAILED, S.RUNNING)])  # from != last to
    assert not states.is_path([])
    waited = [("submit", None, S.WAITING), ("ready", S.WAITING, S.PENDING), *good[1:]]
    assert states.is_path(waited)
    assert states.is_path([waited[0], ("abandon", S.WAITING, S.CANCELLED)])
    assert not states.is_path([waited[0], ("claim", S.WAITING, S.RUNNING)])  # never claimed


def test_diagram_in_docs_is_current() -> None:
    """Regenerate with `tasklease diagram` and paste it into docs/state-machine.md."""
    text = DOC.read_text()
    assert f"```mermaid\n{states.mermaid()}```" in text, (
        "docs/state-machine.md is out of date: paste the output of `tasklease diagram`"
    )
