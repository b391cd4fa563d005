"""The broker's wire protocol: the names and shapes of what goes in and out of its endpoints.

POST /v1/token (RFC 6749 / RFC 8693 token exchange and refresh), POST /v1/revoke (RFC 7009) and
POST /v1/explain: the URNs and token types, the error codes, the request each endpoint hands
the use cases in broker/exchange.py, and the issued answer's JSON form. No HTTP types and no
behaviour here. The client (`luigi_creds`) keeps its own copy of these names: it never imports
the broker, and tests/test_contract.py checks that both sides agree.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

# -- grant types (RFC 6749 §4.5, RFC 8693 §2.1) ----------------------------------------------
GRANT_TYPE_TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_TYPE_REFRESH: Final = "refresh_token"

# -- subject token types a CI job may present (RFC 8693 §3) ----------------------------------
SUBJECT_TOKEN_TYPE_JWT: Final = "urn:ietf:params:oauth:token-type:jwt"
SUBJECT_TOKEN_TYPES: Final = (
    SUBJECT_TOKEN_TYPE_JWT,
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:access_token",
)

# -- issued token types: what kind of credential an answer carries (RFC 8693 §2.2.1) ---------
TOKEN_TYPE_AWS: Final = "urn:luigi-creds:token-type:aws-credentials"
TOKEN_TYPE_VAULT_TOKEN: Final = "urn:luigi-creds:token-type:vault-token"
TOKEN_TYPE_VAULT_SECRET: Final = "urn:luigi-creds:token-type:vault-secret"

# -- the job's agent reporting a refusal of its own (requested_token_type on a refresh) ----------
# `AGENT_REFUSED:<what>`, a type no grant issues: the broker answers invalid_request, mints and
# rotates nothing, and audits a DENIED record on the session with reason `agent_refused_<what>`
# (`agent_refused` for a <what> not listed here: the client's text never becomes a reason).
AGENT_REFUSED: Final = "urn:luigi-creds:token-type:agent-refused"
AGENT_REFUSALS: Final = frozenset(
    {
        "scope",  # a grant or task outside the asking bearer's scope
        "delegation",  # a bearer asked for one wider than itself
        "task_end",  # a bearer that may not end tasks tried to
        "lease",  # a task's bearer tried to revoke another task's Vault lease
    }
)

# -- token_type of an answer: how the access token is presented ------------------------------
# RFC 8693 §2.2.1: "N_A" when the issued token is not an access token for a resource server;
# "DPoP" (RFC 9449 §5) when the session is bound to the client's key.
TOKEN_TYPE_NOT_APPLICABLE: Final = "N_A"
TOKEN_TYPE_DPOP: Final = "DPoP"

# -- revoke: the token_type_hint values /v1/revoke accepts (RFC 7009 §2.1) -------------------
REVOKE_HINT_REFRESH: Final = "refresh_token"
REVOKE_HINT_LEASE: Final = TOKEN_TYPE_VAULT_SECRET

# -- error codes (RFC 6749 §5.2, RFC 9449 §7.1, §8) and the one description each carries -----
# A caller sees only the code and this generic text, never the audit reason behind it.
ERROR_DESCRIPTIONS: Final = {
    "invalid_request": "The request or its subject token is not acceptable.",
    "invalid_grant": "The refresh token is not valid.",
    "invalid_target": "The requested grant is not available to this identity.",
    "unsupported_grant_type": "The grant_type is not supported.",
    "temporarily_unavailable": "The service is temporarily unavailable; retry later.",
    "invalid_dpop_proof": "The DPoP proof is missing or not valid for this request.",
    "use_dpop_nonce": "The DPoP proof must carry the nonce in the DPoP-Nonce header.",
}


class Timings:
    """Milliseconds one request spent per phase, for the HTTP edge's Server-Timing header.

    Phases: verify (the subject token), policy (limits and rules), state (durable writes of
    sessions and replay records, with the audit records that commit alongside), audit
    (audit records written alone) and mint (the upstream call); `total` is the whole request
    from the edge's first look at it to its answer, so total - mint is the broker's own time
    including what no phase covers (the thread hop, waiting for a thread, building records).
    """

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def phase(self, name: str) -> _Phase:
        return _Phase(self.ms, name)

    def total_since(self, started: float) -> None:
        """Record `total`: from `started` (time.perf_counter) to now, every phase included."""
        self.ms["total"] = (time.perf_counter() - started) * 1000

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.ms.items())


class _Phase:
    """Adds the time spent inside `with` to `ms[name]` (a class, not a generator-based context
    manager: a dozen per request, at a third of the cost)."""

    __slots__ = ("_ms", "_name", "_started")

    def __init__(self, ms: dict[str, float], name: str) -> None:
        self._ms = ms
        self._name = name
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = (time.perf_counter() - self._started) * 1000
        self._ms[self._name] = self._ms.get(self._name, 0.0) + elapsed


# -- requests: what the HTTP edge hands the use cases after it checked the framing -----------


@dataclass(frozen=True, kw_only=True)
class ClientRequest:
    """What every endpoint's request carries: who sent it, and its DPoP proof (RFC 9449).

    On its own: a request refused for its framing before its fields were read.
    `dpop`: every `DPoP` header value; `method` and `url`: what the proof must name.
    """

    request_id: str
    client_addr: str
    timings: Timings = field(default_factory=Timings, repr=False, compare=False)
    dpop: tuple[str, ...] = field(default=(), repr=False)
    method: str = "POST"
    url: str = ""


@dataclass(frozen=True, kw_only=True)
class TokenRequest(ClientRequest):
    """POST /v1/token: a token exchange (a CI token for a grant) or a refresh (a handle)."""

    grant_type: str
    audience: str = ""
    subject_token: str = field(default="", repr=False)
    subject_token_type: str = ""
    requested_token_type: str = ""
    refresh_token: str = field(default="", repr=False)
    duration: str = ""
    task: str = ""
    # Refresh only: how many sibling refresh chains to open besides the presented handle's
    # (each answered with its first handle in `sibling_refresh_tokens`).
    sibling_chains: str = ""


@dataclass(frozen=True, kw_only=True)
class RevokeRequest(ClientRequest):
    """POST /v1/revoke: end the session of `refresh_token`, or with `lease_id` revoke only that
    Vault lease, which the session must have minted."""

    refresh_token: str = field(default="", repr=False)
    lease_id: str = ""


@dataclass(frozen=True, kw_only=True)
class ExplainRequest(ClientRequest):
    """POST /v1/explain: who a subject token (or a refresh handle's session) is."""

    subject_token: str = field(default="", repr=False)
    subject_token_type: str = ""
    refresh_token: str = field(default="", repr=False)


# -- answers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A credential issued by POST /v1/token; `wire()` is the JSON body (RFC 8693 §2.2.1)."""

    request_id: str
    issued_token_type: str
    access_token: str = field(repr=False)
    expires_in: int
    credentials: Mapping[str, Any] = field(repr=False)
    refresh_token: str = field(default="", repr=False)
    token_type: str = TOKEN_TYPE_NOT_APPLICABLE
    # The first handle of each sibling chain a refresh asked for (`sibling_chains`).
    sibling_refresh_tokens: tuple[str, ...] = field(default=(), repr=False)

    def wire(self) -> dict[str, Any]:
        body = {
            "access_token": self.access_token,
            "issued_token_type": self.issued_token_type,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
            "request_id": self.request_id,
            "credentials": dict(self.credentials),
        }
        if self.sibling_refresh_tokens:
            body["sibling_refresh_tokens"] = list(self.sibling_refresh_tokens)
        return body
