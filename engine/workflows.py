"""Workflows (docs/workflows.md): tasks that wait for other tasks.

`plan` checks a submission's graph and turns it into edges for `task_submit_graph`: every
`depends_on` names an existing task (an id) or, in a batch, another task of the batch (its
`ref`); no task waits for itself or twice for the same task; the batch's edges form no cycle
(one found is named). A fan-in task (`on_finish`) waits for every member of the batch with
on_failure "run", so it runs once, when all of them have finished however they ended.

The HTTP API and the Python client share this module, as they share engine.tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tasklease.engine.store import Edge
from tasklease.engine.tasks import DependsOn, InvalidTask, OnFailure, TaskSpec

DEFAULT_ON_FAILURE: OnFailure = "cancel"


@dataclass(frozen=True)
class Plan:
    edges: list[Edge]
    on_finish: int | None  # the fan-in task's place (the last), if any
    workflow: bool  # a batch with edges among its tasks, or a fan-in: a workflow is made


def is_graph(specs: Sequence[TaskSpec], on_finish: TaskSpec | None = None) -> bool:
    """Whether a submission needs task_submit_graph (else the plain submit runs, unchanged)."""
    return on_finish is not None or any(
        s.depends_on or s.ref is not None or s.on_failure is not None for s in specs
    )


def plan(
    specs: Sequence[TaskSpec],
    *,
    on_failure: OnFailure | None = None,
    on_finish: TaskSpec | None = None,
    batch: bool = True,
) -> Plan:
    """The edges of a submission (on_finish, if given, is the task after `specs`), or
    InvalidTask naming what is wrong."""
    default = on_failure or DEFAULT_ON_FAILURE
    refs: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.ref is not None:
            if s.ref in refs:
                raise InvalidTask(
                    f"tasks[{i}].ref {s.ref!r} is also the ref of tasks[{refs[s.ref]}]",
                    field=f"tasks[{i}].ref",
                )
            refs[s.ref] = i
    edges: list[Edge] = []
    inside: dict[int, list[int]] = {i: [] for i in range(len(specs))}
    for i, s in enumerate(specs):
        where = f"tasks[{i}]." if batch else ""
        if s.idempotency_key is not None:
            raise InvalidTask(
                f"{where}idempotency_key: not supported in a workflow (a submission with "
                "ref, depends_on, on_failure or on_finish; docs/workflows.md)",
                field=f"{where}idempotency_key",
            )
        seen: set[tuple[str, int]] = set()
        for dep in s.depends_on or ():
            target, policy = (
                (dep.task, dep.on_failure) if isinstance(dep, DependsOn) else (dep, None)
            )
            policy = policy or s.on_failure or default
            if isinstance(target, str):
                if target not in refs:
                    known = ", ".join(sorted(refs)) or "none"
                    raise InvalidTask(
                        f"{where}depends_on: no task of this "
                        f"{'batch' if batch else 'submission'} has ref {target!r} "
                        f"(refs: {known}); an existing task is named by its id",
                        field=f"{where}depends_on",
                    )
                on = refs[target]
                if on == i:
                    raise InvalidTask(
                        f"{where}depends_on: a task cannot wait for itself ({target!r})",
                        field=f"{where}depends_on",
                    )
                key = ("ref", on)
                edge = Edge(i, on, None, policy)
                inside[i].append(on)
            else:
                key = ("id", target)
                edge = Edge(i, None, target, policy)
            if key in seen:
                raise InvalidTask(
                    f"{where}depends_on names {target!r} twice", field=f"{where}depends_on"
                )
            seen.add(key)
            edges.append(edge)
    cycle = find_cycle(inside)
    if cycle is not None:
        names = " -> ".join(
            f"tasks[{i}]" + (f" ({specs[i].ref!r})" if specs[i].ref else "") for i in cycle
        )
        raise InvalidTask(f"depends_on makes a cycle: {names}", field="tasks")
    finish = None
    if on_finish is not None:
        if on_finish.depends_on or on_finish.ref is not None:
            raise InvalidTask(
                "on_finish waits for every task of the batch: it takes no depends_on or ref",
                field="on_finish",
            )
        finish = len(specs)
        edges += [Edge(finish, i, None, "run") for i in range(len(specs))]
    return Plan(edges, finish, workflow=batch and bool(edges))


def find_cycle(graph: dict[int, list[int]]) -> list[int] | None:
    """A cycle of `graph` (node -> the nodes it waits for) as [a, b, ..., a], or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for start in graph:
        if colour[start] != white:
            continue
        path: list[int] = [start]
        stack = [iter(graph[start])]
        colour[start] = grey
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                stack.pop()
            elif colour[nxt] == grey:
                return [*path[path.index(nxt) :], nxt]
            elif colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return None
