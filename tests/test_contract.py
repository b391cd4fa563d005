"""The contract between broker and client: one wire format, no shared code.

`luigi_creds` never imports `broker`; these tests feed what the broker's types put on the wire to
the client's parser, and check the OpenAPI document against the app's routes, so a change on one
side that the other does not follow fails here.
"""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from broker.app import ROUTES
from broker.exchange import ExchangeError
from broker.mint.aws import AwsCredentials as BrokerAws
from broker.mint.vault import VaultSecret as BrokerSecret
from broker.mint.vault import VaultToken as BrokerToken
from broker.openapi import OPENAPI
from broker.protocol import TOKEN_TYPE_AWS, TOKEN_TYPE_VAULT_SECRET, TOKEN_TYPE_VAULT_TOKEN, Issued
from luigi_creds import client

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]


def test_client_package_never_imports_the_broker() -> None:
    """No module under luigi_creds/ imports broker (they share only the wire format)."""
    offenders = []
    for path in sorted((ROOT / "luigi_creds").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "broker"]
    assert offenders == []


def _issued(
    token_type: str, credentials: dict[str, Any], siblings: tuple[str, ...] = ()
) -> dict[str, Any]:
    body = Issued(
        request_id="r1",
        issued_token_type=token_type,
        access_token="opaque",
        expires_in=900,
        credentials=MappingProxyType(credentials),
        refresh_token="lcr_next",
        sibling_refresh_tokens=siblings,
    ).wire()
    # Through JSON exactly as the HTTP edge sends it.
    parsed: dict[str, Any] = json.loads(json.dumps(body))
    return parsed


def test_aws_credentials_round_trip() -> None:
    """The broker's AWS credential_process shape parses into the client's AwsCredentials."""
    creds = BrokerAws("ASIAEXAMPLE", "secret-value", "session-value", NOW + timedelta(minutes=15))
    parsed = client.parse_credential(_issued(TOKEN_TYPE_AWS, creds.wire()), grant="g", now=NOW)
    assert isinstance(parsed, client.AwsCredentials)
    assert parsed.access_key_id == "ASIAEXAMPLE"
    assert parsed.secret_access_key == "secret-value"
    assert parsed.expires_at == NOW + timedelta(minutes=15)
    assert parsed.credential_process() == creds.wire()


def test_vault_token_round_trip() -> None:
    """The broker's vault-token object parses into the client's VaultToken."""
    token = BrokerToken("hvs.value", "acc1", ("etl-read", "default"), True, 600)
    body = _issued(TOKEN_TYPE_VAULT_TOKEN, token.wire())
    parsed = client.parse_credential(body, grant="g", now=NOW)
    assert isinstance(parsed, client.VaultToken)
    assert (parsed.token, parsed.accessor, parsed.lease_duration) == ("hvs.value", "acc1", 600)
    assert parsed.policies == ("etl-read", "default")


def test_vault_secret_round_trip() -> None:
    """The broker's vault-secret object, renew token included, parses into VaultSecret."""
    secret = BrokerSecret(
        "database/creds/w/abc", 300, True, {"username": "u", "password": "p"}, "acc", "renew"
    )
    parsed = client.parse_credential(
        _issued(TOKEN_TYPE_VAULT_SECRET, secret.wire()), grant="g", now=NOW
    )
    assert isinstance(parsed, client.VaultSecret)
    assert parsed.lease_id == "database/creds/w/abc"
    assert dict(parsed.data) == {"username": "u", "password": "p"}
    assert parsed.renew_token == "renew"


def test_issued_body_matches_the_openapi_schema() -> None:
    """Issued.wire() has exactly the fields the OpenAPI Issued schema lists, required ones set."""
    schema = OPENAPI["components"]["schemas"]["Issued"]
    body = _issued(TOKEN_TYPE_AWS, {}, siblings=("lcr_sibling",))
    assert set(body) == set(schema["properties"])
    assert set(schema["required"]) <= set(body)
    # Without sibling chains asked for, the answer is as it always was.
    assert set(_issued(TOKEN_TYPE_AWS, {})) == set(body) - {"sibling_refresh_tokens"}


@pytest.mark.parametrize(
    "error",
    [
        "invalid_request",
        "invalid_grant",
        "invalid_target",
        "unsupported_grant_type",
        "temporarily_unavailable",
    ],
)
def test_every_error_code_is_documented(error: str) -> None:
    """Each RFC 6749 error the broker emits has a description and is in the OpenAPI enum."""
    assert ExchangeError(400, error, "r").description
    assert error in OPENAPI["components"]["schemas"]["Error"]["properties"]["error"]["enum"]


def test_openapi_documents_every_route() -> None:
    """Every route of the app appears in /openapi.json, and nothing else does."""
    assert set(ROUTES) - {"/openapi.json"} == set(OPENAPI["paths"])


@pytest.mark.parametrize(
    ("package", "base"),
    [
        ("broker", "broker.errors:BrokerException"),
        ("luigi_creds", "luigi_creds.errors:LuigiCredsError"),
    ],
)
def test_every_exception_class_is_under_its_packages_base(package: str, base: str) -> None:
    """One error tree per package: a caller can catch the package's own errors in one clause."""
    import importlib
    import inspect
    import pkgutil

    module_name, _, class_name = base.partition(":")
    root: type = getattr(importlib.import_module(module_name), class_name)
    top = importlib.import_module(package)
    outside = []
    for info in pkgutil.walk_packages(top.__path__, prefix=f"{package}."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            ours = cls.__module__ == info.name and issubclass(cls, BaseException)
            if ours and not issubclass(cls, root):
                outside.append(f"{info.name}.{name}")
    assert outside == []


def test_the_agent_refusal_report_names_what_the_broker_audits() -> None:
    """The requested_token_type the agent reports a refusal with, and the kinds it names, are
    the ones the broker turns into `agent_refused_<kind>` audit reasons."""
    from broker.protocol import AGENT_REFUSALS, AGENT_REFUSED

    assert client.AGENT_REFUSED == AGENT_REFUSED
    assert client.AGENT_REFUSALS == AGENT_REFUSALS
