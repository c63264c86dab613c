#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on loopback for the tests marked `postgres` and print the
# URL of its maintenance database (tests create a fresh database each). Debian's server package
# must be installed (.ci/run does that). Stop it with: pg_ctl -D <dir>/data stop
set -euo pipefail
# A free loopback port unless PGTEST_PORT names one (a cluster left by an earlier run keeps its own).
PORT=${PGTEST_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
DIR=$(mktemp -d /tmp/pgtest.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
as_pg "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >"$DIR/initdb.log"
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=200" start >/dev/null \
  || { tail -n 5 "$DIR/server.log" >&2; exit 1; }
echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
