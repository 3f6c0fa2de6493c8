#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL server.
#
#   scripts/with-postgres.sh pytest ...
#
# Starts a fresh cluster from Debian's postgresql package in a temporary
# directory, listening on 127.0.0.1 only, exports BROKER_TEST_DATABASE_URL,
# runs the command and removes the cluster. As root, the server runs as the
# `postgres` user (initdb refuses root). When PostgreSQL is not installed it
# says so and exits 0, unless BROKER_REQUIRE_POSTGRES=1 (CI sets it).
set -euo pipefail

pg_bin=""
for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
  [ -x "$dir/initdb" ] && { pg_bin=$dir; break; }
done
if [ -z "$pg_bin" ] && command -v pg_config >/dev/null; then
  pg_bin=$(pg_config --bindir)
fi
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
  if [ "${BROKER_REQUIRE_POSTGRES:-0}" = "1" ]; then
    echo "with-postgres: PostgreSQL is required but not installed (apt-get install postgresql)" >&2
    exit 1
  fi
  echo "with-postgres: PostgreSQL is not installed; skipping the PostgreSQL run" >&2
  exit 0
fi

as_db_user=()
if [ "$(id -u)" = "0" ]; then
  id postgres >/dev/null 2>&1 || { echo "with-postgres: no 'postgres' user" >&2; exit 1; }
  as_db_user=(runuser -u postgres --)
fi

workdir=$(mktemp -d /tmp/broker-pg.XXXXXX)
chmod 755 "$workdir"
[ "$(id -u)" = "0" ] && chown postgres "$workdir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

cleanup() {
  "${as_db_user[@]}" "$pg_bin/pg_ctl" -D "$workdir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$workdir"
}
trap cleanup EXIT

"${as_db_user[@]}" "$pg_bin/initdb" -D "$workdir/data" -U postgres -A trust -E UTF8 --no-locale >/dev/null
"${as_db_user[@]}" "$pg_bin/pg_ctl" -D "$workdir/data" -l "$workdir/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $workdir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
  start >/dev/null
"${as_db_user[@]}" "$pg_bin/createdb" -h 127.0.0.1 -p "$port" -U postgres broker_test

export BROKER_TEST_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:$port/broker_test"
echo "with-postgres: PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
"$@"
