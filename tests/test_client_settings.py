"""Tests for the client's settings: `[luigi_creds]` read by Luigi's own parser and command line.

Files are parsed with Luigi's `LuigiConfigParser` (which strips no inline comments, unlike a
default ConfigParser), and the command-line tests run the real `luigi` entry point in a child
process, so what is tested is what a user's job sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from luigi.configuration.cfg_parser import LuigiConfigParser

from luigi_creds import LuigiCredsError
from luigi_creds.settings import FAMILY_SECTION_PREFIX, ClientSettings, ConfigError

BIN = Path(sys.executable).parent


def _read(tmp_path: Path, text: str) -> ClientSettings:
    """Parse `text` as a luigi.cfg with Luigi's parser, then validate it like the client does."""
    path = tmp_path / "luigi.cfg"
    path.write_text(textwrap.dedent(text))
    parser = LuigiConfigParser()
    parser.read([str(path)])
    families = {
        s[len(FAMILY_SECTION_PREFIX) :]: dict(parser.items(s))
        for s in parser.sections()
        if s.startswith(FAMILY_SECTION_PREFIX)
    }
    return ClientSettings.from_mapping(dict(parser.items("luigi_creds")), families)


def test_an_inline_comment_is_named_with_its_key_value_and_cause(tmp_path: Path) -> None:
    """`token_source = gitlab ; env:VAR` is one value to Luigi; the error says which key, what
    value, and that an inline comment is the likely cause."""
    with pytest.raises(ConfigError) as info:
        _read(
            tmp_path,
            """
            [luigi_creds]
            broker_url = https://broker.example.com
            token_source = gitlab ; env:VAR | file:PATH
            aws_grant = etl-writer  # the grant for every task
            """,
        )
    text = str(info.value)
    assert "token_source = 'gitlab ; env:VAR | file:PATH'" in text
    assert "aws_grant = 'etl-writer  # the grant for every task'" in text
    assert text.count("inline comment") == 2
    assert "Luigi's config parser keeps" in text
    # The junk is reported once, not again as an unknown token source.
    assert "is not one of" not in text


def test_every_problem_in_every_section_at_once(tmp_path: Path) -> None:
    """Problems in [luigi_creds] and in a per-family section come in one error."""
    with pytest.raises(ConfigError) as info:
        _read(
            tmp_path,
            """
            [luigi_creds]
            broker_url = http://broker.example.com
            token_source = kerberos
            timeout = soon
            refresh_chains = 0
            aws_grant = etl writer

            [luigi_creds:LoadWarehouse]
            aws_grant = bad/name
            password = x
            """,
        )
    text = str(info.value)
    for fragment in (
        "https unless it is on loopback",
        "token_source = 'kerberos' is not one of",
        "timeout must be a number",
        "refresh_chains must be a whole number from 1 to 64",
        "aws_grant = 'etl writer' has text after the value",
        "[luigi_creds:LoadWarehouse]: unknown key 'password'",
        "[luigi_creds:LoadWarehouse]: aws_grant = 'bad/name' is not a grant name",
    ):
        assert fragment in text, text
    assert isinstance(info.value, LuigiCredsError)


def test_a_family_section_overrides_the_grants(tmp_path: Path) -> None:
    """[luigi_creds:<Family>] overrides aws_grant/vault_grant; an empty value means none."""
    settings = _read(
        tmp_path,
        """
        [luigi_creds]
        broker_url = https://broker.example.com
        token_source = github
        aws_grant = etl-reader
        vault_grant = etl-vault

        [luigi_creds:LoadWarehouse]
        aws_grant = etl-writer

        [luigi_creds:Report]
        vault_grant =
        """,
    )
    assert (settings.grants_for("Other").aws_grant, settings.grants_for("Other").vault_grant) == (
        "etl-reader",
        "etl-vault",
    )
    load = settings.grants_for("LoadWarehouse")
    assert (load.aws_grant, load.vault_grant) == ("etl-writer", "etl-vault")
    report = settings.grants_for("Report")
    assert (report.aws_grant, report.vault_grant) == ("etl-reader", None)


JOB = """
import luigi
import luigi_creds.luigi_config
from luigi_creds.luigi_config import from_luigi_config


class Show(luigi.Task):
    def complete(self):
        return False

    def run(self):
        s = from_luigi_config()
        print("SETTINGS", s.token_source, s.aws_grant, s.grants_for("Show").aws_grant)
"""


def _luigi(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "luigi.cfg").write_text(
        "[core]\nautoload_range = false\n\n[luigi_creds]\n"
        "broker_url = https://broker.example.com\ntoken_source = github\naws_grant = etl-reader\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LUIGI")},
        "LUIGI_CONFIG_PATH": str(tmp_path / "luigi.cfg"),
        "PYTHONPATH": str(tmp_path),
    }
    return subprocess.run(
        [str(BIN / "luigi"), "--module", "job", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_luigi_command_line_overrides_and_help_all(tmp_path: Path) -> None:
    """`--luigi-creds-*` options override luigi.cfg, and `--help-all` lists the section."""
    shown = _luigi(tmp_path, "--help-all")
    assert "--luigi-creds-aws-grant" in shown.stdout and "--luigi-creds-broker-url" in shown.stdout
    assert "TaskCredentials" in shown.stdout  # the parameter's description

    run = _luigi(
        tmp_path, "Show", "--local-scheduler", "--luigi-creds-aws-grant", "etl-writer",
        "--luigi-creds-token-source", "env:CI_TOKEN",
    )  # fmt: skip
    assert "SETTINGS env:CI_TOKEN etl-writer etl-writer" in run.stdout, run.stderr[-2000:]


def test_the_readme_luigi_cfg_is_accepted_as_luigi_reads_it(tmp_path: Path) -> None:
    """The README's zero-code luigi.cfg, parsed by Luigi's parser, is accepted as documented."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```ini\n(.*?)```", readme, flags=re.DOTALL)
    (ini,) = [block for block in blocks if "[luigi_creds]" in block]
    settings = _read(tmp_path, ini)
    assert settings.broker_url == "https://broker.example.com"
    assert settings.token_source == "gitlab"
    default, load = settings.grants_for("Nightly"), settings.grants_for("LoadWarehouse")
    assert (default.aws_grant, default.vault_grant) == ("etl-writer", "etl-vault")
    assert (load.aws_grant, load.vault_grant) == ("warehouse-loader", None)
    assert "task_process_context = luigi_creds.TaskCredentials" in ini


def test_refresh_chains_is_read_and_builds_the_client_with_it(tmp_path: Path) -> None:
    """`refresh_chains` (default 4) is how many mints the job's session makes at once."""
    from luigi_creds.agent import build_broker_client

    base = "[luigi_creds]\nbroker_url = http://127.0.0.1:9\ntoken_source = env:T\n"
    assert _read(tmp_path, base).refresh_chains == 4
    settings = _read(tmp_path, base + "refresh_chains = 8\n")
    assert settings.refresh_chains == 8
    client = build_broker_client(settings, environ={"T": "x"})
    assert client._chains == 8
