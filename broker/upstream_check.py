"""Can the broker's own upstream identities do what its grants need? Answers in operator words.

Used by `/readyz` (the `vault` and `aws` checks) and by `luigi-creds-broker check-config --online`.

Vault: the paths each grant makes the broker call are derived from the policy (pure:
`vault_needs`), then Vault itself is asked which capabilities the broker's current token has on
them (`sys/capabilities-self`), and each token role a grant uses is read to see that it exists
and allows the policies the grants issue. A token role that is missing is the easy mistake
with an existing Vault: the AppRole logs in fine and every token grant then fails.

AWS: `sts:GetCallerIdentity` proves the broker's credentials and endpoint work and names its
identity. Whether that identity may `sts:AssumeRole` (and tag the session, set the source
identity) into each grant's role cannot be checked without assuming it: the answer lives in the
target role's trust policy and the broker's IAM policy, which the broker is not allowed to read.
The report says so rather than guessing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from broker.config import Config
from broker.errors import BrokerException
from broker.logs import scrub
from broker.mint import UpstreamError

VAULT_POLICY_HINT = "see deploy/vault/broker.hcl and deploy/vault/approle-setup.sh"


class NotReady(BrokerException):
    """A readiness failure whose message is written for operators and carries no secret."""


@dataclass(frozen=True)
class Need:
    """One capability the broker's Vault token must have, and which grants need it."""

    path: str
    capability: str
    grants: tuple[str, ...]


def vault_needs(config: Config) -> list[Need]:
    """The Vault paths and capabilities the configured grants make the broker use."""
    vault = config.vault
    if vault is None:
        return []
    wanted: dict[tuple[str, str], list[str]] = {}

    def need(path: str, capability: str, grant: str) -> None:
        wanted.setdefault((path, capability), []).append(grant)

    for grant in config.grants:
        spec = grant.vault
        if spec is None:
            continue
        if spec.secret:
            # A dynamic secret is read with an orphan holder token that gets a renew-only child.
            need(spec.secret, "read", grant.name)
            need("auth/token/create-orphan", "update", grant.name)
            need("auth/token/create", "update", grant.name)
            need("sys/leases/revoke", "update", grant.name)
        else:
            role = vault.orphan_token_role if spec.orphan else vault.token_role
            need(f"auth/token/create/{role}", "update", grant.name)
        need("auth/token/revoke-accessor", "update", grant.name)
    return [Need(path, cap, tuple(grants)) for (path, cap), grants in wanted.items()]


def token_roles_needed(config: Config) -> dict[str, set[str]]:
    """Token role name -> the policies grants issue through it."""
    vault = config.vault
    roles: dict[str, set[str]] = {}
    if vault is None:
        return roles
    for grant in config.grants:
        spec = grant.vault
        if spec is not None and not spec.secret:
            role = vault.orphan_token_role if spec.orphan else vault.token_role
            roles.setdefault(role, set()).update(spec.token_policies)
    return roles


def missing_capabilities(needs: Iterable[Need], granted: Mapping[str, Sequence[str]]) -> list[Need]:
    """The needs `granted` (path -> capabilities, as sys/capabilities-self answers) leaves out.

    `root` allows everything; `deny` (or no entry) allows nothing."""
    missing = []
    for need in needs:
        caps = set(granted.get(need.path, ()))
        if "root" in caps:
            continue
        if "deny" in caps or need.capability not in caps:
            missing.append(need)
    return missing


def describe_missing(need: Need) -> str:
    grants = ", ".join(need.grants)
    return (
        f'the broker\'s Vault token lacks "{need.capability}" on {need.path} '
        f"(needed by grant {grants}); add it to the broker's Vault policy ({VAULT_POLICY_HINT})"
    )


class VaultPermissionCheck:
    """Asks Vault what the broker's token may do; `problems()` lists what is missing.

    `token` returns the broker's current Vault token (its login, renewed as usual)."""

    def __init__(
        self,
        config: Config,
        token: Callable[[], str],
        *,
        http: httpx.Client | None = None,
        timeout: float = 5.0,
    ) -> None:
        vault = config.vault
        if vault is None:
            raise ValueError("no [upstream.vault] to check")
        self._url = vault.url.rstrip("/")
        self._namespace = vault.namespace
        self.policy_changed(config)
        self._token = token
        self.notes: list[str] = []
        verify: bool | str = str(vault.ca_cert) if vault.ca_cert else True
        self._http = http or httpx.Client(verify=verify, timeout=timeout, follow_redirects=False)

    def policy_changed(self, config: Config) -> None:
        """Check what the grants of `config` need from now on (a reloaded policy's grants)."""
        self._needs = vault_needs(config)
        self._roles = token_roles_needed(config)

    def _headers(self) -> dict[str, str]:
        headers = {"X-Vault-Token": self._token()}
        if self._namespace:
            headers["X-Vault-Namespace"] = self._namespace
        return headers

    def problems(self) -> list[str]:
        """Every missing capability or token role, in words an operator can act on. What could
        not be checked is left in `notes` (not a failure: older broker policies cannot read
        their token roles)."""
        headers = self._headers()
        problems: list[str] = []
        self.notes = []
        if self._needs:
            paths = sorted({n.path for n in self._needs})
            response = self._http.post(
                f"{self._url}/v1/sys/capabilities-self", headers=headers, json={"paths": paths}
            )
            if response.status_code != 200:
                return [
                    f"Vault refused sys/capabilities-self (HTTP {response.status_code}: "
                    f"{_vault_errors(response)}); the broker cannot tell which capabilities "
                    "it has"
                ]
            data = response.json().get("data") or {}
            granted = {p: list(data.get(p) or ()) for p in paths}
            problems += [describe_missing(n) for n in missing_capabilities(self._needs, granted)]
        for role, policies in sorted(self._roles.items()):
            problems += self._role_problems(role, policies, headers)
        return problems

    def _role_problems(self, role: str, policies: set[str], headers: dict[str, str]) -> list[str]:
        response = self._http.get(f"{self._url}/v1/auth/token/roles/{role}", headers=headers)
        if response.status_code == 404:
            return [
                f"Vault token role {role!r} does not exist, so every token grant fails "
                f"(Vault answers 'unknown role {role}'); create it with allowed_policies "
                f"{', '.join(sorted(policies)) or '(none)'} ({VAULT_POLICY_HINT})"
            ]
        if response.status_code == 403:
            self.notes.append(
                f"cannot tell whether Vault token role {role!r} exists: the broker's policy "
                f'does not allow "read" on auth/token/roles/{role}; add that to let /readyz '
                "check it"
            )
            return []
        if response.status_code != 200:
            return [f"reading token role {role!r}: HTTP {response.status_code}"]
        data: dict[str, Any] = response.json().get("data") or {}
        allowed = set(data.get("allowed_policies") or ())
        absent = sorted(policies - allowed - {"default"})
        if absent and "root" not in allowed:
            return [
                f"Vault token role {role!r} does not allow {', '.join(absent)} "
                "(its allowed_policies); grants issuing those are refused. Add them to the "
                "role's allowed_policies"
            ]
        return []

    def __call__(self) -> None:
        """Readiness: raise NotReady naming every problem."""
        problems = self.problems()
        if problems:
            raise NotReady("; ".join(problems))


def _vault_errors(response: httpx.Response) -> str:
    try:
        errors = response.json().get("errors") or []
    except ValueError:
        return scrub(response.text[:200])
    return scrub("; ".join(" ".join(str(e).split()) for e in errors)) or "no error text"


AWS_UNCHECKABLE = (
    "whether the broker may sts:AssumeRole, sts:TagSession and sts:SetSourceIdentity into "
    "each grant's role cannot be checked without assuming it (the target role's trust policy "
    "decides); see deploy/aws/target-role-trust-policy.json"
)


def aws_identity(sts: Any) -> str:
    """The broker's AWS identity (ARN) from sts:GetCallerIdentity; raises what boto3 raises."""
    return str(sts.get_caller_identity()["Arn"])


def refusal_hint(exc: UpstreamError) -> str:
    """What an operator should look at after an upstream refused a mint."""
    detail = exc.detail.lower()
    if exc.upstream == "vault":
        role = re.search(r"unknown role (\S+)", exc.detail)
        if role:
            return (
                f"The Vault token role {role.group(1)} does not exist: create it "
                f"({VAULT_POLICY_HINT})"
            )
        if "permission denied" in detail or exc.reason == "upstream_denied":
            return (
                "The broker's Vault policy does not allow this call: "
                "`luigi-creds-broker check-config --online --config broker.toml` lists what is "
                "missing"
            )
    if exc.upstream == "sts" and exc.reason == "upstream_denied":
        return (
            "The broker's AWS identity may not assume this role with these tags: check the "
            "role's trust policy (deploy/aws/target-role-trust-policy.json) and the broker's "
            "IAM policy"
        )
    if exc.retryable:
        return "Retried within the request; check the upstream's health"
    return "Check the upstream's configuration for this grant"
