"""What the deploy/ tests read: where each folder is, and readers for its file formats.

systemd units keep repeated keys (configparser would drop them), Containerfiles join continuation
lines, Kubernetes manifests are indexed by kind, and luigi.cfg snippets are read with Luigi's own
interpolation, so each test checks a file the way its real consumer reads it.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import Config, GrantConfig
from broker.config_lint import parse_config

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range (ours do; the test
    # process has none), and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)
    from luigi.configuration.cfg_parser import (
        BasicInterpolation,
        CombinedInterpolation,
        EnvironmentInterpolation,
    )


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


def secret_files(config: Config) -> list[Path | None]:
    """The secret files a deployed policy names: TLS pair, audit keys, Vault AppRole ids."""
    assert config.vault is not None
    return [
        config.broker.tls_cert_file,
        config.broker.tls_key_file,
        config.broker.audit_key_file,
        config.broker.audit_salt_file,
        config.vault.role_id_file,
        config.vault.secret_id_file,
    ]


def grant(config: Config, name: str) -> GrantConfig:
    found = config.grant(name)
    assert found is not None, f"no grant {name!r}"
    return found


def aws_json(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((DEPLOY / "aws" / name).read_text(encoding="utf-8"))
    assert document["Version"] == "2012-10-17"
    return document


def installed_tool(program: str, debian_package: str) -> str:
    """The path of `program`, or a failed test naming what is missing.

    A check that needs a real tool never passes on a weaker path when the tool is absent:
    tests/ensure-system-deps.sh installs each one, and without it the test says what to install.
    """
    path = shutil.which(program)
    if path is None:
        pytest.fail(
            f"{program} is not installed; `bash tests/ensure-system-deps.sh` installs it "
            f"(Debian package {debian_package})",
            pytrace=False,
        )
    return path
