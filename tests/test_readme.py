"""The README's examples are checked like code: they must keep working as the project changes.

Each fenced block is taken from README.md: every luigi.cfg snippet (the README's, the one in
`luigi-creds --help` and those in deploy/) is read by Luigi's own config parser, which strips no
inline comments, and then accepted by the client's settings validator and token-source parser;
Python snippets compile against the real package, every `luigi-creds-broker` and
`luigi-creds` command line parses with the real argument parsers, `make` targets exist, and every
key the configuration table names is one the policy loader knows.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from luigi.configuration import LuigiConfigParser

from broker import __main__ as broker_cli
from broker import config as broker_config
from luigi_creds import cli as client_cli
from luigi_creds.identity import IdentityError
from luigi_creds.luigi import ClientSettings, CredentialsMixin, build_broker_client

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


def _luigi_cfg_snippets() -> list[tuple[str, str]]:
    """(where, text) of every luigi.cfg snippet a user may copy."""
    snippets = [(f"README.md ini block {n}", b) for n, b in enumerate(_blocks("ini"), 1)]
    epilog = client_cli.EPILOG
    start = epilog.index("  [luigi_creds]")
    snippets.append(
        ("luigi-creds --help", textwrap.dedent(epilog[start : epilog.index("\n\n", start)]))
    )
    snippets.append(("deploy/systemd/luigi.cfg", (ROOT / "deploy/systemd/luigi.cfg").read_text()))
    configmap = yaml.safe_load((ROOT / "deploy/kubernetes/worker/configmap.yaml").read_text())
    snippets.append(("deploy/kubernetes/worker/configmap.yaml", configmap["data"]["luigi.cfg"]))
    # (glob matches the dot file .gitlab-ci.yml as well)
    for path in sorted((ROOT / "deploy/ci").glob("*.yml")):
        # YAML anchors repeat a step; each distinct heredoc is one snippet.
        found = {
            textwrap.dedent(heredoc.group(1))
            for text in _strings(yaml.safe_load(path.read_text()))
            for heredoc in re.finditer(r"<<'CFG'\n(.*?)\n\s*CFG\b", text, flags=re.DOTALL)
        }
        assert found, f"{path}: no luigi.cfg heredoc"
        snippets += [(str(path.relative_to(ROOT)), text) for text in sorted(found)]
    return snippets


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _read_with_luigi(text: str) -> LuigiConfigParser:
    """Luigi's own parser, as a worker reads luigi.cfg: no inline comment prefixes, ${ENV}
    interpolation."""
    parser = LuigiConfigParser()
    parser.read_string(text)
    return parser


SNIPPETS = _luigi_cfg_snippets()


@pytest.mark.parametrize(("where", "text"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_luigi_cfg_snippet_is_read_by_luigi_and_accepted(
    where: str, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each snippet, read by Luigi's parser, passes the client's validator, and its token_source
    builds a real token source (no comment text glued onto a value)."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/luigi-worker@etl.service")
    section = dict(_read_with_luigi(text).items("luigi_creds"))
    for key, value in section.items():
        assert not re.search(r"\s[;#]", value), f"{where}: {key} = {value!r} carries a comment"
    settings = ClientSettings.from_mapping(section)
    assert settings.broker_url.startswith("https://"), where
    # The CA file and Okta key exist on the target host, not here; the source is what matters.
    settings = dataclasses.replace(settings, ca_bundle=None)
    environ = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "https://pipelines.actions.githubusercontent.com/x",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "bearer",
    }
    client = build_broker_client(settings, environ=environ)
    assert client is not None


def test_luigi_cfg_check_catches_an_inline_comment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is not vacuous: the old README form keeps the comment in the value."""
    text = "[luigi_creds]\nbroker_url = https://b.example\ntoken_source = gitlab  ; env:VAR\n"
    value = _read_with_luigi(text).get("luigi_creds", "token_source")
    assert value == "gitlab  ; env:VAR"
    with pytest.raises(IdentityError, match="token_source"):
        settings = ClientSettings.from_mapping(
            {"broker_url": "https://b.example", "token_source": value}
        )
        build_broker_client(settings, environ={})


def test_readme_luigi_cfg_section_names_the_documented_values() -> None:
    (ini,) = _blocks("ini")
    section = _read_with_luigi(ini)["luigi_creds"]
    assert section["broker_url"] == "https://broker.example.com"
    assert section["token_source"] == "gitlab"


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
