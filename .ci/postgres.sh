#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on loopback for the tests marked `postgres`. Debian's server
# package must be installed (.ci/run does that).
#   bash .ci/postgres.sh [DIR]     start a cluster in DIR (default: a new /tmp/pgtest.XXXXXX) and
#                                  print the URL of its maintenance database (tests create a fresh
#                                  database each)
#   bash .ci/postgres.sh stop DIR  stop that cluster (if it runs) and delete DIR
set -euo pipefail
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "${1:-}" = stop ]; then
  DIR=${2:?usage: postgres.sh stop DIR}
  if [ -f "$DIR/data/postmaster.pid" ]; then
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null
  fi
  rm -rf "$DIR"
  exit 0
fi
# A free loopback port unless PGTEST_PORT names one (a cluster left by an earlier run keeps its own).
PORT=${PGTEST_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
DIR=${1:-$(mktemp -d /tmp/pgtest.XXXXXX)}
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
as_pg "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >"$DIR/initdb.log"
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=200" start >/dev/null \
  || { tail -n 5 "$DIR/server.log" >&2; exit 1; }
echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
