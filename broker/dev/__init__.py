"""Development stand-ins for external systems: a local OIDC issuer and real-shaped CI claims.

Used by the test suite and by `luigi-creds-broker dev`; nothing in the serving path imports it.
"""
