"""The client helper talks to a broker served over real TLS, trusting only its configured CA.

A CA made at test time signs the broker's certificate for 127.0.0.1; `luigi-creds-broker serve`
serves it (`tls_cert_file`/`tls_key_file`). The client is built from a `[luigi_creds]` section
as a Luigi job builds it: with `ca_bundle` naming that CA it verifies the broker and mints AWS
credentials that work against moto (IAM enforced); with another CA's bundle, or the system's
trust store, the handshake is refused before anything is sent, so the one-shot CI token is not
spent and works afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pki import TestCA
from servers import DevIssuer, free_port, start_dev_issuer
from stack import Broker, Moto, policy_toml, start_broker, start_moto

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range; pytest makes it fatal.
    warnings.simplefilter("ignore", DeprecationWarning)
    from luigi_creds.client import AwsCredentials, BrokerClient, BrokerError
    from luigi_creds.luigi import ClientSettings, build_broker_client

pytestmark = pytest.mark.integration

BUCKET = "tls-lake"


@dataclass
class TlsStack:
    issuer: DevIssuer
    moto: Moto
    broker: Broker
    ca: TestCA
    wrong_ca: TestCA


def close(client: BrokerClient) -> None:
    """Close the client's HTTP connections (BrokerClient has no close() of its own)."""
    client._http.close()


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    workdir = tmp_path_factory.mktemp("tls")
    ca = TestCA.create(workdir / "ca", "luigi-creds test CA")
    wrong_ca = TestCA.create(workdir / "wrong-ca", "some other CA")
    cert, key = ca.issue_server(workdir / "broker-tls")
    issuer = start_dev_issuer(workdir)
    moto = start_moto(workdir)
    try:
        moto.client("s3").create_bucket(Bucket=BUCKET)
        config = policy_toml(
            issuer_url=issuer.url,
            audit_db=workdir / "audit.db",
            listen=f"127.0.0.1:{free_port()}",
            moto_url=moto.url,
            role_arn=moto.create_role("etl-writer"),
            broker_extra=f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"',
        )
        broker = start_broker(workdir / "broker", config, env=moto.broker_env, ca_file=ca.cert_file)
        try:
            yield TlsStack(issuer, moto, broker, ca, wrong_ca)
        finally:
            broker.stop()
    finally:
        moto.stop()
        issuer.stop()


def test_client_with_the_ca_bundle_mints_over_https(tls_stack: TlsStack) -> None:
    """With ca_bundle naming the broker's CA, the client mints over https and the credential
    works in S3."""
    assert tls_stack.broker.url.startswith("https://127.0.0.1:")
    client = build_broker_client(
        ClientSettings.from_mapping(
            {
                "broker_url": tls_stack.broker.url,
                "token_source": "env:CI_ID_TOKEN",
                "ca_bundle": str(tls_stack.ca.cert_file),
            }
        ),
        environ={"CI_ID_TOKEN": tls_stack.issuer.mint("gitlab")},
    )
    try:
        mint_use_refresh_and_end(tls_stack, client)
    finally:
        close(client)


def mint_use_refresh_and_end(tls_stack: TlsStack, client: BrokerClient) -> None:
    """Mint, write and read S3 with the credential, mint again on the session, end it."""
    creds = client.mint("etl-writer", task="TlsCopy_1")
    assert isinstance(creds, AwsCredentials) and creds.access_key_id.startswith("ASIA")
    s3 = tls_stack.moto.client(
        "s3",
        AccessKeyId=creds.access_key_id,
        SecretAccessKey=creds.secret_access_key,
        SessionToken=creds.session_token,
    )
    s3.put_object(Bucket=BUCKET, Key="raw/tls.csv", Body=b"a\n1\n")
    assert s3.get_object(Bucket=BUCKET, Key="raw/tls.csv")["Body"].read() == b"a\n1\n"
    # The refresh session goes over the same verified connection.
    again = client.mint("etl-writer", task="TlsCopy_2")
    assert isinstance(again, AwsCredentials) and again.access_key_id != creds.access_key_id
    client.revoke()


@pytest.mark.parametrize("trust", ["wrong-ca", "system-store"])
def test_a_broker_certificate_from_another_ca_is_refused(tls_stack: TlsStack, trust: str) -> None:
    """With another CA's bundle, or none (the system's trust store), the client refuses the
    broker's certificate; the token was never sent, so it still exchanges with the right CA."""
    token = tls_stack.issuer.mint("gitlab")
    bundle = tls_stack.wrong_ca.cert_file if trust == "wrong-ca" else None
    refused = build_broker_client(
        ClientSettings.from_mapping(
            {"broker_url": tls_stack.broker.url, "token_source": "env:CI_ID_TOKEN"}
            | ({"ca_bundle": str(bundle)} if bundle else {})
        ),
        environ={"CI_ID_TOKEN": token},
    )
    with pytest.raises(BrokerError) as caught:
        try:
            refused.mint("etl-writer", task="Untrusted")
        finally:
            close(refused)
    assert caught.value.error == "unreachable"
    assert f"broker {tls_stack.broker.url} unreachable for grant 'etl-writer'" in str(caught.value)
    trusted = build_broker_client(
        ClientSettings.from_mapping(
            {
                "broker_url": tls_stack.broker.url,
                "token_source": "env:CI_ID_TOKEN",
                "ca_bundle": str(tls_stack.ca.cert_file),
            }
        ),
        environ={"CI_ID_TOKEN": token},
    )
    try:
        assert isinstance(trusted.mint("etl-writer", task="Trusted"), AwsCredentials)
        trusted.revoke()
    finally:
        close(trusted)
