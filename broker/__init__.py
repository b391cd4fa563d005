"""luigi-creds broker: OIDC in, short-lived AWS and Vault credentials out, all audited."""
