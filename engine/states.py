"""The task state machine, declared once.

Every other layer derives from this module: the database enum is checked
against `TaskState`, each guarded SQL statement in `queries.sql` is tested
against `TRANSITIONS` (tests/integration/test_transition_matrix.py), and
docs/state-machine.md is generated from it (`tasklease diagram`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from transitions import Machine


class TaskState(StrEnum):
    PENDING = "PENDING"
    """Waiting for due_at (new, released, snoozed or requeued). Left by claim (a worker) or
    cancel (an operator)."""
    RUNNING = "RUNNING"
    """Leased by one worker. Left by complete / fail / bury / release / snooze / cancel
    under the lease token, or by reclaim / expire once the lease has run out."""
    COMPLETED = "COMPLETED"
    """Final: the handler returned. Nothing leaves it."""
    FAILED = "FAILED"
    """This attempt failed; the next one is due at due_at. Left by claim or cancel."""
    DEAD = "DEAD"
    """Attempts exhausted or a permanent error: the dead letter. Left by requeue."""
    CANCELLED = "CANCELLED"
    """Final: cancelled by an operator, or abandoned because a dependency failed. Nothing
    leaves it."""
    WAITING = "WAITING"
    """Submitted with dependencies that have not finished (docs/workflows.md); no claim sees
    it. Left by ready (its last dependency settled, in the same transaction), abandon (a
    dependency failed under on_failure=cancel) or cancel (an operator)."""


S = TaskState
FINAL_STATES = frozenset({S.COMPLETED, S.CANCELLED})
SUBMIT = "submit"
# submit lands in PENDING, or in WAITING when the task has unfinished dependencies
SUBMIT_STATES = (S.PENDING, S.WAITING)


@dataclass(frozen=True)
class Transition:
    trigger: str
    sources: tuple[TaskState, ...]
    dest: TaskState
    guard: str


TRANSITIONS: tuple[Transition, ...] = (
    Transition(
        "claim", (S.PENDING, S.FAILED), S.RUNNING, "due_at <= db now; attempt += 1; new lease token"
    ),
    Transition(
        "reclaim",
        (S.RUNNING,),
        S.RUNNING,
        "lease expired; attempt < max_attempts; attempt += 1; new lease token",
    ),
    Transition("expire", (S.RUNNING,), S.DEAD, "lease expired; attempt >= max_attempts"),
    Transition("complete", (S.RUNNING,), S.COMPLETED, "lease token matches"),
    Transition(
        "fail",
        (S.RUNNING,),
        S.FAILED,
        "lease token matches; attempt < max_attempts; due_at = now + backoff",
    ),
    Transition(
        "bury", (S.RUNNING,), S.DEAD, "lease token matches; attempts exhausted or permanent error"
    ),
    Transition("cancel", (S.PENDING, S.FAILED, S.WAITING), S.CANCELLED, "none"),
    Transition(
        "cancel_running",
        (S.RUNNING,),
        S.CANCELLED,
        "lease token matches; cancellation was requested",
    ),
    Transition(
        "release", (S.RUNNING,), S.PENDING, "lease token matches; the attempt is given back"
    ),
    Transition("requeue", (S.DEAD,), S.PENDING, "attempt reset to 0; due now"),
    Transition(
        "snooze",
        (S.RUNNING,),
        S.PENDING,
        "lease token matches; due_at = now + the delay asked for; the attempt is given back",
    ),
    Transition(
        "ready",
        (S.WAITING,),
        S.PENDING,
        "its last unsettled dependency completed (or failed under on_failure=run); fired in "
        "the transaction of that dependency's transition; due_at = max(due_at, now)",
    ),
    Transition(
        "abandon",
        (S.WAITING,),
        S.CANCELLED,
        "a dependency ended DEAD (on_failure=cancel) or CANCELLED (cancel or hold); fired in "
        "the transaction of that dependency's transition, and cascades",
    ),
)

TRIGGERS: tuple[str, ...] = (SUBMIT, *(t.trigger for t in TRANSITIONS))
BY_TRIGGER: dict[str, Transition] = {t.trigger: t for t in TRANSITIONS}


def build_machine(initial: TaskState = S.PENDING) -> Machine:
    """A `transitions` machine over the declaration; used as the model in tests."""
    return Machine(
        states=[s.value for s in TaskState],
        transitions=[
            {"trigger": t.trigger, "source": [s.value for s in t.sources], "dest": t.dest.value}
            for t in TRANSITIONS
        ],
        initial=initial.value,
        auto_transitions=False,
        ignore_invalid_triggers=False,
    )


MACHINE = build_machine()


def can_fire(trigger: str, state: TaskState) -> bool:
    return trigger in MACHINE.get_triggers(state.value)


def is_path(steps: list[tuple[str, TaskState | None, TaskState]]) -> bool:
    """True when (trigger, from, to) steps form a walk of the machine from submit."""
    expected: TaskState | None = None
    for i, (trigger, src, dst) in enumerate(steps):
        if i == 0:
            if trigger != SUBMIT or src is not None or dst not in SUBMIT_STATES:
                return False
        else:
            t = BY_TRIGGER.get(trigger)
            if t is None or src != expected or src not in t.sources or dst != t.dest:
                return False
        expected = dst
    return bool(steps)


def mermaid() -> str:
    """The machine as a Mermaid state diagram, generated from TRANSITIONS."""
    lines = ["stateDiagram-v2", *(f"    [*] --> {s}: {SUBMIT}" for s in SUBMIT_STATES)]
    for t in TRANSITIONS:
        lines += [f"    {src} --> {t.dest}: {t.trigger}" for src in t.sources]
    lines += [f"    {s} --> [*]" for s in sorted(FINAL_STATES)]
    return "\n".join(lines) + "\n"
