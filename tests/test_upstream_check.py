"""Upstream refusals an operator can diagnose.

Unit: which Vault capabilities the grants need, which are missing from a capabilities-self answer,
the upstream's own words kept on `UpstreamError` for the log (Vault via hvac's exceptions, STS via
botocore's), and the hint each refusal gets.

Over real processes: an OpenBao whose broker AppRole and policy are set up but whose token roles
are missing (an easy mistake with an existing Vault). The broker's /readyz fails and names the
missing role, a token grant's refusal is logged with its request id and Vault's own error text
(and nothing secret), and `check-config --online` says the same.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import hvac.exceptions
import pytest

from broker.config_lint import parse_config
from broker.dev.harness import (
    Broker,
    DevIssuer,
    run_broker_cli,
    start_broker,
    start_dev_issuer,
)
from broker.dev.policy_file import (
    broker_table,
    dev_issuer,
    etl_project_grant,
    upstream_vault_approle,
    upstream_vault_token,
)
from broker.dev.processes import free_port
from broker.dev.vault import ETL_POLICY, BrokerVault, OpenBao, setup_broker, start_openbao
from broker.mint import UpstreamError
from broker.mint.aws import map_sts_refusal
from broker.mint.sts_http import StsRefusal
from broker.mint.vault import map_error
from broker.upstream_check import (
    Need,
    VaultPermissionCheck,
    missing_capabilities,
    refusal_hint,
    token_roles_needed,
    vault_needs,
)

TOKEN_GRANT = "etl-vault"
SECRET_GRANT = "warehouse"
UNREADABLE_SECRET = "kv/data/not-granted"


def broker_toml(issuer_url: str, audit_db: Path, vault: BrokerVault | None = None) -> str:
    upstream = (
        upstream_vault_approle(vault.upstream.url, vault.role_id_file, vault.secret_id_file)
        if vault
        else upstream_vault_token("http://127.0.0.1:8200", "/run/vault-token")
    )
    return "\n".join(
        (
            broker_table(f"127.0.0.1:{free_port()}", f"sqlite:///{audit_db}", leeway="30s"),
            dev_issuer(issuer_url),
            etl_project_grant(TOKEN_GRANT, ttl="5m", vault={"token_policies": [ETL_POLICY]}),
            etl_project_grant(SECRET_GRANT, ttl="2m", vault={"secret": UNREADABLE_SECRET}),
            upstream,
        )
    )


# --- pure ----------------------------------------------------------------------------------------


def test_vault_needs_follow_the_grants() -> None:
    config = parse_config(broker_toml("https://gitlab.com", Path("/tmp/unused.db")))
    needs = {(n.path, n.capability): n.grants for n in vault_needs(config)}
    assert needs[("auth/token/create/luigi-creds", "update")] == (TOKEN_GRANT,)
    assert needs[(UNREADABLE_SECRET, "read")] == (SECRET_GRANT,)
    assert needs[("auth/token/create-orphan", "update")] == (SECRET_GRANT,)
    assert needs[("auth/token/revoke-accessor", "update")] == (TOKEN_GRANT, SECRET_GRANT)
    assert token_roles_needed(config) == {"luigi-creds": {ETL_POLICY}}


def test_a_reloaded_policys_grants_are_checked_from_then_on() -> None:
    """/readyz checks what the policy in force needs, not the one the broker started with."""
    with_secret = parse_config(broker_toml("https://gitlab.com", Path("/tmp/unused.db")))
    token_only = dataclasses.replace(
        with_secret, grants=tuple(g for g in with_secret.grants if g.name == TOKEN_GRANT)
    )

    def vault(request: httpx.Request) -> httpx.Response:
        # Vault as a broker policy without the secret's path would answer (unit test double).
        if request.url.path == "/v1/sys/capabilities-self":
            paths = json.loads(request.content)["paths"]
            return httpx.Response(200, json={"data": {p: ["update"] for p in paths}})
        return httpx.Response(200, json={"data": {"allowed_policies": [ETL_POLICY]}})

    check = VaultPermissionCheck(
        token_only, lambda: "t", http=httpx.Client(transport=httpx.MockTransport(vault))
    )
    assert check.problems() == []
    check.policy_changed(with_secret)
    assert [p for p in check.problems() if UNREADABLE_SECRET in p]


def test_missing_capabilities_reads_capabilities_self_semantics() -> None:
    needs = [
        Need("a", "update", ("g",)),
        Need("b", "read", ("g",)),
        Need("c", "read", ("g",)),
        Need("d", "read", ("g",)),
    ]
    granted = {"a": ["update"], "b": ["deny"], "c": ["root"], "d": ["update"]}
    assert [n.path for n in missing_capabilities(needs, granted)] == ["b", "d"]


def test_vault_errors_keep_vaults_words_and_the_path_not_the_host() -> None:
    exc = hvac.exceptions.InvalidRequest(
        "unknown role luigi-creds",
        errors=["unknown role luigi-creds"],
        method="post",
        url="http://127.0.0.1:8200/v1/auth/token/create/luigi-creds",
    )
    mapped = map_error(exc)
    assert (mapped.reason, mapped.upstream) == ("upstream_rejected", "vault")
    assert mapped.detail == (
        "InvalidRequest: unknown role luigi-creds on POST /v1/auth/token/create/luigi-creds"
    )
    assert "does not exist: create it" in refusal_hint(mapped)
    denied = map_error(
        hvac.exceptions.Forbidden(
            errors=["1 error occurred:\n\t* permission denied\n\n"], method="get", url="http://v/x"
        )
    )
    assert denied.detail == "Forbidden: 1 error occurred: * permission denied on GET /x"
    assert "check-config --online" in refusal_hint(denied)


def test_sts_errors_keep_code_message_and_aws_request_id() -> None:
    exc = StsRefusal("AccessDenied", 403, "User: arn:x is not authorized", "4f1c-77")
    mapped = map_sts_refusal(exc)
    assert (mapped.reason, mapped.upstream) == ("upstream_denied", "sts")
    assert mapped.detail == (
        "AccessDenied (HTTP 403): User: arn:x is not authorized [AWS request id 4f1c-77]"
    )
    assert "trust policy" in refusal_hint(mapped)
    assert "Retried" in refusal_hint(UpstreamError("upstream_unavailable", retryable=True))


# --- real OpenBao without the token roles ---------------------------------------------------------


@dataclass
class Stack:
    issuer: DevIssuer
    bao: OpenBao
    broker: Broker
    log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("upstream-check")
    issuer = start_dev_issuer(workdir / "issuer")
    bao = start_openbao(workdir / "bao")
    try:
        vault = setup_broker(bao, workdir / "vault-files")
        # The AppRole and its policy are there; the token roles are not.
        for role in ("luigi-creds", "luigi-creds-orphan"):
            bao.root().delete(f"auth/token/roles/{role}")
        broker = start_broker(
            workdir / "broker", broker_toml(issuer.url, workdir / "audit.db", vault)
        )
        try:
            yield Stack(issuer, bao, broker, workdir / "broker" / "broker.log")
        finally:
            broker.stop()
    finally:
        bao.stop()
        issuer.stop()


def _log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def test_readyz_names_the_missing_token_role_and_capability(stack: Stack) -> None:
    response = httpx.get(stack.broker.url + "/readyz", timeout=30)
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["vault"] == "fail"
    problem = body["problems"]["vault"]
    assert "Vault token role 'luigi-creds' does not exist" in problem
    assert f"allowed_policies {ETL_POLICY}" in problem
    assert f'lacks "read" on {UNREADABLE_SECRET} (needed by grant {SECRET_GRANT})' in problem
    logged = [e for e in _log_lines(stack.log) if "readiness check vault failed" in str(e)]
    assert logged and "does not exist" in str(logged[-1]["message"])


def test_a_refused_token_grant_is_logged_with_request_id_and_vaults_words(stack: Stack) -> None:
    token = stack.issuer.mint("gitlab", ttl=300)
    status, body, _ = stack.broker.token(
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": TOKEN_GRANT,
        }
    )
    assert status == 503, body
    assert "unknown role" not in json.dumps(body)  # upstream internals stay out of the answer
    request_id = body["request_id"]
    refusals = [e for e in _log_lines(stack.log) if e.get("request_id") == request_id]
    assert refusals, stack.log.read_text()[-3000:]
    line = refusals[0]
    assert line["level"] == "warning"
    assert line["upstream"] == "vault" and line["grant"] == TOKEN_GRANT
    assert "unknown role luigi-creds" in str(line["upstream_error"])
    assert "The Vault token role luigi-creds does not exist: create it" in str(line["message"])
    raw_log = stack.log.read_text(encoding="utf-8")
    assert token not in raw_log
    for secret_file in (stack.broker.config_path.parent.parent / "vault-files").iterdir():
        assert secret_file.read_text().strip() not in raw_log


def test_check_config_online_says_the_same(stack: Stack) -> None:
    done = run_broker_cli("check-config", "--online", str(stack.broker.config_path), timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "vault: MISSING Vault token role 'luigi-creds' does not exist" in done.stdout
    assert f'vault: MISSING the broker\'s Vault token lacks "read" on {UNREADABLE_SECRET}' in (
        done.stdout
    )


def test_check_config_online_is_ok_once_the_roles_exist(stack: Stack, tmp_path: Path) -> None:
    """The same broker config passes once the operator creates the role and grants the path."""
    config = stack.broker.config_path.read_text(encoding="utf-8")
    fixed = tmp_path / "broker.toml"
    fixed.write_text(config.replace(UNREADABLE_SECRET, "database/creds/warehouse"))
    root = stack.bao.root()
    root.write("auth/token/roles/luigi-creds", allowed_policies=ETL_POLICY, renewable=True)
    try:
        done = run_broker_cli("check-config", "--online", str(fixed), timeout=120)
    finally:
        root.delete("auth/token/roles/luigi-creds")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vault: ok, the broker's token has every capability its grants need" in done.stdout
