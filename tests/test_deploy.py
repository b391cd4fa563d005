"""Every artefact under deploy/ (and the sample policies in examples/) is checked here.

Policies pass our loader; YAML and JSON parse and say what deploy/README.md claims; the systemd
units carry their hardening and pass `systemd-analyze verify` where systemd is installed; the
Kubernetes manifests, CI examples and the Containerfile agree with the broker's CLI, config keys,
port and probe paths. Integration tests run the Vault setup script against a real OpenBao (and
mint with the AppRole it creates, on the real PostgreSQL), and the container's HEALTHCHECK against
a running broker over real TLS.
"""

from __future__ import annotations

import base64
import configparser
import datetime as dt
import fnmatch
import ipaddress
import json
import os
import re
import shlex
import shutil
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from moto.iam.policy_validation import IAMPolicyDocumentValidator, IAMTrustPolicyDocumentValidator
from servers import ManagedProcess, free_port, start_process
from vault_server import BAO, DB_ROLE, OpenBao, enable_database, pg_url, start_openbao

from broker.__main__ import build_parser as broker_parser
from broker.config import Config, GrantConfig, VaultGrant, load_config, parse_config
from broker.dev.claims import preset_claims
from broker.mint import UpstreamError
from broker.mint.aws import AssumeRolePlan, plan_assume_role
from broker.mint.vault import VaultMinter, plan_token
from broker.policy import Policy

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range (ours do; the test
    # process has none), and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)
    from luigi.configuration.cfg_parser import (
        BasicInterpolation,
        CombinedInterpolation,
        EnvironmentInterpolation,
    )

    from luigi_creds.cli import build_parser as client_parser
    from luigi_creds.identity import DEFAULT_GITLAB_VARIABLE
    from luigi_creds.luigi import ClientSettings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "kubernetes"
CI = DEPLOY / "ci"
BROKER_PORT = 8480
CREDENTIALS_DIR = "/run/credentials/luigi-creds-broker.service"

TOML_FILES = sorted([*DEPLOY.rglob("*.toml"), *(REPO / "examples").rglob("*.toml")])
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
JSON_FILES = sorted(DEPLOY.rglob("*.json"))


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def unit_directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section -> key -> every value, in order.

    configparser keeps only the last of repeated keys (LoadCredential=, SystemCallFilter=), which
    systemd accumulates, so this reads the same INI syntax keeping all of them.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = (pending + raw.strip()) if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not Key=Value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def containerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """The Containerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        line = pending + stripped
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/kubernetes/ by kind (each kind appears once)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None or doc.get("kind") == "Kustomization":
                continue
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def configmap_policy() -> Config:
    data = k8s_objects()["ConfigMap"]["data"]
    return parse_config(data["broker.toml"], source="configmap.yaml:broker.toml")


def luigi_creds_section(text: str) -> dict[str, str]:
    """The `[luigi_creds]` section of a luigi.cfg, read with Luigi's own interpolation."""
    parser = configparser.ConfigParser(
        interpolation=CombinedInterpolation([BasicInterpolation(), EnvironmentInterpolation()])
    )
    parser.read_string(text)
    return dict(parser.items("luigi_creds"))


def heredoc_cfg(script: str) -> str:
    """The luigi.cfg a CI script writes with `cat > ... <<'CFG'`."""
    match = re.search(r"<<'CFG'\n(.*?)\n\s*CFG\b", script, re.S)
    assert match, "the CI script writes no luigi.cfg"
    return match.group(1)


def commands(script: str, program: str) -> list[list[str]]:
    """Every shell line of `script` that runs `program`, split like the shell would."""
    out = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True) if line.strip() else []
        if words and words[0] == program:
            out.append(words[1:])
    return out


def grant(config: Config, name: str) -> GrantConfig:
    found = config.grant(name)
    assert found is not None, f"no grant {name!r}"
    return found


# ---------------------------------------------------------------------------------------------
# Policies (TOML)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", TOML_FILES, ids=rel)
def test_every_toml_passes_the_policy_loader(path: Path) -> None:
    """Each TOML policy under deploy/ and examples/ loads with no problem listed."""
    config = load_config(path)
    assert config.issuers and config.grants


def test_check_config_cli_accepts_the_deployed_policies(tmp_path: Path) -> None:
    """`luigi-creds-broker check-config`, the systemd unit's ExecStartPre, passes each policy."""
    configmap = tmp_path / "configmap-broker.toml"
    configmap.write_text(k8s_objects()["ConfigMap"]["data"]["broker.toml"], encoding="utf-8")
    for path in (SYSTEMD / "broker.toml", configmap):
        result = subprocess.run(
            [sys.executable, "-m", "broker", "check-config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{path}: ok")


def test_loader_accepts_secret_file_paths_that_do_not_exist_here() -> None:
    """The production policy names credential files that exist only on the target host."""
    config = load_config(SYSTEMD / "broker.toml")
    assert config.vault is not None and config.vault.secret_id_file is not None
    paths = [
        config.broker.tls_cert_file,
        config.broker.tls_key_file,
        config.broker.audit_key_file,
        config.broker.audit_salt_file,
        config.vault.role_id_file,
        config.vault.secret_id_file,
    ]
    assert all(p is not None and p.is_absolute() and not p.exists() for p in paths)


def test_deployed_policies_serve_tls_and_read_secrets_from_absolute_paths() -> None:
    """Policies for real hosts listen beyond loopback only with TLS and use absolute file paths."""
    for config in (load_config(SYSTEMD / "broker.toml"), configmap_policy()):
        host = config.broker.listen.rpartition(":")[0].strip("[]")
        assert not ipaddress.ip_address(host).is_loopback
        assert config.broker.listen.endswith(f":{BROKER_PORT}")
        assert config.broker.tls_cert_file and config.broker.tls_key_file
        assert config.broker.audit_key_file and config.broker.audit_salt_file
        assert config.vault is not None and config.vault.auth == "approle"
        assert config.vault.url.startswith("https://")
        files = [
            config.broker.tls_cert_file,
            config.broker.tls_key_file,
            config.broker.audit_key_file,
            config.broker.audit_salt_file,
            config.vault.role_id_file,
            config.vault.secret_id_file,
            config.vault.ca_cert,
        ]
        assert all(f is not None and f.is_absolute() for f in files)


# ---------------------------------------------------------------------------------------------
# systemd
# ---------------------------------------------------------------------------------------------

BROKER_HARDENING = {
    "DynamicUser": "yes",
    "ProtectSystem": "strict",
    "StateDirectory": "luigi-creds",
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
}


def test_broker_unit_carries_the_hardening_directives() -> None:
    """The broker unit sets every required hardening directive to its documented value."""
    service = unit_directives(SYSTEMD / "luigi-creds-broker.service")["Service"]
    for key, value in BROKER_HARDENING.items():
        assert value in service.get(key, []), f"{key}={value} missing"
    assert service["ExecStart"] == [
        "/usr/bin/luigi-creds-broker serve --config /etc/luigi-creds/broker.toml"
    ]
    assert "AmbientCapabilities" in service and service["AmbientCapabilities"] == [""]


def test_broker_unit_arguments_parse_with_the_broker_cli() -> None:
    """ExecStart and ExecStartPre are commands the luigi-creds-broker CLI accepts."""
    service = unit_directives(SYSTEMD / "luigi-creds-broker.service")["Service"]
    for command in service["ExecStartPre"] + service["ExecStart"]:
        program, *argv = shlex.split(command)
        assert program == "/usr/bin/luigi-creds-broker"
        assert broker_parser().parse_args(argv).command in ("serve", "check-config")


def test_load_credential_ids_match_the_policy_file_paths() -> None:
    """Every secret file the systemd policy names is delivered by one LoadCredential= line."""
    service = unit_directives(SYSTEMD / "luigi-creds-broker.service")["Service"]
    delivered = {}
    for line in service["LoadCredential"]:
        name, _, source = line.partition(":")
        assert source.startswith("/etc/luigi-creds/credentials/"), line
        delivered[name] = source
    config = load_config(SYSTEMD / "broker.toml")
    assert config.vault is not None
    named = [
        config.broker.tls_cert_file,
        config.broker.tls_key_file,
        config.broker.audit_key_file,
        config.broker.audit_salt_file,
        config.vault.role_id_file,
        config.vault.secret_id_file,
    ]
    for path in named:
        assert path is not None and str(path.parent) == CREDENTIALS_DIR
        assert path.name in delivered, f"{path} is not delivered by LoadCredential="
    assert len(delivered) == len(named)
    assert config.broker.audit_store == "sqlite:///var/lib/luigi-creds/audit.db"


def test_worker_unit_uses_the_helper_config_and_holds_no_secret() -> None:
    """The worker unit points Luigi at luigi.cfg and receives its one key by LoadCredential=."""
    units = unit_directives(SYSTEMD / "luigi-worker@.service")
    service = units["Service"]
    assert "LUIGI_CONFIG_PATH=/etc/luigi/luigi.cfg" in service["Environment"][0].split()
    assert service["LoadCredential"] == ["okta-key:/etc/luigi/credentials/okta-key"]
    for key in ("DynamicUser", "NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert service[key] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["SystemCallFilter"] == ["@system-service"]
    program, *argv = shlex.split(service["ExecStartPre"][0])
    assert program == "/opt/luigi/bin/luigi-creds"
    assert client_parser().parse_args(argv).cmd == "whoami"
    assert service["ExecStart"][0].startswith("/opt/luigi/bin/luigi --module ")
    timer = unit_directives(SYSTEMD / "luigi-worker@.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == ["timers.target"]


def test_worker_luigi_cfg_passes_the_client_settings_loader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The workers' luigi.cfg is a valid `[luigi_creds]` section once systemd sets its key path."""
    worker_creds = "/run/credentials/luigi-worker@warehouse.service"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", worker_creds)
    section = luigi_creds_section((SYSTEMD / "luigi.cfg").read_text(encoding="utf-8"))
    settings = ClientSettings.from_mapping(section)
    assert settings.token_source == "okta"
    assert settings.broker_url == "https://luigi-creds.example.com:8480"
    assert settings.okta_private_key_file == Path(worker_creds) / "okta-key"
    config = load_config(SYSTEMD / "broker.toml")
    okta = config.issuer("okta")
    assert okta is not None
    assert settings.okta_token_endpoint is not None
    assert settings.okta_token_endpoint.startswith(okta.url + "/")
    assert grant(config, "warehouse-load").match["sub"] == settings.okta_client_id


def test_worker_env_file_defines_every_variable_exec_start_uses() -> None:
    """The example pipeline env file sets each ${VAR} the worker's ExecStart= expands."""
    service = unit_directives(SYSTEMD / "luigi-worker@.service")["Service"]
    assert service["EnvironmentFile"] == ["/etc/luigi/pipelines/%i.env"]
    used = set(re.findall(r"\$\{(\w+)\}", service["ExecStart"][0]))
    defined = {}
    for line in (SYSTEMD / "warehouse.env").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            defined[key] = value
    assert used and used <= defined.keys()
    assert defined["LUIGI_WORKERS"].isdigit()


def test_units_parse_as_ini_with_configparser() -> None:
    """Each unit parses as INI (configparser, strict=False) with [Unit] and its main section."""
    for path in sorted(SYSTEMD.glob("luigi*.*")):
        if path.suffix not in (".service", ".timer"):
            continue
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(path.read_text(encoding="utf-8"))
        assert parser.has_section("Unit")
        assert parser.has_section("Service" if path.suffix == ".service" else "Timer")


def systemd_root(tmp_path: Path) -> Path:
    """A file-system root holding the host's system units, ours, and stand-ins for our binaries.

    `systemd-analyze verify` checks that ExecStart= binaries exist; on this machine luigi-creds is
    not installed at /usr/bin, so the check runs against a root with executable stand-ins.
    """
    root = tmp_path / "root"
    for units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if units.is_dir():
            shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
            break
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    for path in SYSTEMD.glob("luigi*@.*"):
        shutil.copy(path, target)
    shutil.copy(SYSTEMD / "luigi-creds-broker.service", target)
    for binary in (
        "usr/bin/luigi-creds-broker",
        "opt/luigi/bin/luigi",
        "opt/luigi/bin/luigi-creds",
    ):
        stand_in = root / binary
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
        stand_in.chmod(0o755)
    return root


UNIT_NAMES = (
    "luigi-creds-broker.service",
    "luigi-worker@warehouse.service",
    "luigi-worker@warehouse.timer",
)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the units with no warning (or, without systemd, they
    still parse with every directive in a section)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        for name in ("luigi-creds-broker.service", "luigi-worker@.service"):
            assert unit_directives(SYSTEMD / name)["Service"]["ExecStart"]
        return
    root = systemd_root(tmp_path)
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", *UNIT_NAMES],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and unparsable values are only warnings to systemd; here they fail.
    assert result.stderr.strip() == ""


def test_units_rate_ok_in_systemd_analyze_security(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the broker's exposure at most 2.0 and the worker's 2.5
    (or, without systemd, the broker unit drops every capability and W+X memory)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        service = unit_directives(SYSTEMD / "luigi-creds-broker.service")["Service"]
        assert service["CapabilityBoundingSet"] == [""]
        assert service["MemoryDenyWriteExecute"] == ["yes"]
        return
    root = systemd_root(tmp_path)
    # systemd's threshold is the exposure level x 10 (0..100).
    for unit, threshold in (
        ("luigi-creds-broker.service", 20),
        ("luigi-worker@warehouse.service", 25),
    ):
        result = subprocess.run(
            [
                analyze,
                "security",
                "--offline=yes",
                f"--root={root}",
                f"--threshold={threshold}",
                unit,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, unit + "\n" + result.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# Container image
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------


def broker_container() -> dict[str, Any]:
    [container] = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def named_port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [found] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(found)


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_files_parse(path: Path) -> None:
    """Each YAML file under deploy/ parses into mappings."""
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert docs and all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("directory", [K8S, K8S / "worker"], ids=rel)
def test_kustomization_lists_every_manifest(directory: Path) -> None:
    """kustomization.yaml names every manifest beside it, and `kubectl kustomize` builds them."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    manifests = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    kinds = sorted(
        yaml.safe_load((directory / name).read_text(encoding="utf-8"))["kind"] for name in manifests
    )
    for doc in (
        yaml.safe_load((directory / name).read_text(encoding="utf-8")) for name in manifests
    ):
        assert (
            doc["metadata"].get("namespace", kustomization["namespace"])
            == (kustomization["namespace"])
        )
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        built = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
        )
        assert built.returncode == 0, built.stderr
        assert sorted(d["kind"] for d in yaml.safe_load_all(built.stdout) if d) == kinds


def test_deployment_probes_port_and_replicas() -> None:
    """The Deployment runs 2+ replicas probing /healthz and /readyz on port 8480 over HTTPS."""
    deployment = k8s_objects()["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    container = broker_container()
    assert named_port(container, "https") == BROKER_PORT
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert named_port(container, probe["port"]) == BROKER_PORT
        assert probe["scheme"] == "HTTPS"
    assert broker_parser().parse_args(container["args"]).command == "serve"


def test_deployment_is_non_root_read_only_and_bounded() -> None:
    """Pod and container run non-root, read-only, with all capabilities dropped and limits."""
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    context = broker_container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    resources = broker_container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_configmap_policy_loads_and_every_file_it_names_is_mounted() -> None:
    """The ConfigMap's broker.toml loads, uses PostgreSQL, and each file it names is mounted."""
    config = configmap_policy()
    assert config.broker.audit_store.startswith("postgresql://")
    parts = urlsplit(config.broker.audit_store)
    assert parts.username and parts.password is None
    container = broker_container()
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert config.vault is not None
    named = [
        config.broker.tls_cert_file,
        config.broker.tls_key_file,
        config.broker.audit_key_file,
        config.broker.audit_salt_file,
        config.vault.role_id_file,
        config.vault.secret_id_file,
        config.vault.ca_cert,
    ]
    store_files = re.findall(r"(?:sslrootcert|sslcert|sslkey)=([^&]+)", config.broker.audit_store)
    assert len(store_files) == 3
    for path in [*named, *(Path(p) for p in store_files)]:
        assert path is not None
        mount = mounts.get(str(path.parent))
        assert mount is not None and mount["readOnly"] is True, f"{path} is not mounted"
        volume = volumes[mount["name"]]
        assert "secret" in volume or "configMap" in volume
    config_mount = mounts["/etc/luigi-creds/broker.toml"]
    assert (
        volumes[config_mount["name"]]["configMap"]["name"]
        == (k8s_objects()["ConfigMap"]["metadata"]["name"])
    )


def test_secrets_are_referenced_by_name_never_shipped() -> None:
    """No manifest is a Secret; secret volumes reference Secrets by name only."""
    assert "Secret" not in k8s_objects()
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {
        "luigi-creds-tls",
        "luigi-creds-vault-approle",
        "luigi-creds-audit-keys",
        "luigi-creds-postgres-client",
    }


def test_service_and_pdb_select_the_broker_pods() -> None:
    """The Service targets port 8480 and the PDB keeps one of the Deployment's pods up."""
    objects = k8s_objects()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    [port] = service["ports"]
    assert port["port"] == BROKER_PORT
    assert named_port(broker_container(), port["targetPort"]) == BROKER_PORT
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["minAvailable"] < objects["Deployment"]["spec"]["replicas"]


def test_network_policy_allows_only_the_documented_flows() -> None:
    """Ingress is 8480 from the worker namespace; egress is DNS, PostgreSQL, Vault and 443."""
    policy = k8s_objects()["NetworkPolicy"]["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    labels = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    [ingress] = policy["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": BROKER_PORT}]
    sources = [peer["namespaceSelector"]["matchLabels"] for peer in ingress["from"]]
    assert {"kubernetes.io/metadata.name": "luigi"} in sources
    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {("UDP", 53), ("TCP", 53), ("TCP", 5432), ("TCP", 8200), ("TCP", 443)}
    [public] = [r for r in policy["egress"] if r["ports"] == [{"protocol": "TCP", "port": 443}]]
    excepted = public["to"][0]["ipBlock"]["except"]
    assert "169.254.0.0/16" in excepted and "10.0.0.0/8" in excepted


def test_in_cluster_worker_token_fits_the_broker_issuer_and_grant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker CronJob's projected token has the broker's audience and lifetime, its service
    account is the `sub` the grants bind, and its luigi.cfg reads that token and the Service."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((K8S / "worker").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        docs[doc["kind"]] = doc
    account = docs["ServiceAccount"]["metadata"]
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    [token_volume] = [v for v in pod["volumes"] if "projected" in v]
    [source] = token_volume["projected"]["sources"]
    projected = source["serviceAccountToken"]

    config = configmap_policy()
    issuer = config.issuer("kubernetes")
    assert issuer is not None
    assert projected["audience"] in issuer.audiences
    assert projected["expirationSeconds"] <= issuer.max_token_lifetime
    subject = f"system:serviceaccount:{account['namespace']}:{account['name']}"
    assert grant(config, "etl-writer").match["sub"] == subject
    assert subject in grant(config, "etl-vault").match["sub"]

    [mount] = [m for m in container["volumeMounts"] if m["name"] == token_volume["name"]]
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    settings = ClientSettings.from_mapping(
        luigi_creds_section(docs["ConfigMap"]["data"]["luigi.cfg"])
    )
    assert settings.token_source == f"file:{mount['mountPath']}/{projected['path']}"
    service = k8s_objects()["Service"]["metadata"]
    assert settings.broker_url == (
        f"https://{service['name']}.{service['namespace']}.svc:{BROKER_PORT}"
    )
    ingress = k8s_objects()["NetworkPolicy"]["spec"]["ingress"][0]["from"]
    assert {"kubernetes.io/metadata.name": account["namespace"]} in [
        peer["namespaceSelector"]["matchLabels"] for peer in ingress
    ]
    assert container["command"][:2] == ["luigi", "--module"]


# ---------------------------------------------------------------------------------------------
# CI examples
# ---------------------------------------------------------------------------------------------


def ci_settings(script: str) -> ClientSettings:
    return ClientSettings.from_mapping(luigi_creds_section(heredoc_cfg(script)))


def check_ci_commands(script: str, config: Config) -> None:
    """The script runs a Luigi pipeline, and each `luigi-creds` call parses with our CLI."""
    assert commands(script, "luigi"), "no luigi run"
    calls = commands(script, "luigi-creds")
    assert calls
    for argv in calls:
        args = client_parser().parse_args(argv)
        for name in getattr(args, "grant", None) or []:
            grant(config, name)


def test_gitlab_ci_requests_an_id_token_for_the_broker_audience() -> None:
    """GitLab's id_tokens variable is the helper's default and its aud is a broker audience."""
    pipeline = yaml.safe_load((CI / ".gitlab-ci.yml").read_text(encoding="utf-8"))
    job = pipeline["nightly-etl"]
    [(variable, spec)] = job["id_tokens"].items()
    assert variable == DEFAULT_GITLAB_VARIABLE
    config = load_config(SYSTEMD / "broker.toml")
    gitlab = config.issuer("gitlab")
    assert gitlab is not None and spec["aud"] in gitlab.audiences
    script = "\n".join(job["before_script"] + job["script"])
    settings = ci_settings(script)
    assert settings.token_source == "gitlab"
    assert settings.gitlab_variable == variable
    check_ci_commands(script, config)


def test_github_workflow_has_id_token_write_and_the_github_source() -> None:
    """The workflow grants `id-token: write` and asks for a broker audience as `github`."""
    workflow = yaml.safe_load((CI / "github-actions.yml").read_text(encoding="utf-8"))
    assert workflow["permissions"]["id-token"] == "write"
    # YAML 1.1 (PyYAML) reads the key `on` as True; GitHub reads it as "on".
    assert "schedule" in workflow[True]
    steps = workflow["jobs"]["etl"]["steps"]
    script = "\n".join(step["run"] for step in steps if "run" in step)
    settings = ci_settings(script)
    assert settings.token_source == "github"
    config = load_config(SYSTEMD / "broker.toml")
    github = config.issuer("github")
    assert github is not None and settings.audience in github.audiences
    check_ci_commands(script, config)
    assert "github" in grant(config, "gh-etl-writer").issuers


def test_bitbucket_pipeline_enables_oidc_with_the_bitbucket_source() -> None:
    """The step sets `oidc: true`, deploys to production and configures `bitbucket`."""
    pipeline = yaml.safe_load((CI / "bitbucket-pipelines.yml").read_text(encoding="utf-8"))
    step = pipeline["pipelines"]["branches"]["main"][0]["step"]
    assert step["oidc"] is True
    assert step["deployment"] == "production"
    script = "\n".join(step["script"])
    settings = ci_settings(script)
    assert settings.token_source == "bitbucket"
    check_ci_commands(script, load_config(SYSTEMD / "broker.toml"))


# ---------------------------------------------------------------------------------------------
# AWS policies
# ---------------------------------------------------------------------------------------------


def aws_json(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((DEPLOY / "aws" / name).read_text(encoding="utf-8"))
    assert document["Version"] == "2012-10-17"
    return document


@pytest.mark.parametrize("path", JSON_FILES, ids=rel)
def test_json_files_parse(path: Path) -> None:
    """Each JSON file under deploy/ parses into an object."""
    assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)


def test_aws_policies_pass_the_iam_grammar_check() -> None:
    """The permission and trust policies pass moto's IAM policy grammar validators."""
    IAMPolicyDocumentValidator(
        (DEPLOY / "aws" / "broker-role-policy.json").read_text(encoding="utf-8")
    ).validate()
    for name in ("target-role-trust-policy.json", "broker-role-trust-policy-eks.json"):
        IAMTrustPolicyDocumentValidator(
            (DEPLOY / "aws" / name).read_text(encoding="utf-8")
        ).validate()


def test_target_role_trusts_only_the_broker_with_tags_and_source_identity() -> None:
    """The target role trusts the broker's role for AssumeRole, TagSession, SetSourceIdentity."""
    [statement] = aws_json("target-role-trust-policy.json")["Statement"]
    assert statement["Effect"] == "Allow"
    broker_role = statement["Principal"]["AWS"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/luigi-creds-broker", broker_role)
    assert set(statement["Action"]) == {
        "sts:AssumeRole",
        "sts:TagSession",
        "sts:SetSourceIdentity",
    }
    condition = statement["Condition"]
    assert condition["Null"]["sts:SourceIdentity"] == "false"
    assert condition["Null"]["aws:RequestTag/project"] == "false"
    assert "aws:RequestTag/project" in condition["StringLike"]


def test_every_grant_on_the_target_role_satisfies_its_trust_conditions() -> None:
    """Grants on luigi-etl-writer send exactly the tag keys and the source identity it demands."""
    [statement] = aws_json("target-role-trust-policy.json")["Statement"]
    tag_keys = set(statement["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"])
    required = {
        key.split("/", 1)[1]
        for key, value in statement["Condition"]["Null"].items()
        if key.startswith("aws:RequestTag/") and value == "false"
    }
    checked = 0
    for config in (load_config(SYSTEMD / "broker.toml"), configmap_policy()):
        for g in config.grants:
            if g.aws is None or not g.aws.role_arn.endswith(":role/luigi-etl-writer"):
                continue
            checked += 1
            assert set(g.aws.session_tags) <= tag_keys, g.name
            assert required <= set(g.aws.session_tags), g.name
            assert g.aws.source_identity, g.name
    assert checked >= 4


def trust_allows(statement: Mapping[str, Any], plan: AssumeRolePlan) -> bool:
    """Evaluate the trust statement's conditions on one AssumeRole request, as IAM would.

    Only the operators our trust policy uses are known; any other fails the test rather than
    being skipped, so this evaluator cannot silently allow.
    """
    context: dict[str, list[str]] = {f"aws:RequestTag/{k}": [v] for k, v in plan.tags}
    context["aws:TagKeys"] = [k for k, _ in plan.tags]
    if plan.source_identity is not None:
        context["sts:SourceIdentity"] = [plan.source_identity]
    for operator, checks in statement["Condition"].items():
        for key, wanted in checks.items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            values = context.get(key)
            if operator == "Null":
                ok = (values is None) == (wanted == "true")
            elif operator == "StringLike":
                ok = values is not None and any(
                    fnmatch.fnmatchcase(v, a) for v in values for a in allowed
                )
            elif operator == "ForAllValues:StringEquals":
                ok = all(v in allowed for v in values or [])
            else:
                raise AssertionError(f"trust_allows does not know {operator}")
            if not ok:
                return False
    return True


def k8s_claims(sub: str) -> dict[str, Any]:
    return {"iss": "https://oidc.eks.example", "aud": "luigi-creds", "sub": sub}


NOW = dt.datetime(2026, 11, 22, 2, 0, tzinfo=dt.UTC)

# The identities the CI and worker examples present: (policy, issuer, grant, claims).
EXAMPLES: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        "systemd",
        "gitlab",
        "etl-writer",
        preset_claims(
            "gitlab",
            issuer="https://gitlab.example.com",
            audience="https://luigi-creds.example.com",
            now=NOW,
            overrides={"project_id": "4211", "project_path": "data/warehouse"},
        ),
    ),
    (
        "systemd",
        "github",
        "gh-etl-writer",
        preset_claims(
            "github",
            issuer="https://token.actions.githubusercontent.com",
            audience="https://luigi-creds.example.com",
            now=NOW,
            overrides={
                "repository": "acme/etl",
                "repository_id": "892341765",
                "repository_owner_id": "14101776",
            },
        ),
    ),
    (
        "systemd",
        "bitbucket",
        "bb-etl-writer",
        preset_claims(
            "bitbucket",
            issuer="https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc",
            audience="ari:cloud:bitbucket::workspace/00000000-0000-4000-8000-000000000001",
            now=NOW,
            overrides={
                "repositoryUuid": "{7d1f1c36-6d0a-4f5e-9d8a-2b3c4d5e6f70}",
                "deploymentEnvironmentUuid": "{a1b2c3d4-0000-4000-8000-000000000abc}",
            },
        ),
    ),
    (
        "kubernetes",
        "kubernetes",
        "etl-writer",
        k8s_claims("system:serviceaccount:luigi:etl-worker"),
    ),
]

# One claim changed so the same identity must be refused: (example index, claim, value).
NEAR_MISSES = [
    (0, "ref_protected", "false"),
    (0, "project_id", "4212"),
    (1, "ref", "refs/heads/feature/x"),
    (2, "deploymentEnvironmentUuid", "{a1b2c3d4-0000-4000-8000-000000000abd}"),
    (3, "sub", "system:serviceaccount:luigi:other"),
]


def example_policy(name: str) -> Config:
    return load_config(SYSTEMD / "broker.toml") if name == "systemd" else configmap_policy()


@pytest.mark.parametrize(("source", "issuer", "grant_name", "claims"), EXAMPLES)
def test_example_identities_get_their_grant_and_the_target_role_trusts_the_request(
    source: str, issuer: str, grant_name: str, claims: dict[str, Any]
) -> None:
    """Each example pipeline's identity is allowed its grant, and the AssumeRole request the
    broker would send meets the target role's trust conditions."""
    config = example_policy(source)
    decision = Policy.compile(config).evaluate(grant_name, issuer, claims)
    assert decision.allowed, decision.reason
    aws = grant(config, grant_name).aws
    assert aws is not None and aws.role_arn.endswith(":role/luigi-etl-writer")
    plan = plan_assume_role(grant_name, aws, claims, request_id="req-1", duration=900)
    [statement] = aws_json("target-role-trust-policy.json")["Statement"]
    assert trust_allows(statement, plan), plan


@pytest.mark.parametrize(("index", "claim", "value"), NEAR_MISSES)
def test_one_changed_claim_denies_the_example_identity(index: int, claim: str, value: str) -> None:
    """Changing one bound claim of an example identity (branch, project, environment, account)
    makes the policy deny it."""
    source, issuer, grant_name, claims = EXAMPLES[index]
    decision = Policy.compile(example_policy(source)).evaluate(
        grant_name, issuer, {**claims, claim: value}
    )
    assert not decision.allowed


def test_target_role_refuses_requests_from_other_projects_or_without_identity() -> None:
    """The trust conditions refuse a foreign project tag, an extra tag or no source identity."""
    [statement] = aws_json("target-role-trust-policy.json")["Statement"]
    good = AssumeRolePlan(
        role_arn="arn:aws:iam::123456789012:role/luigi-etl-writer",
        role_session_name="etl-1",
        duration_seconds=900,
        source_identity="alice",
        tags=(("project", "data/warehouse"), ("pipeline", "1")),
    )
    assert trust_allows(statement, good)
    for bad in (
        replace(good, tags=(("project", "evil/repo"), ("pipeline", "1"))),
        replace(good, tags=(*good.tags, ("team", "x"))),
        replace(good, tags=(("project", "data/warehouse"),)),
        replace(good, source_identity=None),
    ):
        assert not trust_allows(statement, bad), bad


def test_broker_role_may_assume_every_role_the_policies_name() -> None:
    """The broker role's policy allows assuming each role_arn in the deployed policies."""
    statements = aws_json("broker-role-policy.json")["Statement"]
    [allow] = [s for s in statements if s["Effect"] == "Allow"]
    assert {"sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"} == set(allow["Action"])
    assert allow["Condition"]["StringEquals"]["aws:ResourceTag/luigi-creds-target"] == "true"
    [deny] = [s for s in statements if s["Effect"] == "Deny"]
    assert deny["Condition"]["Null"]["aws:RequestTag/project"] == "true"
    for config in (load_config(SYSTEMD / "broker.toml"), configmap_policy()):
        for g in config.grants:
            if g.aws is not None:
                assert fnmatch.fnmatchcase(g.aws.role_arn, allow["Resource"]), g.name


def test_broker_role_trusts_only_its_kubernetes_service_account() -> None:
    """The broker role's EKS trust names the broker's namespace and service account."""
    [statement] = aws_json("broker-role-trust-policy-eks.json")["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    conditions = statement["Condition"]["StringEquals"]
    account = k8s_objects()["ServiceAccount"]["metadata"]
    subject = f"system:serviceaccount:{account['namespace']}:{account['name']}"
    assert subject in conditions.values() and "sts.amazonaws.com" in conditions.values()
    role = aws_json("target-role-trust-policy.json")["Statement"][0]["Principal"]["AWS"]
    assert account["annotations"]["eks.amazonaws.com/role-arn"] == role


# ---------------------------------------------------------------------------------------------
# Vault
# ---------------------------------------------------------------------------------------------

VAULT_PATHS = (
    "auth/token/create/luigi-creds",
    "auth/token/create/luigi-creds-orphan",
    "auth/token/create-orphan",
    "auth/token/create",
    "sys/leases/renew",
    "sys/leases/revoke",
    "auth/token/revoke-accessor",
    "auth/token/lookup-accessor",
    "database/creds/*",
)


def test_vault_policy_names_every_path_the_broker_uses() -> None:
    """broker.hcl grants each path the broker calls, and the setup script names the settings."""
    hcl = (DEPLOY / "vault" / "broker.hcl").read_text(encoding="utf-8")
    declared = re.findall(r'^path "([^"]+)"', hcl, re.M)
    assert sorted(declared) == sorted(VAULT_PATHS)
    capabilities = re.findall(r"capabilities = \[([^\]]*)\]", hcl)
    assert len(capabilities) == len(VAULT_PATHS)
    for granted in capabilities:
        assert set(re.findall(r'"(\w+)"', granted)) <= {"read", "update"}, granted
    script = (DEPLOY / "vault" / "approle-setup.sh").read_text(encoding="utf-8")
    for setting in (
        "secret_id_ttl",
        "token_ttl",
        "token_max_ttl",
        "secret_id_bound_cidrs",
        "token_bound_cidrs",
        "allowed_policies",
    ):
        assert f"{setting}=" in script, setting
    subprocess.run(["bash", "-n", str(DEPLOY / "vault" / "approle-setup.sh")], check=True)


@pytest.fixture
def openbao(tmp_path: Path) -> Iterator[OpenBao]:
    server = start_openbao(tmp_path / "openbao")
    try:
        yield server
    finally:
        server.stop()


def run_approle_setup(bao: OpenBao, out_dir: Path, home: Path) -> str:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "VAULT_CLI": BAO,
        "VAULT_ADDR": bao.url,
        "VAULT_TOKEN": bao.root_token,
        "BROKER_CIDRS": "127.0.0.1/32",
        "GRANT_POLICIES": "etl-read",
        "OUT_DIR": str(out_dir),
        "TOKEN_TTL": "5m",
        "TOKEN_MAX_TTL": "1h",
    }
    result = subprocess.run(
        ["bash", str(DEPLOY / "vault" / "approle-setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.integration
def test_approle_setup_creates_a_bound_approle_with_0600_files(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """The setup script is idempotent, binds the AppRole to CIDRs, and writes 0600 id files."""
    out = tmp_path / "out"
    run_approle_setup(openbao, out, tmp_path)
    run_approle_setup(openbao, out, tmp_path)
    for name in ("vault-role-id", "vault-secret-id"):
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == 0o600, f"{name}: {oct(mode)}"
        assert (out / name).read_text(encoding="utf-8").strip()
    role = openbao.root().read("auth/approle/role/luigi-creds-broker")["data"]
    assert role["token_policies"] == ["luigi-creds-broker", "luigi-creds-lease-renew"]
    # OpenBao normalises a /32 token binding to the bare address.
    assert role["token_bound_cidrs"] in (["127.0.0.1"], ["127.0.0.1/32"])
    assert role["secret_id_bound_cidrs"] in (["127.0.0.1"], ["127.0.0.1/32"])
    assert role["secret_id_ttl"] == 720 * 3600
    assert (role["token_ttl"], role["token_max_ttl"]) == (300, 3600)
    for name, orphan in (("luigi-creds", False), ("luigi-creds-orphan", True)):
        token_role = openbao.root().read(f"auth/token/roles/{name}")["data"]
        assert token_role["allowed_policies"] == ["etl-read"]
        assert token_role["orphan"] is orphan


def etl_vault_grant(*policies: str, orphan: bool = False) -> GrantConfig:
    return GrantConfig(
        name="etl-vault",
        issuers=("gitlab",),
        match={"project_id": "4211"},
        ttl=300,
        vault=VaultGrant(token_policies=policies, orphan=orphan),
    )


@pytest.mark.integration
def test_broker_mints_renews_and_revokes_with_the_shipped_policy(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """With broker.hcl and the AppRole from the script, the broker mints tokens and database
    logins, renews and revokes them, and can do nothing beyond that."""
    enable_database(openbao, pg_url())
    out = tmp_path / "out"
    run_approle_setup(openbao, out, tmp_path)
    config = parse_config(
        f"""
[[issuer]]
name = "gitlab"
url = "https://gitlab.example.com"
audiences = ["https://luigi-creds.example.com"]

[upstream.vault]
url = "{openbao.url}"
auth = "approle"
role_id_file = "{out / "vault-role-id"}"
secret_id_file = "{out / "vault-secret-id"}"
"""
    )
    assert config.vault is not None
    minter = VaultMinter(config.vault, clock=lambda: dt.datetime.now(dt.UTC))
    metadata = {"request_id": "deploy-test"}

    token = minter.create_token(plan_token(etl_vault_grant("etl-read"), ttl=300, metadata=metadata))
    assert set(token.policies) == {"default", "etl-read"}
    orphan = minter.create_token(
        plan_token(etl_vault_grant("etl-read", orphan=True), ttl=300, metadata=metadata)
    )
    root = openbao.root()
    assert root.auth.token.lookup_accessor(orphan.accessor)["data"]["orphan"] is True
    with pytest.raises(UpstreamError):
        minter.create_token(plan_token(etl_vault_grant("admin"), ttl=300, metadata=metadata))

    secret = minter.read_secret(f"database/creds/{DB_ROLE}", ttl=120, metadata=metadata)
    assert minter.renew_lease(secret.lease_id, 90) == 90
    renewer = hvac.Client(url=openbao.url, token=secret.renew_token)
    assert renewer.sys.renew_lease(secret.lease_id, increment=80)["lease_duration"] == 80
    # The renew token carries lease-renew.hcl alone (no `default`): it cannot even look itself up.
    assert root.auth.token.lookup(secret.renew_token)["data"]["policies"] == [
        "luigi-creds-lease-renew"
    ]
    with pytest.raises(hvac.exceptions.Forbidden):
        renewer.auth.token.lookup_self()
    with pytest.raises(hvac.exceptions.Forbidden):
        renewer.write("cubbyhole/x", value="y")

    # The broker's own login: lookup by accessor works; it cannot copy itself or read secrets.
    login = hvac.Client(url=openbao.url, token=minter.identity.token())
    assert login.auth.token.lookup_accessor(token.accessor)["data"]["policies"] == [
        "default",
        "etl-read",
    ]
    for policies in (None, ["luigi-creds-broker"], ["default", "luigi-creds-broker"]):
        with pytest.raises(hvac.exceptions.Forbidden):
            login.auth.token.create(policies=policies, ttl="60s")
    # Renew-only children only, and only without `default`.
    for no_default in (None, False):
        with pytest.raises(hvac.exceptions.Forbidden):
            login.auth.token.create(
                policies=["luigi-creds-lease-renew"], no_default_policy=no_default, ttl="60s"
            )
    child = login.auth.token.create(
        policies=["luigi-creds-lease-renew"], no_default_policy=True, ttl="60s"
    )["auth"]
    assert child["policies"] == ["luigi-creds-lease-renew"]
    login.auth.token.revoke_accessor(child["accessor"])
    with pytest.raises(hvac.exceptions.Forbidden):
        login.read("secret/data/etl/db")

    minter.revoke_secret(secret)
    minter.revoke_accessor(token.accessor)
    minter.revoke_accessor(orphan.accessor)
    with pytest.raises(hvac.exceptions.Forbidden):
        renewer.auth.token.lookup_self()
    with pytest.raises(hvac.exceptions.InvalidRequest):
        root.auth.token.lookup_accessor(token.accessor)


# ---------------------------------------------------------------------------------------------
# The directory as a whole
# ---------------------------------------------------------------------------------------------

# Credential shapes that must never be committed (PEM keys, AWS key ids, Vault tokens).
SECRET_SHAPES = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"
    r"|\bhv[sbr]\.[A-Za-z0-9_-]{20,}"
)


def test_readme_describes_every_file_and_nothing_secret_is_committed() -> None:
    """deploy/README.md names each file under deploy/, and no file holds a credential shape."""
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"]
    assert len(files) >= 20
    for path in files:
        assert f"`{path.relative_to(DEPLOY)}`" in readme, f"README omits {path.name}"
        text = path.read_text(encoding="utf-8")
        assert not SECRET_SHAPES.search(text), f"{rel(path)} holds something secret-shaped"
