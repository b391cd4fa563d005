"""The tenant-binding lint, segment by segment, over generated patterns.

Every tenant claim value has an owner segment (`octo` in `octo/app`, in sub
`repo:octo/app:ref:refs/heads/main`, in GitLab's `project_path:octo/app:...`). For each value
shape, every combination of literal and `*` segments is generated; a pattern binds a tenant
exactly when its owner segment is written out. Each verdict is checked against the matcher the
policy uses: a refused pattern does match a value whose owner an attacker chose, an accepted one
does not. A broker process given such a policy refuses to start.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from broker.config import ConfigError
from broker.config_lint import parse_config
from broker.dev.harness import run_broker_cli
from broker.patterns import glob_to_regex

ISSUER = """
[[issuer]]
name = "ci"
url = "https://ci.example.com"
audiences = ["luigi-creds"]
"""

# claim, value template ({owner} is the tenant), literal for each placeholder
SHAPES: list[tuple[str, str]] = [
    ("repository", "{owner}/{name}"),
    ("project_path", "{owner}/{name}"),
    ("project_path", "{owner}/{group}/{name}"),
    ("namespace_path", "{owner}/{group}"),
    ("sub", "repo:{owner}/{name}:ref:refs/heads/{branch}"),
    ("sub", "repo:{owner}/{name}:environment:{env}"),
    ("sub", "repo:{owner}/{name}:pull_request"),
    ("sub", "project_path:{owner}/{group}/{name}:ref_type:branch:ref:{branch}"),
    ("sub", "repository_owner:{owner}:environment:{env}"),
]
LITERALS = {
    "owner": "octo",
    "name": "etl",
    "group": "team",
    "branch": "main",
    "env": "prod",
}


def _cases() -> list[tuple[str, str, bool, str]]:
    """(claim, glob, owner written out, a value of the same shape owned by an attacker)."""
    cases = []
    for claim, template in SHAPES:
        fields = re.findall(r"\{(\w+)\}", template)
        for wild in itertools.product((False, True), repeat=len(fields)):
            glob = template.format(
                **{f: "*" if w else LITERALS[f] for f, w in zip(fields, wild, strict=True)}
            )
            attacker = template.format(**{**LITERALS, "owner": "attacker-org"})
            cases.append((claim, glob, not wild[fields.index("owner")], attacker))
    return cases


CASES = _cases()


def _lint(claim: str, glob: str, value: str | None = None) -> list[str]:
    """The loader's problems for one grant matching `claim` to `glob` (or a TOML `value`)."""
    text = (
        ISSUER
        + '[[grant]]\nname = "g"\nissuers = ["ci"]\n[grant.match]\n'
        + f"{claim} = {value or chr(34) + glob + chr(34)}\n"
        + '[grant.aws]\nrole_arn = "arn:aws:iam::123456789012:role/r"\n'
    )
    try:
        parse_config(text, source="broker.toml")
    except ConfigError as exc:
        return [p.message for p in exc.problems]
    return []


def test_generated_cases_cover_both_verdicts() -> None:
    """The generator yields both kinds for every shape (guards against an empty table)."""
    assert len(CASES) == sum(2 ** len(re.findall(r"\{", t)) for _, t in SHAPES) == 60
    assert {bound for *_, bound, _ in CASES} == {True, False}


@pytest.mark.parametrize(
    ("claim", "glob", "owner_written", "attacker"),
    CASES,
    ids=[f"{c}={g}" for c, g, *_ in CASES],
)
def test_a_tenant_glob_binds_exactly_when_its_owner_segment_is_written(
    claim: str, glob: str, owner_written: bool, attacker: str
) -> None:
    """Refused iff the owner segment is a wildcard; the verdict agrees with the matcher."""
    problems = _lint(claim, glob)
    if owner_written:
        assert problems == [], problems
        assert not re.fullmatch(glob_to_regex(glob), attacker)
    else:
        assert any("no tenant-binding claim" in p and "owner" in p for p in problems), problems
        assert re.fullmatch(glob_to_regex(glob), attacker), (glob, attacker)


@pytest.mark.parametrize(
    ("claim", "regex"),
    [
        ("repository", "[^/]+/[^/]+"),
        ("repository", "[a-z-]+/[a-z]+"),
        ("project_path", "[^/]+/[^/]+/[^/]+"),
        ("sub", "repo:[^/]+/[^/]+:ref:refs/heads/[a-z]+"),
        ("sub", "repo:[^/]+/[^/]+:environment:[^/]+"),
        ("sub", "project_path:[^/]+(/[^/]+)+:ref_type:[a-z]+:ref:[^/]+"),
    ],
)
def test_a_regex_matching_every_value_of_a_shape_binds_nothing(claim: str, regex: str) -> None:
    """Regexes are probed with attacker-chosen values of every shape of the claim."""
    problems = _lint_regex(claim, regex)
    assert any("no tenant-binding claim" in p and "matches every value" in p for p in problems)


@pytest.mark.parametrize(
    ("claim", "regex"),
    [
        ("repository", "octo/[^/]+"),
        ("sub", "repo:octo/[^/]+:ref:refs/heads/[a-z]+"),
        ("project_path", "octo/(team|ops)/[^/]+"),
    ],
)
def test_a_regex_naming_the_owner_binds(claim: str, regex: str) -> None:
    assert _lint_regex(claim, regex) == []


def _lint_regex(claim: str, regex: str) -> list[str]:
    return _lint(claim, glob="", value=f"{{ regex = '{regex}' }}")


def test_a_broker_with_an_owner_wildcard_refuses_to_start(tmp_path: Path) -> None:
    """`luigi-creds-broker serve` and `check-config` exit non-zero on repository = "*/*" and
    name the reason; nothing listens."""
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\naudit_store = "sqlite:///{tmp_path / "audit.db"}"\n'
        + ISSUER
        + '[[grant]]\nname = "g"\nissuers = ["ci"]\n[grant.match]\nrepository = "*/*"\n'
        + '[grant.aws]\nrole_arn = "arn:aws:iam::123456789012:role/r"\n',
        encoding="utf-8",
    )
    for command in (["check-config", str(config)], ["serve", "--config", str(config)]):
        result = run_broker_cli(*command)
        assert result.returncode != 0, command
        assert "wildcard where the owner is named" in result.stdout + result.stderr, command
    assert not (tmp_path / "audit.db").exists()
