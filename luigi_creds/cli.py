"""`luigi-creds`: credentials for commands and the AWS CLI, outside a Luigi task.

Owns the client's command line and is its composition root: it reads `[luigi_creds]` (Luigi's
config files, or `--config`) and the process environment, and builds the broker client. Talks to
the broker (or to an already running job agent, if `LUIGI_CREDS_AGENT_URL` is set) and starts
child processes. Never prints a secret except where the AWS `credential_process` protocol demands
it (on stdout, to the AWS SDK that asked).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from luigi_creds.agent_client import AgentClient, AgentEndpoint
from luigi_creds.childenv import PRELOAD_VARIABLE, child_env, with_preload
from luigi_creds.client import AwsCredentials, BrokerClient, BrokerError
from luigi_creds.errors import LuigiCredsError
from luigi_creds.summary import (
    SUMMARY_FILE_ENV,
    from_json,
    publish,
    publish_summary,
    render_markdown,
)

__all__ = ["main"]

EPILOG = """\
configuration: the [luigi_creds] section of luigi.cfg (found the way Luigi finds it:
LUIGI_CONFIG_PATH, ./luigi.cfg, /etc/luigi/luigi.cfg) or of the file given with --config.
Luigi keeps text after a value as part of it, so comments go on lines of their own:

  [luigi_creds]
  broker_url = https://broker.example.com
  # env:VAR | file:PATH | gitlab | github | bitbucket | okta
  token_source = gitlab
  ca_bundle = /etc/ssl/internal-ca.pem
  # for [worker] task_process_context = luigi_creds.TaskCredentials
  aws_grant = etl-writer

(Luigi keeps everything after `=` as the value: put comments on their own lines.)

examples:
  luigi-creds exec --grant etl-writer -- aws s3 ls s3://bucket/
  luigi-creds exec --grant etl-writer -- luigi --module pipelines Nightly --workers 4
  luigi-creds credential-process --grant etl-writer     # in ~/.aws/config:
      [profile etl]
      credential_process = luigi-creds credential-process --grant etl-writer
  luigi-creds whoami

A CI token (GitLab, Bitbucket) is accepted by the broker once. Run several commands inside one
`luigi-creds exec` (or a Luigi job): they share its session through the local agent, and a
`credential-process` run under it reuses that session too.
"""


def _settings(args: argparse.Namespace) -> Any:
    """`[luigi_creds]` as Luigi reads it, plus `--config`. Luigi is imported only here:
    `credential-process` under an agent needs neither, and Luigi's import-time warning about
    [core] autoload_range is noise on this command line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import luigi.configuration

        from luigi_creds.luigi_config import from_luigi_config
    if args.config:
        luigi.configuration.add_config_path(args.config)  # type: ignore[no-untyped-call]
    return from_luigi_config()


def _broker_minter(args: argparse.Namespace) -> BrokerClient:
    from luigi_creds.agent import build_broker_client

    return build_broker_client(_settings(args), environ=os.environ)


def _minter(args: argparse.Namespace) -> Any:
    """The job's agent when running under one, else a direct broker session."""
    endpoint = AgentEndpoint.from_env(os.environ)
    if endpoint is not None:
        return AgentClient(endpoint)
    return _broker_minter(args)


def cmd_credential_process(args: argparse.Namespace) -> int:
    minter = _minter(args)
    cred = minter.mint(args.grant, args.task, args.duration)
    if not isinstance(cred, AwsCredentials):
        raise BrokerError(f"grant {args.grant!r} does not issue AWS credentials", error="usage")
    body = cred.credential_process()
    if isinstance(minter, BrokerClient) and not minter.token_source.renewable:
        # Run on its own with a one-shot CI token (GitLab, Bitbucket, env:), this process is the
        # only chance to exchange it: a second run is refused as a replay. With an Expiration,
        # botocore treats a 15-minute credential as due for refresh at once (its windows are
        # 15/10 minutes), reruns us on the next call and gives up 10 minutes before expiry. So
        # the credential is handed over as static, usable for its whole life; AWS refuses it
        # after that. Under `luigi-creds exec` or a job's agent, refreshes work and it stays.
        del body["Expiration"]
    print(json.dumps(body))
    return 0


def _log_mints_to_stderr() -> None:
    """exec's agent mints for everything the command runs: one line per mint on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("luigi_creds")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def cmd_exec(args: argparse.Namespace) -> int:
    """Run the command under one broker session, held here; the command gets a bearer for
    exec's grants only (it may hand its own tasks narrower ones, as a Luigi job does)."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("luigi-creds exec: give the command after --")
    _log_mints_to_stderr()
    # This process only serves the job's agent while the command runs: a short GIL switch
    # interval lets the thread answering a task's request run while another thread's mint
    # is busy (with the default, an answer could wait up to 5 ms per switch behind a mint).
    sys.setswitchinterval(0.0005)
    inherited = AgentEndpoint.from_env(os.environ)
    broker = None
    server = None
    settings = None
    if inherited is None:
        from luigi_creds.agent import build_broker_client, start_job_agent

        settings = _settings(args)
        broker = build_broker_client(settings, environ=os.environ)
        server = start_job_agent(broker)
        endpoint = server.start()
    else:
        endpoint = inherited
    try:
        client = AgentClient(endpoint)
        grants = list(dict.fromkeys(args.grant))
        # Each grant once, before the command starts: a refusal stops here, naming the grant.
        # The agent keeps an AWS credential for the command's SDKs to read, not to mint again.
        creds = [client.mint(grant, args.task, args.duration) for grant in grants]
        try:
            child = client.scoped(grants, None, delegate=True)
        except BrokerError as exc:
            if exc.status != 403:
                raise
            child = endpoint  # already a narrow bearer (a task's): hand on no more than it
        vault = settings.vault_addr if settings is not None else os.environ.get("VAULT_ADDR")
        env = child_env(os.environ, creds, child, args.task, vault_addr=vault)
        if args.no_preload:
            env[PRELOAD_VARIABLE] = "0"
        env = with_preload(env)
        try:
            process = subprocess.Popen(command, env=env)
        except OSError as exc:
            print(f"luigi-creds exec: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
            return 127
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            return process.wait()
    finally:
        if server is not None:
            # The job summary: exec owns the agent, so it knows every credential minted.
            if server.mint_log is not None:
                publish_summary(server.mint_log, os.environ, args.summary)
            server.stop()
        if broker is not None:
            try:
                broker.revoke()
            except BrokerError as exc:
                print(f"luigi-creds exec: revoking the session failed: {exc}", file=sys.stderr)


def cmd_summary(args: argparse.Namespace) -> int:
    """The job summary so far, from the job's agent (inside `luigi-creds exec` or a Luigi job):
    printed, or appended to $GITHUB_STEP_SUMMARY and/or written to --output."""
    endpoint = AgentEndpoint.from_env(os.environ)
    if endpoint is None:
        print(
            "luigi-creds summary: no job agent here; run it inside `luigi-creds exec` or a "
            "Luigi job (it asks the agent that holds the job's session)",
            file=sys.stderr,
        )
        return 2
    try:
        entries = from_json(AgentClient(endpoint).summary())
    except ValueError as exc:
        raise BrokerError(
            f"the job's agent sent a malformed summary: {exc}", error="invalid_response"
        ) from exc
    markdown = render_markdown(entries)
    if args.output is None and not os.environ.get("GITHUB_STEP_SUMMARY"):
        print(markdown)
        return 0
    for path in publish(markdown, os.environ, args.output):
        print(f"luigi-creds summary: wrote {path}", file=sys.stderr)
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    """Show where the identity comes from and its non-secret claims (the token is not spent)."""
    broker = _broker_minter(args)
    source = broker.token_source
    print(f"broker:       {broker.broker_url}")
    print(f"token source: {source.description}")
    token = source.token()
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        print("token:        not a JWT (opaque access token)")
        return 0
    shown = (
        "iss", "sub", "aud", "exp", "project_path", "project_id", "ref", "ref_protected",
        "pipeline_id", "repository", "repository_id", "workflow", "workspaceUuid",
        "repositoryUuid", "groups", "cid",
    )  # fmt: skip
    for key in shown:
        if isinstance(claims, dict) and key in claims:
            print(f"{key + ':':13} {json.dumps(claims[key])}")
    answer = broker.explain()
    print(f"broker says:  {answer.get('issuer')} / {answer.get('subject')}")
    grants = answer.get("grants") or []
    if not grants:
        print("grants:       none (ask the broker's operator to run `luigi-creds-broker explain`)")
    for grant in grants:
        kind = str(grant.get("issued_token_type", "")).rsplit(":", 1)[-1]
        print(f"grant:        {grant.get('name')}  ({kind}, ttl {grant.get('ttl')}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luigi-creds",
        description="Short-lived AWS and Vault credentials from the luigi-creds broker.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a luigi.cfg to read [luigi_creds] from")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", help="task id recorded in the broker's audit (default: none)")
        p.add_argument(
            "--duration", type=int, help="requested lifetime in seconds (capped by the grant)"
        )

    p = sub.add_parser(
        "exec",
        help="run a command with credentials for one or more grants",
        description="Run CMD with credentials: AWS grants through a local endpoint the AWS "
        "SDKs and CLI refresh from by themselves (AWS_CONTAINER_CREDENTIALS_FULL_URI); Vault "
        "tokens as VAULT_TOKEN; dynamic secrets as LUIGI_CREDS_<GRANT>_<FIELD>. Stray "
        "AWS_* credential variables are removed. CMD holds a bearer for these grants only; "
        "a Luigi job it runs with [worker] task_process_context = luigi_creds.TaskCredentials "
        "gives each task process a narrower one, for its own task. Each grant is minted once "
        "before CMD starts (a refusal stops here). The session is revoked when CMD exits, "
        "and CMD's exit status is returned.",
    )
    p.add_argument("--grant", action="append", required=True, help="grant name (repeatable)")
    common(p)
    p.add_argument(
        "--summary",
        type=Path,
        help="when CMD ends, write a Markdown summary of the job's credentials here (default: "
        f"${SUMMARY_FILE_ENV}); it is always appended to $GITHUB_STEP_SUMMARY when that is set",
    )
    p.add_argument(
        "--no-preload",
        action="store_true",
        help="do not preload luigi_creds' task-process modules into a Luigi job's scheduling "
        f"process (by default CMD's Python processes get a sitecustomize that does, once they "
        f"import luigi; the same as {PRELOAD_VARIABLE}=0)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser(
        "summary",
        help="Markdown summary of the job's credentials so far (inside exec or a Luigi job)",
        description="Ask the job's agent which credentials it minted (task, grant, key id, "
        "accessor or lease id, lifetime, request id; never a secret) and print them as "
        "Markdown, or append them to $GITHUB_STEP_SUMMARY and/or write them to --output.",
    )
    p.add_argument("--output", type=Path, help="write the Markdown to this file")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "credential-process",
        help="print AWS credentials in the credential_process format",
        description="Print one grant's AWS credentials as the JSON the AWS SDKs expect from "
        "credential_process (Version 1). Under `luigi-creds exec` or a Luigi job it mints "
        "through that job's session; otherwise it exchanges the configured token itself, and "
        "with a one-shot CI token (gitlab, bitbucket, env:) it prints no Expiration, because "
        "it could not be run again to refresh.",
    )
    p.add_argument("--grant", required=True, help="grant name")
    common(p)
    p.set_defaults(func=cmd_credential_process)

    p = sub.add_parser(
        "whoami",
        help="show the identity, and the grants the broker allows it (no secrets, token not spent)",
    )
    p.set_defaults(func=cmd_whoami)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LuigiCredsError as exc:
        print(f"luigi-creds: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
