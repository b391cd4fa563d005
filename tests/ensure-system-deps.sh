#!/usr/bin/env bash
# System packages the suite needs beyond PyPI, installed from Debian if missing:
# PostgreSQL's server binaries (initdb/pg_ctl for a throwaway cluster) and Chromium (the HTML
# audit report's screenshot test). Then make sure a PostgreSQL answers (ensure-postgres.sh).
set -euo pipefail
here=$(dirname "$0")
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from Debian: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
bash "$here/ensure-postgres.sh"
