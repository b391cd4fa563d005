#!/usr/bin/env bash
# System packages the suite needs beyond PyPI, installed from Debian if missing:
# - PostgreSQL's server binaries (initdb/pg_ctl for a throwaway cluster);
# - Chromium (the HTML audit report's screenshot test);
# - systemd, for `systemd-analyze verify` and `systemd-analyze security` on the shipped units;
# - kubectl, for `kubectl kustomize` on the shipped manifests. Debian bookworm's
#   kubernetes-client (kubectl 1.20) has kustomize built in and builds them the same as a
#   current kubectl; any kubectl already on PATH is kept.
# Then make sure a PostgreSQL answers (ensure-postgres.sh). The tests that need a tool fail
# naming it when it is absent; none of them passes on a weaker check.
set -euo pipefail
here=$(dirname "$0")
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from Debian: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
for tool in initdb chromium systemd-analyze kubectl; do
  if [ "$tool" = initdb ]; then
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && continue
  else
    command -v "$tool" >/dev/null 2>&1 && continue
  fi
  echo "ensure-system-deps: $tool is still missing after the install" >&2
  exit 1
done
bash "$here/ensure-postgres.sh"
