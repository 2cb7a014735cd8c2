"""Tools around the engine, not part of it: `tasklease bench` (bench.py, bench_limits.py),
`tasklease chaos` (chaos.py; failover.py on pg_auto_failover; netns.py for worker hosts in
network namespaces) and the process cluster they share (cluster.py)."""
