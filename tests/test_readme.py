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
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import botocore.configloader
import httpx
import pytest
import yaml
from luigi.configuration import LuigiConfigParser

from broker import __main__ as broker_cli
from broker.config_lint.broker_section import BROKER_KEYS
from broker.config_lint.grant_section import GRANT_KEYS
from broker.config_lint.issuer_section import ISSUER_KEYS
from broker.config_lint.vault_section import UPSTREAM_VAULT_KEYS
from broker.dev.processes import start_process
from luigi_creds import cli as client_cli
from luigi_creds.identity import IdentityError
from luigi_creds.luigi import (
    ClientSettings,
    ConfigError,
    CredentialsMixin,
    build_broker_client,
)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def _luigi_cfg_blocks() -> list[str]:
    return [b for b in _blocks("ini") if "[luigi_creds]" in b]


def _aws_config_blocks() -> list[str]:
    return [b for b in _blocks("ini") if "[profile " in b]


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
    snippets = [(f"README.md luigi.cfg block {n}", b) for n, b in enumerate(_luigi_cfg_blocks(), 1)]
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
    settings = settings.replace(ca_bundle=None)
    environ = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "https://pipelines.actions.githubusercontent.com/x",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "bearer",
    }
    client = build_broker_client(settings, environ=environ)
    assert client is not None


def test_luigi_cfg_check_catches_an_inline_comment() -> None:
    """The check above is not vacuous: the old README form keeps the comment in the value, and
    the client refuses it (at validation or at the latest when it builds the token source)."""
    text = "[luigi_creds]\nbroker_url = https://b.example\ntoken_source = gitlab  ; env:VAR\n"
    value = _read_with_luigi(text).get("luigi_creds", "token_source")
    assert value == "gitlab  ; env:VAR"
    with pytest.raises((ConfigError, IdentityError), match="token_source"):
        settings = ClientSettings.from_mapping(
            {"broker_url": "https://b.example", "token_source": value}
        )
        build_broker_client(settings, environ={})


def test_readme_luigi_cfg_section_names_the_documented_values() -> None:
    (ini,) = _luigi_cfg_blocks()
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


def _inline_commands() -> list[str]:
    """Commands written inline in the prose, e.g. `luigi-creds-broker sessions list --config ..`."""
    spans = re.findall(r"`(luigi-creds(?:-broker)? [^`]+)`", README)
    return sorted(set(spans))


@pytest.mark.parametrize("line", _command_lines() + _inline_commands())
def test_readme_command_lines_parse(line: str) -> None:
    """Every CLI line in the README parses with the real parser; make targets exist."""
    # Placeholders (<...>, G, CMD, ID) and $(...) substitutions stand for one argument each.
    argv = shlex.split(re.sub(r"<[^>]*>|\$\([^)]*\)|\b(?:G|CMD|ID)\b", "X", line))
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
        "broker": BROKER_KEYS,
        "issuer": ISSUER_KEYS,
        "grant": GRANT_KEYS,
        "upstream.vault": UPSTREAM_VAULT_KEYS,
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


# --- the README's commands, run for real against `luigi-creds-broker dev` ------------------------

BIN = Path(sys.executable).parent


@dataclasses.dataclass
class DevStack:
    state: dict[str, Any]
    env: dict[str, str]
    workdir: Path

    def substitute(self, line: str) -> str:
        """The README's placeholders, filled in the way the dev banner fills them."""
        line = (
            line.replace("<moto URL>", self.state["aws_endpoint_url"])
            .replace("<state dir>", self.state["state_dir"])
            .replace("<subject>", DEV_GITLAB_SUBJECT)
            .replace("<issuer>", "dev")  # the dev policy's one issuer
        )
        return re.sub(r"(?<![\w/.-])broker\.toml", self.state["config"], line)

    def run(
        self, line: str, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", line],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=ROOT,
            env={**self.env, **(env or {})},
        )


DEV_GITLAB_SUBJECT = "project_path:data-platform/etl:ref_type:branch:ref:main"


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """`luigi-creds-broker dev` exactly as the tour starts it; its default state file lives under
    XDG_RUNTIME_DIR, pointed at a private directory so the test never meets a user's stack."""
    workdir = tmp_path_factory.mktemp("readme-dev")
    runtime = workdir / "runtime"
    runtime.mkdir(mode=0o700)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LUIGI_", "VAULT_"))},
        "XDG_RUNTIME_DIR": str(runtime),
        "TMPDIR": str(workdir),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(workdir),
    }
    state_file = runtime / "luigi-creds-dev" / "state.json"
    process = start_process(
        [str(BIN / "luigi-creds-broker"), "dev"],
        log_path=workdir / "dev.log",
        ready=state_file.exists,
        env=env,
        timeout=180,
        cwd=ROOT,
    )
    try:
        state = json.loads(state_file.read_text())
        yield DevStack(state, env, workdir)
    finally:
        process.stop(grace=30)


def _tour_lines() -> list[str]:
    (tour,) = [b for b in _blocks("sh") if "luigi-creds-broker dev " in b]
    lines = [ln.split("  #", 1)[0].strip() for ln in tour.replace("\\\n", " ").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_readme_tour_runs_against_the_dev_stack(dev: DevStack) -> None:
    """The five-minute tour, line by line, in one shell environment as a user would type it."""
    env: dict[str, str] = {}
    ran = []
    for line in _tour_lines():
        if line.startswith("make install") or line == "luigi-creds-broker dev":
            continue  # the venv this suite runs in; the stack the fixture started
        line = dev.substitute(line)
        if line.startswith("export "):
            # Evaluate the assignment in bash (it may run `dev token`), keep the variables.
            done = dev.run(f"{line} && env -0", env)
            assert done.returncode == 0, done.stderr
            names = re.findall(r"(\w+)=", line.removeprefix("export "))
            values = dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)
            env.update({name: values[name] for name in names})
            continue
        done = dev.run(line, env)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        ran.append((line, done.stdout))
    assert env["LUIGI_CREDS_ID_TOKEN"].count(".") == 2
    outputs = dict(ran)
    whoami = next(out for line, out in ran if line.endswith(" whoami"))
    assert DEV_GITLAB_SUBJECT in whoami and "etl-writer" in whoami
    identity = next(out for line, out in ran if "sts get-caller-identity" in line)
    assert json.loads(identity)["Arn"].startswith("arn:aws:sts::")
    assert any("grant etl-writer: ALLOW" in out for out in outputs.values())


def _admin_lines() -> list[str]:
    (block,) = [b for b in _blocks("sh") if "audit verify --config broker.toml" in b]
    return [ln.split("  #", 1)[0].strip() for ln in block.splitlines() if ln.strip()]


def test_readme_admin_commands_run_against_the_dev_stack(dev: DevStack) -> None:
    """check-config (offline and --online against the stack's OpenBao and moto), audit verify,
    report, export and prune, sessions list and revoke: each as printed, on the dev policy."""
    # A session to list and revoke: one exchange by the tour's GitLab identity.
    token = dev.run("luigi-creds-broker dev token --preset gitlab").stdout.strip()
    exchanged = httpx.post(
        dev.state["broker_url"] + "/v1/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": "etl-writer",
        },
        timeout=60,
    )
    assert exchanged.status_code == 200, exchanged.text
    # check-config --online asks STS as the broker: in the broker's environment, which the dev
    # stack keeps in its state dir (moto enforces IAM, so any other key is refused).
    env_file = Path(dev.state["state_dir"]) / "broker.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    broker_aws = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    outputs = {}
    for line in _admin_lines():
        done = dev.run(f"cd {dev.workdir} && {dev.substitute(line)}", broker_aws)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        outputs[line.split(" --", 1)[0]] = done.stdout
    assert "vault: ok" in outputs["luigi-creds-broker check-config"]
    assert "aws: ok, the broker is arn:aws:" in outputs["luigi-creds-broker check-config"]
    assert outputs["luigi-creds-broker audit verify"].startswith("OK")
    assert "etl-writer" in outputs["luigi-creds-broker audit report"]
    exported = (dev.workdir / "audit.jsonl").read_text().splitlines()
    assert exported and all(json.loads(line) for line in exported)
    assert DEV_GITLAB_SUBJECT in outputs["luigi-creds-broker sessions list"]
    assert re.search(r"revoked [1-9]\d* session", outputs["luigi-creds-broker sessions revoke"])


def test_readme_aws_profile_runs_credential_process_under_awscli(dev: DevStack) -> None:
    """The `[profile etl]` block, read by the real AWS CLI, gets credentials from the broker."""
    (block,) = _aws_config_blocks()
    aws_config = dev.workdir / "aws-config"
    aws_config.write_text(block)
    # botocore's own parser (the one awscli uses) reads the snippet as the README shows it.
    parsed = botocore.configloader.raw_config_parse(str(aws_config))
    assert parsed["profile etl"]["credential_process"] == (
        "luigi-creds credential-process --grant etl-writer"
    )
    token = dev.run("luigi-creds-broker dev token --preset gitlab").stdout.strip()
    done = dev.run(
        "aws sts get-caller-identity --profile etl",
        {
            "AWS_CONFIG_FILE": str(aws_config),
            "AWS_SHARED_CREDENTIALS_FILE": str(dev.workdir / "no-credentials"),
            "AWS_ENDPOINT_URL": dev.state["aws_endpoint_url"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "LUIGI_CONFIG_PATH": dev.state["luigi_config"],
            "LUIGI_CREDS_ID_TOKEN": token,
        },
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["Arn"].startswith("arn:aws:sts::")
