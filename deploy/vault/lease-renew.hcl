# Vault/OpenBao policy of the renew-only tokens the broker hands out with each dynamic secret
# (`renew_token`). The token is created with no_default_policy, so this is ALL it can do:
# extend a lease whose full id it is given, up to that lease's own max TTL (the grant's TTL:
# the lease dies with the holder token that read it). It cannot read, list or revoke anything,
# look itself up, use a cubbyhole, wrap or unwrap, or create tokens.
#
# Vault has no "renew only your own lease" rule: sys/leases/renew takes any lease id. Lease ids
# end in a random 24-character part and reach only the credential's holder and the audit logs;
# the broker's own login already has this capability. To narrow further, list the lease prefixes
# your grants use, e.g.
#   allowed_parameters = { "lease_id" = ["database/creds/warehouse-writer/*"], "increment" = [] }
#
#   vault policy write luigi-creds-lease-renew deploy/vault/lease-renew.hcl
path "sys/leases/renew" {
  capabilities = ["update"]
}
