"""`tasklease bench` runs every scenario end to end (tiny sizes: this checks it works, the
figures themselves live in docs/benchmarks.md; no timing is asserted)."""

from pathlib import Path

from tasklease.engine.tools import bench
from tests.conftest import not_in_pooler_pass


@not_in_pooler_pass("it benches the server directly (bench/pgbouncer_drain.py benches PgBouncer)")
async def test_bench_runs_every_scenario(admin_dsn: str, tmp_path: Path) -> None:
    config = bench.BenchConfig(
        tasks=300,
        workers=1,
        concurrency=20,
        latency_rate=50,
        latency_seconds=1,
        submit_clients=2,
        submit_seconds=1,
        batch_size=50,
        backlog=2000,
        limit_rounds=1,
    )
    lines: list[str] = []
    result = await bench.run(admin_dsn, config, tmp_path, lines.append)
    f = result.figures
    for key in (
        "insert (tasks/s)",
        "drain (tasks/s)",
        "start lag p99 (ms)",
        "POST /tasks, 2 clients (tasks/s)",
        "POST /tasks/batch of 50 (tasks/s)",
        "drain over 2,000 finished (tasks/s)",
        "backlog vs empty (%)",
        "drain, no limited action (tasks/s, median)",
        "  an action and its queue under global limits above the load: tasks/s "
        "(% of the same round's)",
        "  100 customers under a per-key limit above the load: tasks/s (% of the same round's)",
        "  100 customers under a per-key limit of 3 (200 slots): tasks/s (% of the same round's)",
    ):
        assert f[key] > 0, key
    assert f["start lag p50 (ms)"] <= f["start lag p99 (ms)"] <= f["start lag max (ms)"]
    assert "postgresql" in result.environment and "machine" in result.environment
    table = result.table()
    assert "drain (tasks/s)" in table and "environment:" in table
    assert any("drain" in line for line in lines)
