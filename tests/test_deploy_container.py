"""deploy/container: the Containerfile runs non-root with a HEALTHCHECK, copies only what the
package needs, and its HEALTHCHECK passes against a running broker over real TLS."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from servers import ManagedProcess, free_port, start_process

from broker.__main__ import build_parser as broker_parser

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range (ours do; the test
    # process has none), and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)


from deploy_files import (
    BROKER_PORT,
    DEPLOY,
    REPO,
    containerfile_instructions,
)


def test_containerfile_runs_non_root_with_a_healthcheck_on_healthz() -> None:
    """The image is python:3.11-slim, runs as a non-root UID, exposes 8480 and checks /healthz."""
    steps = containerfile_instructions(DEPLOY / "container" / "Containerfile")
    froms = [args for word, args in steps if word == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER instruction"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit(), "USER must be a numeric non-root UID"
    assert ("EXPOSE", str(BROKER_PORT)) in steps
    [healthcheck] = [args for word, args in steps if word == "HEALTHCHECK"]
    assert "CMD" in healthcheck
    env = " ".join(args for word, args in steps if word == "ENV")
    assert f"https://127.0.0.1:{BROKER_PORT}/healthz" in env


def test_containerfile_entrypoint_and_cmd_parse_with_the_broker_cli() -> None:
    """ENTRYPOINT + CMD form `luigi-creds-broker serve --config /etc/luigi-creds/broker.toml`."""
    steps = dict(containerfile_instructions(DEPLOY / "container" / "Containerfile"))
    entrypoint = json.loads(steps["ENTRYPOINT"])
    cmd = json.loads(steps["CMD"])
    assert entrypoint == ["luigi-creds-broker"]
    assert cmd == ["serve", "--config", "/etc/luigi-creds/broker.toml"]
    assert broker_parser().parse_args(cmd).command == "serve"


def test_containerfile_copies_only_what_the_package_needs() -> None:
    """Every COPY source from the build context exists in the repository."""
    steps = containerfile_instructions(DEPLOY / "container" / "Containerfile")
    sources = []
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
    assert {"pyproject.toml", "broker", "luigi_creds"} <= {s.strip("./") for s in sources}
    ignore = (DEPLOY / "container" / "Containerfile.dockerignore").read_text(encoding="utf-8")
    rules = [line for line in ignore.splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", "the build context is an allowlist"
    for source in sources:
        assert f"!{source.strip('./')}" in {r.rstrip("/") for r in rules}, source


def healthcheck_argv() -> list[str]:
    steps = containerfile_instructions(DEPLOY / "container" / "Containerfile")
    [healthcheck] = [args for word, args in steps if word == "HEALTHCHECK"]
    argv: list[str] = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key, generated for this test."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "luigi-creds.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def pinned_jwks(path: Path) -> None:
    """Write a JWKS with one fresh ES256 public key (the issuer is pinned: no network)."""
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()

    def b64(value: int) -> str:
        return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()

    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x),
        "y": b64(numbers.y),
        "kid": "deploy-test",
        "use": "sig",
        "alg": "ES256",
    }
    path.write_text(json.dumps({"keys": [jwk]}), encoding="utf-8")


def https_get(url: str, cafile: Path) -> int:
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, Path, ManagedProcess]]:
    """`luigi-creds-broker serve` over TLS on a free loopback port, as the image runs it."""
    cert, key = self_signed(tmp_path)
    pinned_jwks(tmp_path / "jwks.json")
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(
        f"""
[broker]
listen = "127.0.0.1:{port}"
tls_cert_file = "{cert}"
tls_key_file = "{key}"
audit_store = "sqlite:///{tmp_path / "audit.db"}"

[[issuer]]
name = "pinned"
url = "https://idp.deploy-test.internal"
audiences = ["luigi-creds"]
algorithms = ["ES256"]
jwks_file = "{tmp_path / "jwks.json"}"
""",
        encoding="utf-8",
    )
    url = f"https://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return https_get(url + "/healthz", cert) == 200
        except OSError:
            return False

    process = start_process(
        [sys.executable, "-m", "broker", "serve", "--config", str(config)],
        log_path=tmp_path / "broker.log",
        ready=ready,
    )
    try:
        yield url, cert, process
    finally:
        process.stop()


@pytest.mark.integration
def test_healthcheck_passes_on_a_serving_broker_and_fails_once_it_stops(
    tls_broker: tuple[str, Path, ManagedProcess],
) -> None:
    """The image's HEALTHCHECK exits 0 against a live TLS broker and non-zero after it stops."""
    url, cert, process = tls_broker
    env = {**os.environ, "LUIGI_CREDS_HEALTH_URL": url + "/healthz"}
    result = subprocess.run(
        healthcheck_argv(), env=env, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    # The paths the Kubernetes probes use answer 200 on a ready broker.
    assert https_get(url + "/readyz", cert) == 200
    process.stop()
    result = subprocess.run(
        healthcheck_argv(), env=env, capture_output=True, timeout=30, check=False
    )
    assert result.returncode != 0
