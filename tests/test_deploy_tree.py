"""The deploy/ tree as a whole: every policy loads, every YAML and JSON file parses, the
README names each file, and nothing secret-shaped is committed."""

from __future__ import annotations

import ipaddress
import json
import re
import warnings
from pathlib import Path

import pytest
import yaml

from broker.config_lint import load_config
from broker.dev.harness import run_broker_cli

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range (ours do; the test
    # process has none), and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)


from deploy_files import (
    BROKER_PORT,
    DEPLOY,
    JSON_FILES,
    SYSTEMD,
    TOML_FILES,
    YAML_FILES,
    configmap_policy,
    k8s_objects,
    rel,
    secret_files,
)


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
        result = run_broker_cli("check-config", str(path))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{path}: ok")


def test_loader_accepts_secret_file_paths_that_do_not_exist_here() -> None:
    """The production policy names credential files that exist only on the target host."""
    config = load_config(SYSTEMD / "broker.toml")
    assert config.vault is not None and config.vault.secret_id_file is not None
    paths = secret_files(config)
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
        files = [*secret_files(config), config.vault.ca_cert]
        assert all(f is not None and f.is_absolute() for f in files)


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_files_parse(path: Path) -> None:
    """Each YAML file under deploy/ parses into mappings."""
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert docs and all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("path", JSON_FILES, ids=rel)
def test_json_files_parse(path: Path) -> None:
    """Each JSON file under deploy/ parses into an object."""
    assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)


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
