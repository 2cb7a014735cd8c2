"""Model-based test: hypothesis drives the real engine on a real database.

The model of each task is the `transitions` machine from engine/states.py plus the
few facts its guards read (attempt, token, lease expiry, due time, cancel request).
Each rule fires one real statement through engine.store (or a transactional completion
through engine.fencing, with a write of its own), with right or stale tokens,
and checks the database moved exactly as the model says. After every step the
invariants hold: stored state equals the model's, every history is a path of the
machine, no task is completed twice, attempt never exceeds max_attempts, and a
transactional write is kept exactly when its completion is.

Workflows (docs/workflows.md): tasks are also submitted waiting for others (existing tasks,
or a diamond in one batch) under each failure policy. The model settles dependants when a
dependency ends COMPLETED, DEAD or CANCELLED, as the database does; no dependant is claimed
before its dependencies are settled, and none is stranded WAITING (every WAITING task has a
dependency that may still finish).

Examples and steps are bounded for CI. TASKLEASE_HYPOTHESIS=long runs many more.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tasklease.engine.fencing import Fence, LeaseLost
from tasklease.engine.states import BY_TRIGGER, TaskState, build_machine, is_path
from tasklease.engine.store import DependencyRefused, Edge, NewTask, Store
from tests.support.db import connect_db

S = TaskState
WORKERS = ("w1", "w2", "w3")
LEASE = {"noop": 60.0}
PROFILES = {
    "ci": settings(
        max_examples=15,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    ),
    "long": settings(
        max_examples=400,
        stateful_step_count=60,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    ),
    # for checking that a broken guard is caught: no minimal example, just the failure
    "noshrink": settings(
        max_examples=15,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    ),
}


@dataclass
class Model:
    """What the database should hold for one task."""

    max_attempts: int
    machine: Any = field(default_factory=lambda: build_machine(S.PENDING))
    attempt: int = 0
    token: uuid.UUID | None = None  # the latest lease's token
    stale: list[uuid.UUID] = field(default_factory=list)  # earlier leases' tokens
    due: bool = True
    lease_expired: bool = False
    cancel_requested: bool = False
    completions: int = 0
    effects: int = 0  # rows a transactional completion committed with the task
    deps: dict[int, str] = field(default_factory=dict)  # dependency id -> on_failure
    satisfied: set[int] = field(default_factory=set)  # edges that hold it back no more
    waiting_for: int = 0

    @property
    def state(self) -> TaskState:
        return TaskState(self.machine.state)

    def fire(self, trigger: str) -> None:
        getattr(self.machine, trigger)()  # raises if the machine forbids it
        assert self.state == BY_TRIGGER[trigger].dest

    def holds(self, token: uuid.UUID | None) -> bool:
        return self.state is S.RUNNING and token is not None and token == self.token


class EngineModel(RuleBasedStateMachine):
    dsn: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store = self.run(Store.connect(self.dsn, min_size=1, max_size=2))
        self.conn: asyncpg.Connection = self.run(connect_db(self.dsn))
        self.run(
            self.conn.execute(
                "TRUNCATE tasks, task_transitions, effects, task_dependencies, workflows "
                "RESTART IDENTITY CASCADE"
            )
        )
        self.fence = Fence(self.store, max_size=1)
        self.tasks: dict[int, Model] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.drain()
        finally:
            self.run(self.fence.close())
            self.run(self.store.close())
            self.run(self.conn.close())
            self.loop.close()

    # --- helpers ---------------------------------------------------------------------------

    def pick(self, index: int, *states: TaskState) -> int | None:
        ids = [i for i, m in sorted(self.tasks.items()) if not states or m.state in states]
        return ids[index % len(ids)] if ids else None

    def token_for(self, task_id: int, kind: str) -> uuid.UUID:
        m = self.tasks[task_id]
        if kind == "current" and m.token is not None:
            return m.token
        if kind == "stale" and m.stale:
            return m.stale[-1]
        return uuid.uuid4()

    def row(self, task_id: int) -> asyncpg.Record:
        return self.run(self.conn.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id))

    def expect(self, task_id: int, moved: bool, trigger: str, allowed: bool) -> None:
        """The statement moved the task exactly when the model allowed it."""
        assert moved == allowed, f"task {task_id}: {trigger} moved={moved}, model says {allowed}"
        if allowed:
            self.tasks[task_id].fire(trigger)
            self.settle(task_id)

    def settle(self, task_id: int) -> None:
        """As the complete statement and the trigger do, once task_id has moved: when it ended
        COMPLETED, DEAD or CANCELLED, its edges are settled (its 'run' edges, or all when
        COMPLETED); when it failed, what waits on it through 'cancel' edges (or 'hold' ones,
        once cancelled) is abandoned, and so on down the graph; then the 'run' edges of each
        task abandoned are settled as well."""
        state = self.tasks[task_id].state
        if state not in (S.COMPLETED, S.DEAD, S.CANCELLED):
            return
        self.settle_edges(task_id)
        if state is S.COMPLETED:
            return
        doomed: list[int] = []
        frontier = [(task_id, state)]
        while frontier:
            source, source_state = frontier.pop()
            for dependant, m in sorted(self.tasks.items()):
                policy = m.deps.get(source)
                if policy is None or source in m.satisfied or m.state is not S.WAITING:
                    continue
                if policy == "cancel" or (policy == "hold" and source_state is S.CANCELLED):
                    m.fire("abandon")
                    m.waiting_for = 0
                    doomed.append(dependant)
                    frontier.append((dependant, S.CANCELLED))
        for dependant in sorted(doomed):
            self.settle_edges(dependant)

    def settle_edges(self, task_id: int) -> None:
        """task_id's edges that its state settles: all when COMPLETED, else the 'run' ones."""
        state = self.tasks[task_id].state
        for m in (m for _, m in sorted(self.tasks.items())):
            policy = m.deps.get(task_id)
            if policy is None or task_id in m.satisfied:
                continue
            if state is S.COMPLETED or policy == "run":
                m.satisfied.add(task_id)
                if m.state is S.WAITING:
                    m.waiting_for -= 1
                    if m.waiting_for == 0:
                        m.fire("ready")
                        m.due = True

    # --- rules -----------------------------------------------------------------------------

    @rule(max_attempts=st.integers(1, 3), later=st.booleans())
    def submit(self, max_attempts: int, later: bool) -> None:
        due_at = None
        if later:
            due_at = self.run(self.conn.fetchval("SELECT now() + interval '1 hour'"))
        [s] = self.run(
            self.store.submit_many(
                [NewTask("noop", "{}", max_attempts=max_attempts, due_at=due_at)]
            )
        )
        self.tasks[s.task["id"]] = Model(max_attempts, due=not later)

    @precondition(lambda self: bool(self.tasks))
    @rule(
        picks=st.lists(st.integers(0, 50), min_size=1, max_size=2, unique=True),
        policy=st.sampled_from(["cancel", "run", "hold"]),
    )
    def submit_dependant(self, picks: list[int], policy: str) -> None:
        """A task waiting for existing tasks, whatever state they are in."""
        deps = sorted({self.pick(i) for i in picks} - {None})  # type: ignore[type-var]
        edges = [Edge(0, None, d, policy) for d in deps]
        refused = any(
            (self.tasks[d].state is S.CANCELLED and policy != "run")
            or (self.tasks[d].state is S.DEAD and policy == "cancel")
            for d in deps
        )
        try:
            [s] = self.run(
                self.store.submit_graph(
                    [NewTask("noop", "{}", max_attempts=2)], edges, workflow=False
                )
            )
        except DependencyRefused:
            assert refused, f"a dependant of {deps} ({policy}) was refused"
            return
        assert not refused, f"a dependant of {deps} ({policy}) was accepted"
        m = Model(2, deps=dict.fromkeys(deps, policy))
        for d in deps:
            dep = self.tasks[d]
            if dep.state is S.COMPLETED or (dep.state in (S.DEAD, S.CANCELLED) and policy == "run"):
                m.satisfied.add(d)
        m.waiting_for = len(deps) - len(m.satisfied)
        if m.waiting_for:
            m.machine = build_machine(S.WAITING)
        self.tasks[s.task["id"]] = m

    @rule(policy=st.sampled_from(["cancel", "run", "hold"]))
    def submit_diamond(self, policy: str) -> None:
        """a -> [b, c] -> d in one batch (a workflow)."""
        edges = [
            Edge(1, 0, None, policy),
            Edge(2, 0, None, policy),
            Edge(3, 1, None, policy),
            Edge(3, 2, None, policy),
        ]
        rows = self.run(
            self.store.submit_graph(
                [NewTask("noop", "{}", max_attempts=2) for _ in range(4)], edges, workflow=True
            )
        )
        ids = [r.task["id"] for r in rows]
        self.tasks[ids[0]] = Model(2)
        for place, on in ((1, [0]), (2, [0]), (3, [1, 2])):
            m = Model(2, deps={ids[o]: policy for o in on}, waiting_for=len(on))
            m.machine = build_machine(S.WAITING)
            self.tasks[ids[place]] = m

    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, 3))
    def claim(self, worker: str, limit: int) -> None:
        expired = [i for i, m in self.tasks.items() if m.state is S.RUNNING and m.lease_expired]
        due = [i for i, m in self.tasks.items() if m.state in (S.PENDING, S.FAILED) and m.due]
        c = self.run(self.store.claim("default", LEASE, limit, worker))
        leased, dead = c.leased, c.expired
        # nothing is skipped without concurrency: exactly what fits in the limit is taken
        assert len(leased) + len(dead) == min(limit, len(expired) + len(due))
        for task_id in dead:
            m = self.tasks[task_id]
            assert task_id in expired and m.attempt >= m.max_attempts
            m.fire("expire")
            m.lease_expired = False
            self.settle(task_id)
        for t in leased:
            m = self.tasks[t.id]
            if t.trigger == "reclaim":
                assert t.id in expired and m.attempt < m.max_attempts
            else:
                assert t.id in due
                # no dependant runs before its dependencies are settled
                assert m.waiting_for == 0 and m.satisfied == set(m.deps), (t.id, m.deps)
            m.fire(t.trigger)
            m.attempt += 1
            assert t.attempt == m.attempt
            if m.token is not None:
                m.stale.append(m.token)
            m.token, m.lease_expired = t.lease_token, False

    @rule(index=st.integers(0, 50), kind=st.sampled_from(["current", "stale", "random"]))
    def complete(self, index: int, kind: str) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        token = self.token_for(task_id, kind)
        allowed = self.tasks[task_id].holds(token)
        self.expect(
            task_id, self.run(self.store.complete(task_id, token, "1")), "complete", allowed
        )
        if allowed:
            self.tasks[task_id].completions += 1

    @rule(index=st.integers(0, 50), kind=st.sampled_from(["current", "stale", "random"]))
    def complete_in_transaction(self, index: int, kind: str) -> None:
        """A handler's write and the completion in one transaction (engine.fencing): both
        commit under the current lease, neither under any other token."""
        task_id = self.pick(index)
        if task_id is None:
            return
        token = self.token_for(task_id, kind)
        allowed = self.tasks[task_id].holds(token)

        async def attempt() -> bool:
            try:
                async with self.fence.transaction(task_id, token, lambda: "1") as tx:
                    await tx.execute("INSERT INTO effects VALUES ($1, 0, 'model')", task_id)
            except LeaseLost:
                return False
            return True

        self.expect(task_id, self.run(attempt()), "complete", allowed)
        if allowed:
            self.tasks[task_id].completions += 1
            self.tasks[task_id].effects += 1

    @rule(index=st.integers(0, 50), kind=st.sampled_from(["current", "stale"]), later=st.booleans())
    def fail(self, index: int, kind: str, later: bool) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        m, token = self.tasks[task_id], self.token_for(task_id, kind)
        allowed = m.holds(token) and m.attempt < m.max_attempts
        moved = self.run(self.store.fail(task_id, token, 3600 if later else 0, "boom"))
        self.expect(task_id, moved, "fail", allowed)
        if allowed:
            m.due = not later

    @rule(
        index=st.integers(0, 50),
        kind=st.sampled_from(["current", "stale"]),
        permanent=st.booleans(),
    )
    def bury(self, index: int, kind: str, permanent: bool) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        m, token = self.tasks[task_id], self.token_for(task_id, kind)
        allowed = m.holds(token) and (permanent or m.attempt >= m.max_attempts)
        self.expect(
            task_id, self.run(self.store.bury(task_id, token, "fatal", permanent)), "bury", allowed
        )

    @rule(index=st.integers(0, 50), kind=st.sampled_from(["current", "stale"]))
    def release(self, index: int, kind: str) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        m, token = self.tasks[task_id], self.token_for(task_id, kind)
        allowed = m.holds(token)
        self.expect(task_id, self.run(self.store.release(task_id, token)), "release", allowed)
        if allowed:
            m.attempt -= 1
            m.cancel_requested = False if m.state is not S.RUNNING else m.cancel_requested

    @rule(index=st.integers(0, 50), kind=st.sampled_from(["current", "stale"]), later=st.booleans())
    def snooze(self, index: int, kind: str, later: bool) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        m, token = self.tasks[task_id], self.token_for(task_id, kind)
        allowed = m.holds(token)
        moved = self.run(self.store.snooze(task_id, token, 3600 if later else 0, "not yet"))
        self.expect(task_id, moved, "snooze", allowed)
        if allowed:
            m.attempt -= 1
            m.due = not later
            m.cancel_requested = False

    @rule(index=st.integers(0, 50), kind=st.sampled_from(["current", "stale"]))
    def heartbeat(self, index: int, kind: str) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        m, token = self.tasks[task_id], self.token_for(task_id, kind)
        before = dict(self.row(task_id))
        row = self.run(self.store.heartbeat(task_id, token, 60))
        assert (row is not None) == m.holds(token)
        if row is None:
            assert dict(self.row(task_id)) == before, "a refused heartbeat changed the task"
        else:
            m.lease_expired = False

    @precondition(lambda self: any(m.state is S.RUNNING for m in self.tasks.values()))
    @rule(index=st.integers(0, 50))
    def lease_runs_out(self, index: int) -> None:
        task_id = self.pick(index, S.RUNNING)
        assert task_id is not None
        self.run(
            self.conn.execute(
                "UPDATE tasks SET lease_expires_at = now() - interval '1s' WHERE id = $1", task_id
            )
        )
        self.tasks[task_id].lease_expired = True

    @precondition(lambda self: any(not m.due for m in self.tasks.values()))
    @rule(index=st.integers(0, 50))
    def time_passes(self, index: int) -> None:
        task_id = self.pick(index, S.PENDING, S.FAILED)
        if task_id is None or self.tasks[task_id].due:
            return
        self.run(
            self.conn.execute(
                "UPDATE tasks SET due_at = now() - interval '1s' WHERE id = $1", task_id
            )
        )
        self.tasks[task_id].due = True

    @rule(index=st.integers(0, 50))
    def cancel(self, index: int) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        allowed = self.tasks[task_id].state in BY_TRIGGER["cancel"].sources
        self.expect(task_id, self.run(self.store.cancel(task_id, "test")), "cancel", allowed)

    @rule(index=st.integers(0, 50))
    def request_cancel(self, index: int) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        m = self.tasks[task_id]
        assert self.run(self.store.request_cancel(task_id)) == (m.state is S.RUNNING)
        if m.state is S.RUNNING:
            m.cancel_requested = True

    @rule(index=st.integers(0, 50), kind=st.sampled_from(["current", "stale"]))
    def cancel_running(self, index: int, kind: str) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        m, token = self.tasks[task_id], self.token_for(task_id, kind)
        allowed = m.holds(token) and self.row(task_id)["cancel_requested_at"] is not None
        self.expect(
            task_id, self.run(self.store.cancel_running(task_id, token)), "cancel_running", allowed
        )

    @rule(index=st.integers(0, 50))
    def requeue(self, index: int) -> None:
        task_id = self.pick(index)
        if task_id is None:
            return
        m = self.tasks[task_id]
        allowed = m.state is S.DEAD
        self.expect(task_id, self.run(self.store.requeue(task_id, "test")), "requeue", allowed)
        if allowed:
            m.attempt, m.due = 0, True

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        rows = self.run(self.conn.fetch("SELECT id, state, attempt, max_attempts FROM tasks"))
        assert len(rows) == len(self.tasks), "a submitted task is missing"
        for r in rows:
            m = self.tasks[r["id"]]
            assert (TaskState(r["state"]), r["attempt"]) == (m.state, m.attempt), (
                f"task {r['id']}: stored {r['state']}/{r['attempt']}, model {m.state}/{m.attempt}"
            )
            assert 0 <= r["attempt"] <= r["max_attempts"]

    @invariant()
    def waiting_counts_match_and_none_is_stranded(self) -> None:
        rows = self.run(self.conn.fetch("SELECT id, state, waiting_for FROM tasks"))
        for r in rows:
            m = self.tasks[r["id"]]
            if m.state is S.WAITING:
                assert r["waiting_for"] == m.waiting_for > 0, (r["id"], r["waiting_for"], m)
                # stranded: waiting with nothing left that could settle it
                assert any(
                    d not in m.satisfied
                    and (
                        self.tasks[d].state not in (S.COMPLETED, S.DEAD, S.CANCELLED)
                        or (self.tasks[d].state is S.DEAD and policy == "hold")
                    )
                    for d, policy in m.deps.items()
                ), f"task {r['id']} is stranded WAITING: {m.deps}, settled {m.satisfied}"

    @invariant()
    def transactional_writes_exactly_with_their_completion(self) -> None:
        rows = self.run(self.conn.fetch("SELECT task_id, count(*) AS n FROM effects GROUP BY 1"))
        stored = {r["task_id"]: r["n"] for r in rows}
        assert stored == {i: m.effects for i, m in self.tasks.items() if m.effects}
        assert all(n <= 1 for n in stored.values())

    @invariant()
    def histories_are_paths_with_at_most_one_completion(self) -> None:
        rows = self.run(
            self.conn.fetch(
                "SELECT task_id, trigger, from_state, to_state FROM task_transitions "
                "ORDER BY task_id, id"
            )
        )
        steps: dict[int, list[tuple[str, TaskState | None, TaskState]]] = {}
        for r in rows:
            steps.setdefault(r["task_id"], []).append(
                (
                    r["trigger"],
                    TaskState(r["from_state"]) if r["from_state"] else None,
                    TaskState(r["to_state"]),
                )
            )
        for task_id, path in steps.items():
            assert is_path(path), f"task {task_id}: {path}"
            assert path[-1][2] == self.tasks[task_id].state
            assert sum(t == "complete" for t, _, _ in path) <= 1
            assert self.tasks[task_id].completions <= 1

    def drain(self) -> None:
        """Let everything run out: nothing may stay PENDING, FAILED, RUNNING or WAITING."""
        for _ in range(80):
            self.run(
                self.conn.execute(
                    "UPDATE tasks SET due_at = now() - interval '1s' WHERE state IN ('PENDING', "
                    "'FAILED'); UPDATE tasks SET lease_expires_at = now() - interval '1s' "
                    "WHERE state = 'RUNNING'"
                )
            )
            # a WAITING task held by a DEAD dependency (on_failure=hold) waits for an
            # operator: requeue every DEAD task, so that nothing is left waiting
            for dead in self.run(self.conn.fetch("SELECT id FROM tasks WHERE state = 'DEAD'")):
                assert self.run(self.store.requeue(dead["id"], "drain"))
            leased = self.run(self.store.claim("default", LEASE, 1000, "drainer")).leased
            for t in leased:
                assert self.run(self.store.complete(t.id, t.lease_token, "1"))
            left = self.run(
                self.conn.fetchval(
                    "SELECT count(*) FROM tasks "
                    "WHERE state IN ('PENDING', 'FAILED', 'RUNNING', 'WAITING')"
                )
            )
            if left == 0:
                break
        assert left == 0, f"{left} tasks never finished (or were stranded WAITING)"
        doubles = self.run(
            self.conn.fetchval(
                "SELECT count(*) FROM (SELECT task_id FROM task_transitions WHERE trigger = "
                "'complete' GROUP BY task_id HAVING count(*) > 1) d"
            )
        )
        assert doubles == 0


def test_engine_follows_the_model(db: str) -> None:
    EngineModel.dsn = db
    profile = PROFILES[os.environ.get("TASKLEASE_HYPOTHESIS", "ci")]
    run_state_machine_as_test(EngineModel, settings=profile)
