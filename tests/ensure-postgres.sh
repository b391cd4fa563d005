#!/usr/bin/env bash
# Make sure a PostgreSQL answers at $LUIGI_CREDS_TEST_PG (default postgresql://postgres@127.0.0.1:5432/test).
# If none does, start a throwaway cluster there (initdb + pg_ctl from Debian's postgresql, installed
# if missing), so the PostgreSQL tests run everywhere and never skip.
set -euo pipefail
url=${LUIGI_CREDS_TEST_PG:-postgresql://postgres@127.0.0.1:5432/test}
hostport=${url#*@}; hostport=${hostport%%/*}
host=${hostport%%:*}; port=${hostport##*:}
db=${url##*/}

answers() { pg_isready -q -h "$host" -p "$port" 2>/dev/null; }
if command -v pg_isready >/dev/null && answers; then
  exists=$(psql "postgresql://postgres@$host:$port/postgres" -qtAc "SELECT 1 FROM pg_database WHERE datname='$db'")
  [ "$exists" = 1 ] || psql "postgresql://postgres@$host:$port/postgres" -qc "CREATE DATABASE \"$db\""
  exit 0
fi
# The machine's own cluster may just be stopped.
if ls /etc/postgresql/*/main >/dev/null 2>&1 && command -v pg_ctlcluster >/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 30); do answers && exec "$0"; sleep 0.5; done
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
fi
bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")
data=$(mktemp -d /tmp/luigi-creds-pg.XXXXXX)
chown postgres "$data"
runuser -u postgres -- "$bin/initdb" -q -A trust -U postgres -D "$data"
runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$data/log" -w \
  -o "-c listen_addresses=$host -c port=$port -k $data" start
psql "postgresql://postgres@$host:$port/postgres" -qc "CREATE DATABASE \"$db\""
echo "started a throwaway PostgreSQL at $host:$port (data in $data)"
