"""The README's examples are checked like code: they must keep working as the project changes.

Each fenced block is taken from README.md: the luigi.cfg section goes through the client's own
validator, Python snippets compile against the real package, every `luigi-creds-broker` and
`luigi-creds` command line parses with the real argument parsers, `make` targets exist, and every
key the configuration table names is one the policy loader knows.
"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest

from broker import __main__ as broker_cli
from broker import config as broker_config
from luigi_creds import cli as client_cli
from luigi_creds.luigi import ClientSettings, CredentialsMixin

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def _command_lines() -> list[str]:
    """Shell lines that run our CLIs or make, with continuations joined, comments removed."""
    lines = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith(("luigi-creds", "make ")):
                lines.append(line)
    return lines


def test_readme_luigi_cfg_section_is_valid() -> None:
    """The [luigi_creds] example passes the client's own settings validator."""
    (ini,) = _blocks("ini")
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(ini)
    settings = ClientSettings.from_mapping(dict(parser["luigi_creds"]))
    assert settings.broker_url == "https://broker.example.com"


def test_readme_python_snippets_compile_and_use_real_names() -> None:
    """Python snippets compile, and the mixin methods the README names exist."""
    for block in _blocks("python"):
        compile(block, "README.md", "exec")
    for name in ("aws_session", "vault_client", "vault_secret", "credential_env"):
        assert callable(getattr(CredentialsMixin, name)), name
        assert f"{name}(grant)" in README or f"{name}(" in README


@pytest.mark.parametrize("line", _command_lines())
def test_readme_command_lines_parse(line: str) -> None:
    """Every CLI line in the README parses with the real parser; make targets exist."""
    # Placeholders and $(...) substitutions stand for one argument each.
    argv = shlex.split(re.sub(r"<[^>]*>|\$\([^)]*\)", "X", line))
    if argv[0] == "make":
        makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
        assert re.search(rf"^{argv[1]}:", makefile, flags=re.MULTILINE), line
        return
    if "--" in argv:  # `exec -- CMD`: the command after -- is the user's
        argv = argv[: argv.index("--") + 2]
    parser = broker_cli.build_parser() if argv[0] == "luigi-creds-broker" else None
    parser = parser or client_cli.build_parser()
    parser.parse_args(argv[1:])


def test_readme_configuration_table_names_real_keys() -> None:
    """Every `section.key` in the configuration table is a key the loader accepts."""
    known = {
        "broker": broker_config._BROKER_KEYS,
        "issuer": broker_config._ISSUER_KEYS,
        "grant": broker_config._GRANT_KEYS,
        "upstream.vault": broker_config._UPSTREAM_VAULT_KEYS,
    }
    table = README[README.index("## Configuration reference") : README.index("## Security model")]
    named = re.findall(r"`(broker|issuer|grant|upstream\.vault)\.([a-z_]+)`", table)
    assert len(named) >= 10
    for section, key in named:
        assert key in known[section], f"{section}.{key}"
    # Keys listed after the first in a cell (`a`, `b`) belong to the same section.
    for section, rest in re.findall(r"`(broker)\.[a-z_]+`((?:, `[a-z_]+`)+)", table):
        for key in re.findall(r"`([a-z_]+)`", rest):
            assert key in known[section], f"{section}.{key}"
