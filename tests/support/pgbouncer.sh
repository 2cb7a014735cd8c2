#!/usr/bin/env bash
# A PgBouncer in transaction pooling mode in front of a PostgreSQL, for tests and CI.
#
#   tests/support/pgbouncer.sh start DIR [PORT] [UPSTREAM_HOST] [UPSTREAM_PORT]
#   tests/support/pgbouncer.sh stop DIR
#
# start writes DIR/pgbouncer.ini and DIR/userlist.txt (user postgres, password
# $PGBOUNCER_PASSWORD, default tasklease), starts pgbouncer as a daemon listening on
# 127.0.0.1:PORT (6432), every database name routed to UPSTREAM (127.0.0.1:5432), and waits
# until it answers. As root it runs as the postgres user (pgbouncer refuses root).
# stop ends it (pid file in DIR) and removes DIR.
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:?directory}

if [ "$cmd" = stop ]; then
    if [ -f "$dir/pgbouncer.pid" ]; then
        pid=$(cat "$dir/pgbouncer.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
    exit 0
fi

port=${3:-6432}
host=${4:-127.0.0.1}
upstream_port=${5:-5432}
password=${PGBOUNCER_PASSWORD:-tasklease}
mkdir -p "$dir"
cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=$host port=$upstream_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
pool_mode = transaction
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
admin_users = postgres
; every test database gets a pool; keep few server connections per pool
max_client_conn = 1000
default_pool_size = 20
max_db_connections = 0
server_idle_timeout = 10
; test databases are dropped WITH (FORCE) while pgbouncer keeps connections to them
server_login_retry = 1
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
printf '"postgres" "%s"\n' "$password" >"$dir/userlist.txt"
if [ "$(id -u)" = 0 ]; then
    chown -R postgres "$dir"
    user=(-u postgres)
else
    user=()
fi
pgbouncer -d "${user[@]}" "$dir/pgbouncer.ini"
for _ in $(seq 1 50); do
    pg_isready -q -h 127.0.0.1 -p "$port" && exit 0
    sleep 0.1
done
echo "pgbouncer did not start; its log:" >&2
cat "$dir/pgbouncer.log" >&2 || true
exit 1
