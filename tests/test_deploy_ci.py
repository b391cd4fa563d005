"""deploy/ci: the GitLab, GitHub and Bitbucket examples ask for tokens the broker accepts and
run `luigi-creds` lines its CLI parses."""

from __future__ import annotations

import warnings

import yaml

from broker.config import Config
from broker.config_lint import load_config

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range (ours do; the test
    # process has none), and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)

    from luigi_creds.cli import build_parser as client_parser
    from luigi_creds.identity import DEFAULT_GITLAB_VARIABLE
    from luigi_creds.luigi import ClientSettings

from deploy_files import (
    CI,
    SYSTEMD,
    commands,
    grant,
    heredoc_cfg,
    luigi_creds_section,
)


def ci_settings(script: str) -> ClientSettings:
    return ClientSettings.from_mapping(luigi_creds_section(heredoc_cfg(script)))


def check_ci_commands(script: str, config: Config) -> None:
    """The script runs a Luigi pipeline (on its own or under `luigi-creds exec`), and each
    `luigi-creds` call parses with our CLI."""
    calls = commands(script, "luigi-creds")
    assert calls
    under_exec = [argv[argv.index("--") + 1 :] for argv in calls if "--" in argv]
    assert commands(script, "luigi") or any(c[:1] == ["luigi"] for c in under_exec), "no luigi"
    for argv in calls:
        args = client_parser().parse_args(argv)
        for name in getattr(args, "grant", None) or []:
            grant(config, name)


def summary_of_luigi_run(script: str) -> str | None:
    """The --summary file of the `luigi-creds exec` that runs the Luigi pipeline."""
    for argv in commands(script, "luigi-creds"):
        if argv[:1] == ["exec"] and argv[argv.index("--") + 1 :][:1] == ["luigi"]:
            summary = client_parser().parse_args(argv).summary
            return None if summary is None else str(summary)
    raise AssertionError("no luigi run under luigi-creds exec")


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
    # The job summary exec writes is kept as an artifact, also when the pipeline fails (that is
    # when one wants to know which keys it held).
    assert job["artifacts"]["when"] == "always"
    assert job["artifacts"]["paths"] == [summary_of_luigi_run(script)]


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
    # GitHub shows the summary from $GITHUB_STEP_SUMMARY: no file needed.
    assert summary_of_luigi_run(script) is None


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
    # The job summary file exec writes is the step's artifact.
    assert step["artifacts"] == [summary_of_luigi_run(script)]
