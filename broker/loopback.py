"""Which hosts are loopback: the one rule for where the broker may speak plain HTTP.

Used wherever plain HTTP is allowed on loopback only: the `listen` address (config lint and the
`serve` warning), http:// URLs in the config (issuers, Vault) and the issuer registry's key
fetches. One function, so a host the lint accepts is a host the registry fetches from.

Decisions (each edge case fails closed: a host not accepted here only needs TLS):
- `localhost`, in any case (host names are case-insensitive), is loopback: RFC 6761 reserves it,
  and the resolver maps it to 127.0.0.1/::1. Not `localhost.` nor `*.localhost`: their
  resolution is left to DNS.
- IP literals as Python's `ipaddress` reads them strictly (no `127.1`, no octal `0177.0.0.1`):
  all of 127.0.0.0/8 and `::1` (a zone suffix such as `::1%lo` changes nothing).
- `[::1]`, the bracketed form URLs and `listen` use, is accepted whole; brackets hold only
  IPv6 (`[127.0.0.1]`) and must match (`[::1`).
- Not `0.0.0.0` nor `::`: they bind every interface.
- Not IPv4-mapped IPv6 (`::ffff:127.0.0.1`): nobody configures it, it is a classic way past
  address filters, and Python versions disagree on whether it is loopback.
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback_host"]


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback IP literals (127.0.0.0/8, ::1, [::1]); see above."""
    if host.lower() == "localhost":
        return True
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped is None and address.is_loopback
    return not bracketed and address.is_loopback
