# Vault/OpenBao policy of the luigi-creds broker's own login (AppRole luigi-creds-broker, see
# approle-setup.sh). It can hand out only what the token roles' allowed_policies permit, read the
# dynamic secrets grants name, and renew and revoke what it issued. It reads no KV secret itself.
#
#   vault policy write luigi-creds-broker deploy/vault/broker.hcl

# Client tokens for `[grant.vault] token_policies` grants go through token roles. The role's
# allowed_policies (approle-setup.sh) is the ceiling on what any grant can issue, so the broker
# never needs to hold the grants' policies itself.
path "auth/token/create/luigi-creds" {
  capabilities = ["update"]
}
path "auth/token/create/luigi-creds-orphan" {
  capabilities = ["update"]
}

# Dynamic secrets are read with a per-credential orphan "holder" token (it inherits this policy
# and lives exactly the grant's TTL), so a lease outlives the broker's own re-logins but never
# the grant.
path "auth/token/create-orphan" {
  capabilities = ["update"]
}

# The holder makes one child for the client: a renew-only token carrying just the
# luigi-creds-lease-renew policy (lease-renew.hcl: sys/leases/renew and nothing else) and NOT
# `default`, which an operator may widen and which would also give lookup-self, cubbyhole and
# response wrapping. No other policy may be asked for on this path, and no_default_policy must
# be sent. The holder can grant luigi-creds-lease-renew because the broker's AppRole carries it
# (approle-setup.sh) and the holder inherits the broker's policies.
path "auth/token/create" {
  capabilities = ["update"]
  required_parameters = ["policies", "no_default_policy"]
  allowed_parameters = {
    "policies"          = [["luigi-creds-lease-renew"]]
    "no_default_policy" = [true]
    "ttl"               = []
    "explicit_max_ttl"  = []
    "renewable"         = []
    "meta"              = []
    "display_name"      = []
    "num_uses"          = []
    # hvac always sends no_parent=false; Vault honours no_parent only for root or sudo callers.
    "no_parent"         = []
  }
}

# Renew and revoke what was issued: leases by id, tokens by accessor (the audit records
# accessors, never tokens); lookup-accessor checks an issued token's state by its accessor.
path "sys/leases/renew" {
  capabilities = ["update"]
}
path "sys/leases/revoke" {
  capabilities = ["update"]
}
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}
path "auth/token/lookup-accessor" {
  capabilities = ["update"]
}

# Read-only look at the two token roles, so /readyz and `check-config --online` can say that a
# role is missing or that its allowed_policies do not cover a grant, instead of every Vault
# grant failing with a bare 503.
path "auth/token/roles/luigi-creds" {
  capabilities = ["read"]
}
path "auth/token/roles/luigi-creds-orphan" {
  capabilities = ["read"]
}

# Dynamic database credentials for `[grant.vault] secret = "database/creds/<role>"` grants.
# Narrow this to the roles your grants name, e.g. "database/creds/warehouse-writer".
path "database/creds/*" {
  capabilities = ["read"]
}
