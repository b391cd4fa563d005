#!/usr/bin/env bash
# Vault/OpenBao setup for the luigi-creds broker: its policy, the token roles client tokens are
# created through, and the AppRole it logs in with. Idempotent; run it as a Vault operator.
#
#   VAULT_ADDR=https://vault.example.com:8200 VAULT_TOKEN=<operator token> \
#   BROKER_CIDRS=10.20.0.0/16 GRANT_POLICIES=etl-read OUT_DIR=/etc/luigi-creds/credentials \
#     deploy/vault/approle-setup.sh
#
# Environment (defaults in brackets):
#   VAULT_CLI        vault or bao binary [vault]
#   BROKER_CIDRS     comma-separated CIDRs the broker logs in from and uses its token from; a
#                    stolen secret_id or token is useless elsewhere [required]
#   GRANT_POLICIES   comma-separated policies grants may issue (`token_policies`) [etl-read]
#   OUT_DIR          where the role id and a fresh secret id are written, 0600 [./vault-approle]
#   SECRET_ID_TTL    how long a secret id stays valid; rotate before it ends [720h]
#   TOKEN_TTL        the broker's login TTL; the broker renews at 2/3 of it [1h]
#   TOKEN_MAX_TTL    when the broker must log in again [24h]
#   CLIENT_MAX_TTL   longest client token (>= broker.session_max) [12h]
set -euo pipefail

VAULT_CLI=${VAULT_CLI:-vault}
: "${VAULT_ADDR:?set VAULT_ADDR}"
: "${BROKER_CIDRS:?set BROKER_CIDRS, e.g. 10.20.0.0/16}"
GRANT_POLICIES=${GRANT_POLICIES:-etl-read}
OUT_DIR=${OUT_DIR:-./vault-approle}
SECRET_ID_TTL=${SECRET_ID_TTL:-720h}
TOKEN_TTL=${TOKEN_TTL:-1h}
TOKEN_MAX_TTL=${TOKEN_MAX_TTL:-24h}
CLIENT_MAX_TTL=${CLIENT_MAX_TTL:-12h}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The OpenBao CLI reads BAO_*; the Vault CLI reads VAULT_*. Serve both from one set of variables.
export BAO_ADDR=${BAO_ADDR:-$VAULT_ADDR}
if [[ -n "${VAULT_TOKEN:-}" ]]; then
  export BAO_TOKEN=${BAO_TOKEN:-$VAULT_TOKEN}
fi
v() { "$VAULT_CLI" "$@"; }

# 1. AppRole auth method, once.
# Read the list first: with pipefail, `grep -q` closing the pipe early can fail the writer
# (SIGPIPE) and make a mounted approle look absent.
auth_mounts=$(v auth list -format=json)
if ! grep -q '"approle/"' <<<"$auth_mounts"; then
  v auth enable approle
fi

# 2. The broker's policy, and the policy of the renew-only tokens it hands out with dynamic
#    secrets (the broker's login carries it too, so the tokens it reads secrets with may grant it).
v policy write luigi-creds-broker "$HERE/broker.hcl"
v policy write luigi-creds-lease-renew "$HERE/lease-renew.hcl"

# 3. Token roles: allowed_policies is the ceiling on what any grant can issue. Non-orphan client
#    tokens are children of the broker's login and die with it (at TOKEN_MAX_TTL), so grants
#    whose tokens must outlive a re-login set `orphan = true` and use the orphan role.
for role in luigi-creds luigi-creds-orphan; do
  orphan=false
  [[ $role == *-orphan ]] && orphan=true
  v write "auth/token/roles/$role" \
    allowed_policies="$GRANT_POLICIES" \
    disallowed_policies=root \
    orphan="$orphan" \
    renewable=true \
    token_explicit_max_ttl="$CLIENT_MAX_TTL" \
    token_type=service
done

# 4. The broker's AppRole: service tokens (batch tokens cannot create child tokens), bound to
#    the broker's addresses, secret ids that expire.
v write auth/approle/role/luigi-creds-broker \
  token_policies=luigi-creds-broker,luigi-creds-lease-renew \
  token_type=service \
  token_ttl="$TOKEN_TTL" \
  token_max_ttl="$TOKEN_MAX_TTL" \
  token_bound_cidrs="$BROKER_CIDRS" \
  secret_id_ttl="$SECRET_ID_TTL" \
  secret_id_num_uses=0 \
  secret_id_bound_cidrs="$BROKER_CIDRS" \
  bind_secret_id=true

# 5. Role id and a fresh secret id, readable by the invoking user only. Deliver them with
#    LoadCredential= (deploy/systemd) or a Kubernetes Secret (deploy/kubernetes), then delete.
umask 077
mkdir -p "$OUT_DIR"
v read -field=role_id auth/approle/role/luigi-creds-broker/role-id > "$OUT_DIR/vault-role-id"
v write -f -field=secret_id auth/approle/role/luigi-creds-broker/secret-id > "$OUT_DIR/vault-secret-id"
echo "wrote $OUT_DIR/vault-role-id and $OUT_DIR/vault-secret-id (mode 0600)"
