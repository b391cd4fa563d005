"""deploy/systemd: the units carry their hardening, pass `systemd-analyze verify` and
`systemd-analyze security`, and agree with the policy, the CLIs and the workers' luigi.cfg."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from broker.__main__ import build_parser as broker_parser
from broker.config_lint import load_config

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range (ours do; the test
    # process has none), and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)

    from luigi_creds.cli import build_parser as client_parser
    from luigi_creds.luigi import ClientSettings

from deploy_files import (
    CREDENTIALS_DIR,
    SYSTEMD,
    grant,
    installed_tool,
    luigi_creds_section,
    secret_files,
    unit_directives,
)

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
    named = secret_files(config)
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
    """`systemd-analyze verify` accepts the units with no warning."""
    analyze = installed_tool("systemd-analyze", "systemd")
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
    """`systemd-analyze security` rates the broker's exposure at most 2.0 and the worker's 2.5."""
    analyze = installed_tool("systemd-analyze", "systemd")
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
