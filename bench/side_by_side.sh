#!/usr/bin/env bash
# tasklease and pgqueuer draining the same number of no-op tasks on the same PostgreSQL,
# alternately, RUNS times each; prints every figure. Usage:
#   bench/side_by_side.sh DSN [RUNS] [PGQUEUER_PYTHON]
# DSN is an admin connection (each run creates and drops a database of its own);
# PGQUEUER_PYTHON is a Python with pgqueuer 1.6 and uvloop installed (a scratch venv:
#   python3 -m venv /tmp/pgq && /tmp/pgq/bin/pip install 'pgqueuer==1.6.*' uvloop).
set -euo pipefail
dsn=$1
runs=${2:-3}
pgq=${3:-/tmp/pgq/bin/python}
cd "$(dirname "$0")/.."
for i in $(seq 1 "$runs"); do
    DATABASE_URL=$dsn .venv/bin/tasklease --log-level warning bench --only drain --json \
        | .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin)["figures"]["drain (tasks/s)"]; print("tasklease drain, 2 workers x 100: %.0f tasks/s" % r)'
    "$pgq" bench/pgqueuer_drain.py --dsn "$dsn" --runs 1 --managers 5 --batch 10
    "$pgq" bench/pgqueuer_drain.py --dsn "$dsn" --runs 1 --managers 2 --batch 100
done
