"""The client helper talks to a broker served over real TLS, trusting only its configured CA.

A CA made at test time signs the broker's certificate for 127.0.0.1; `luigi-creds-broker serve`
serves it (`tls_cert_file`/`tls_key_file`). The client is built from a `[luigi_creds]` section
as a Luigi job builds it: with `ca_bundle` naming that CA it verifies the broker and mints AWS
credentials that work against moto (IAM enforced); with another CA's bundle, or the system's
trust store, the handshake is refused before anything is sent, so the one-shot CI token is not
spent and works afterwards. A certificate renewed on disk is served without a restart (file
check and SIGHUP), while connections opened before keep working.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pki import TestCA
from stack import Upstreams, start_upstreams

from broker.dev.harness import Broker, run_broker_cli
from broker.dev.processes import free_port

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range; pytest makes it fatal.
    warnings.simplefilter("ignore", DeprecationWarning)
    from luigi_creds.client import AwsCredentials, BrokerClient, BrokerError
    from luigi_creds.luigi import ClientSettings, build_broker_client

pytestmark = pytest.mark.integration

BUCKET = "tls-lake"


@dataclass
class TlsStack(Upstreams):
    """The module's issuer and moto, and a broker serving https with a certificate of `ca`."""

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
    with start_upstreams(workdir) as up:
        up.moto.client("s3").create_bucket(Bucket=BUCKET)
        config = up.config(
            workdir / "audit.db", broker_extra=f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"'
        )
        broker = up.start_broker(workdir / "broker", config, ca_file=ca.cert_file)
        try:
            yield TlsStack(up.issuer, up.moto, up.role_arn, up.workdir, broker, ca, wrong_ca)
        finally:
            broker.stop()


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


# --- certificates renewed on disk, served without a restart ---------------------------------------


class KeptAlive:
    """One TLS connection to the broker, opened once and reused for several HTTP/1.1 requests."""

    def __init__(self, url: str, context: ssl.SSLContext) -> None:
        host, port = url.removeprefix("https://").split(":")
        raw = socket.create_connection((host, int(port)), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname=host)
        self.reader = self.sock.makefile("rb")

    def fingerprint(self) -> str:
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()

    def healthz(self) -> int:
        self.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
        status = int(self.reader.readline().split()[1])
        length = 0
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        self.reader.read(length)
        return status

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def served_fingerprint(url: str, context: ssl.SSLContext) -> str:
    """The certificate a new handshake gets."""
    conn = KeptAlive(url, context)
    try:
        return conn.fingerprint()
    finally:
        conn.close()


def pem_fingerprint(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def swap_in(source: Path, target: Path) -> None:
    """Replace `target` atomically (a new inode), as cert-manager or `mv` does."""
    staged = target.with_suffix(".new")
    shutil.copyfile(source, staged)
    os.replace(staged, target)


def start_rotating_broker(
    tls_stack: TlsStack, workdir: Path, reload_seconds: str
) -> tuple[Broker, Path, Path]:
    live = workdir / "live"
    cert, key = tls_stack.ca.issue_server(live)
    config = tls_stack.config(
        workdir / "audit.db",
        broker_extra=(
            f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
            f'tls_reload_seconds = "{reload_seconds}"'
        ),
    )
    broker = tls_stack.start_broker(workdir / "broker", config, ca_file=tls_stack.ca.cert_file)
    return broker, cert, key


def test_a_certificate_renewed_on_disk_is_served_without_a_restart(
    tls_stack: TlsStack, tmp_path: Path
) -> None:
    """The broker watches its files: a half-renewed pair (new certificate, old key) is refused
    and the old certificate still served; once the key follows, new handshakes get the new
    certificate, a connection opened before keeps working on the old one, and the client
    helper mints through the new certificate."""
    broker, cert, key = start_rotating_broker(tls_stack, tmp_path, "1s")
    try:
        trust = ssl.create_default_context(cafile=str(tls_stack.ca.cert_file))
        old = pem_fingerprint(cert)
        before = KeptAlive(broker.url, trust)
        assert before.fingerprint() == old and before.healthz() == 200
        new_cert, new_key = tls_stack.ca.issue_server(tmp_path / "renewed")
        new = pem_fingerprint(new_cert)

        swap_in(new_cert, cert)  # the key does not match this certificate yet
        wait_for(
            lambda: "TLS certificate not reloaded" in broker.process.log_text(),
            "the half-renewed pair to be refused",
        )
        assert served_fingerprint(broker.url, trust) == old
        assert before.healthz() == 200

        swap_in(new_key, key)
        wait_for(lambda: served_fingerprint(broker.url, trust) == new, "the renewed certificate")
        assert broker.process.running() and "TLS certificate reloaded" in broker.process.log_text()
        # The connection opened before the renewal was not dropped and keeps its certificate.
        assert before.healthz() == 200 and before.fingerprint() == old
        before.close()

        client = build_broker_client(
            ClientSettings.from_mapping(
                {
                    "broker_url": broker.url,
                    "token_source": "env:CI_ID_TOKEN",
                    "ca_bundle": str(tls_stack.ca.cert_file),
                }
            ),
            environ={"CI_ID_TOKEN": tls_stack.issuer.mint("gitlab")},
        )
        try:
            assert isinstance(client.mint("etl-writer", task="AfterRenewal"), AwsCredentials)
            client.revoke()
        finally:
            close(client)
    finally:
        broker.stop()


def test_sighup_reloads_the_certificate_at_once(tls_stack: TlsStack, tmp_path: Path) -> None:
    """With the file check off, a renewed pair waits for SIGHUP, then is served at once."""
    broker, cert, key = start_rotating_broker(tls_stack, tmp_path, "0s")
    try:
        trust = ssl.create_default_context(cafile=str(tls_stack.ca.cert_file))
        old = pem_fingerprint(cert)
        new_cert, new_key = tls_stack.ca.issue_server(tmp_path / "renewed")
        swap_in(new_key, key)
        swap_in(new_cert, cert)
        time.sleep(1.5)
        assert served_fingerprint(broker.url, trust) == old
        os.kill(broker.process.pid, signal.SIGHUP)
        wait_for(
            lambda: served_fingerprint(broker.url, trust) == pem_fingerprint(new_cert),
            "the certificate after SIGHUP",
        )
        assert broker.process.running()
    finally:
        broker.stop()


def test_plain_http_off_loopback_only_behind_a_proxy_and_loudly(
    tls_stack: TlsStack, tmp_path: Path
) -> None:
    """Plain HTTP on a non-loopback address: refused at start without plain_http_behind_proxy;
    with it (and the proxy in trusted_proxies) served, with a warning on stderr and in the log."""
    port = free_port()

    def config(extra: str) -> str:
        return tls_stack.config(tmp_path / "audit.db", listen=f"0.0.0.0:{port}", broker_extra=extra)

    refused_config = tmp_path / "refused.toml"
    refused_config.write_text(config(""), encoding="utf-8")
    refused = run_broker_cli("serve", "--config", str(refused_config))
    assert refused.returncode != 0
    assert "plain HTTP only on a loopback address" in refused.stderr

    broker = tls_stack.start_broker(
        tmp_path / "proxied",
        config('plain_http_behind_proxy = true\ntrusted_proxies = ["127.0.0.1/32"]'),
    )
    try:
        assert broker.get("/healthz")[0] == 200
        assert f"WARNING: SERVING PLAIN HTTP on 0.0.0.0:{port}" in broker.process.log_text()
    finally:
        broker.stop()
