"""deploy/container: the Containerfile runs non-root with a HEALTHCHECK, copies only what the
package needs, and its HEALTHCHECK passes against a running broker over real TLS."""

from __future__ import annotations

import base64
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
from cryptography.hazmat.primitives.asymmetric import ec
from pki import TestCA

from broker.__main__ import build_parser as broker_parser
from broker.dev.harness import Broker, start_broker
from broker.dev.processes import free_port

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
def tls_broker(tmp_path: Path) -> Iterator[tuple[Broker, Path]]:
    """`luigi-creds-broker serve` over TLS on a free loopback port, as the image runs it, with a
    certificate from a CA made for this test; yields the broker and that CA's certificate."""
    ca = TestCA.create(tmp_path / "ca", "luigi-creds deploy test CA")
    cert, key = ca.issue_server(tmp_path / "tls")
    pinned_jwks(tmp_path / "jwks.json")
    config = f"""
[broker]
listen = "127.0.0.1:{free_port()}"
tls_cert_file = "{cert}"
tls_key_file = "{key}"
audit_store = "sqlite:///{tmp_path / "audit.db"}"

[[issuer]]
name = "pinned"
url = "https://idp.deploy-test.internal"
audiences = ["luigi-creds"]
algorithms = ["ES256"]
jwks_file = "{tmp_path / "jwks.json"}"
"""
    broker = start_broker(tmp_path / "broker", config, ca_file=ca.cert_file)
    try:
        yield broker, ca.cert_file
    finally:
        broker.stop()


@pytest.mark.integration
def test_healthcheck_passes_on_a_serving_broker_and_fails_once_it_stops(
    tls_broker: tuple[Broker, Path],
) -> None:
    """The image's HEALTHCHECK exits 0 against a live TLS broker and non-zero after it stops."""
    broker, cert = tls_broker
    url, process = broker.url, broker.process
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
