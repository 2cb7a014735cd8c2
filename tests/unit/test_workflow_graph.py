"""The dashboard's workflow graph (api/ui.py): levels, and what it draws."""

from tasklease.api.ui import levels, workflow_svg


def test_levels_follow_the_longest_chain() -> None:
    waits = {1: [], 2: [1], 3: [1], 4: [2, 3], 5: [1, 4], 6: [99]}  # 99: outside the graph
    assert levels([1, 2, 3, 4, 5, 6], waits) == {1: 0, 2: 1, 3: 1, 4: 2, 5: 3, 6: 0}


def test_the_graph_escapes_what_users_wrote() -> None:
    tasks = [
        {"id": 1, "action": "<script>x</script>", "state": "COMPLETED"},
        {"id": 2, "action": "b&c", "state": "WAITING"},
    ]
    edges = [{"task_id": 2, "depends_on": 1, "on_failure": "run", "satisfied": False}]
    svg = str(workflow_svg(tasks, edges))
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "b&amp;c" in svg
    assert svg.count('class="edge"') == 1 and 'stroke-dasharray="5,4"' in svg
    assert 'class="node state-waiting"' in svg and 'href="/ui/tasks/2"' in svg
