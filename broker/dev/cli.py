"""`luigi-creds-broker dev` and `luigi-creds-broker dev token`: the local stack from a terminal.

Owns the command line of the development stack (`broker.dev.stack`): start it, print what a
client needs, wait for Ctrl-C or SIGTERM and stop everything; and mint a dev token from the running
stack's issuer, found through the state file. Talks to the dev issuer over loopback HTTP.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from broker.dev.claims import PRESETS
from broker.dev.stack import (
    AUDIENCE,
    TOKEN_VARIABLE,
    DevStack,
    DevStackError,
    DevState,
    default_state_file,
    read_state,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# How often the foreground `dev` checks that its children still run.
WATCH_SECONDS = 1.0


def register(subparsers: Any) -> None:
    """Add `dev` (and `dev token`) to the `luigi-creds-broker` parser."""
    dev = subparsers.add_parser(
        "dev",
        help="run a local issuer, OpenBao, moto and the broker for development",
        description=(
            "Start, on loopback, a local OIDC issuer, an OpenBao dev server, a moto server and "
            "the broker with a sample policy and SQLite audit; print what a client needs; stop "
            "everything on Ctrl-C. Every file lives in a private temp dir deleted at exit."
        ),
    )
    dev.add_argument(
        "--state-file",
        type=Path,
        help=f"where `dev token` finds the stack (default {default_state_file()})",
    )
    dev.add_argument("--port", type=int, default=0, help="broker port (default: a free one)")
    dev.add_argument(
        "--no-database",
        action="store_true",
        help="leave out the PostgreSQL-backed `warehouse` grant even if PostgreSQL answers",
    )
    dev.add_argument(
        "--keep",
        action="store_true",
        help="keep the state dir at exit (logs, audit DB; it also holds the AppRole secret id)",
    )
    dev.set_defaults(func=cmd_dev)
    actions = dev.add_subparsers(dest="dev_action", metavar="ACTION")
    token = actions.add_parser(
        "token",
        help="mint a dev token from the running stack's issuer",
        description=(
            "Print a signed token with the claims of a CI system or Okta. --claim k=v sets a "
            "string claim, k:=JSON any JSON value (k:=null removes the claim)."
        ),
    )
    token.add_argument("--preset", choices=PRESETS, default="gitlab")
    token.add_argument("--claim", action="append", default=[], metavar="K=V", help="repeatable")
    token.add_argument("--issuer-url", help="the dev issuer (default: from the state file)")
    # A distinct dest: argparse lets a subparser's default overwrite the parent's value.
    token.add_argument("--state-file", dest="token_state_file", type=Path)
    token.add_argument("--audience", default=AUDIENCE)
    token.add_argument("--ttl", type=int, default=300, help="seconds (default 300)")
    token.add_argument("--alg", choices=("RS256", "ES256"), default="RS256")
    token.set_defaults(func=cmd_token)


def parse_claims(pairs: list[str]) -> dict[str, Any]:
    """`k=v` as a string claim, `k:=json` as any JSON value; ValueError names a bad pair."""
    claims: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--claim {pair!r}: expected NAME=VALUE or NAME:=JSON")
        if name.endswith(":"):
            try:
                claims[name[:-1]] = json.loads(value)
            except ValueError:
                raise ValueError(f"--claim {pair!r}: not JSON after :=") from None
        else:
            claims[name] = value
    return claims


def mint_token(
    issuer_url: str,
    preset: str,
    claims: dict[str, Any],
    *,
    audience: str = AUDIENCE,
    ttl: int = 300,
    alg: str = "RS256",
) -> str:
    """POST /token at the dev issuer and return the signed token."""
    if not issuer_url.startswith("http://127.") and not issuer_url.startswith("http://[::1]"):
        # The dev issuer only ever listens on loopback (broker.dev.issuer refuses otherwise).
        raise ValueError(f"{issuer_url} is not a loopback dev issuer")
    body = {"preset": preset, "audience": audience, "ttl": ttl, "alg": alg, "claims": claims}
    request = urllib.request.Request(  # noqa: S310 (loopback http checked above)
        issuer_url.rstrip("/") + "/token",
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return str(json.load(response)["token"])


def cmd_token(args: argparse.Namespace) -> int:
    try:
        claims = parse_claims(args.claim)
        issuer_url = args.issuer_url
        if issuer_url is None:
            issuer_url = read_state(args.token_state_file or default_state_file()).issuer_url
        print(
            mint_token(
                issuer_url, args.preset, claims, audience=args.audience, ttl=args.ttl, alg=args.alg
            )
        )
    except (DevStackError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, urllib.error.URLError) as exc:
        print(f"error: the dev issuer did not answer: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def banner(state: DevState, state_file: Path, *, keep: bool = False) -> str:
    """What a client needs, as printed once the stack is up."""
    grants = ", ".join(state.grants)
    where = "" if state_file == default_state_file() else f" --state-file {state_file}"
    mint = f"luigi-creds-broker dev token{where}"
    fate = "keeps" if keep else "deletes"
    section = textwrap.indent(Path(state.luigi_config).read_text(encoding="utf-8"), "  ")
    return f"""
luigi-creds dev stack is up. Ctrl-C stops everything and {fate} {state.state_dir}

  broker       {state.broker_url}
  OIDC issuer  {state.issuer_url}   (presets: {", ".join(PRESETS)}; audience {AUDIENCE})
  OpenBao      {state.vault_addr}
  moto (AWS)   {state.aws_endpoint_url}   (bucket s3://{state.bucket})
  policy       {state.config}
  grants       {grants}
  state file   {state_file}

luigi.cfg (written to {state.luigi_config}):
{section}
In a client shell (one exchange spends a CI token: mint a fresh one per job):
  export AWS_ENDPOINT_URL={state.aws_endpoint_url} AWS_DEFAULT_REGION=us-east-1
  export VAULT_ADDR={state.vault_addr}
  export {TOKEN_VARIABLE}="$({mint} --preset gitlab)"
  luigi-creds --config {state.luigi_config} whoami
  luigi-creds --config {state.luigi_config} exec --grant etl-writer -- aws s3 ls s3://{state.bucket}
  {TOKEN_VARIABLE}="$({mint})" luigi-creds --config {state.luigi_config} \\
      exec --grant etl-vault -- bao kv get secret/etl/db

Other identities: {mint} --preset github|bitbucket|okta [--claim NAME=VALUE ...]
Audit: luigi-creds-broker audit report --config {state.config}
"""


def cmd_dev(args: argparse.Namespace) -> int:
    state_file: Path = args.state_file or default_state_file()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stack = DevStack(
        state_file=state_file,
        broker_port=args.port,
        database=not args.no_database,
        keep=args.keep,
        say=lambda line: print(f"dev: {line}", flush=True),
    )
    status = EXIT_OK
    try:
        state = stack.start()
        print(banner(state, state_file, keep=args.keep), flush=True)
        while not stop.wait(WATCH_SECONDS):
            dead = stack.dead_parts()
            if dead:
                print(f"dev: {', '.join(dead)} exited; stopping", file=sys.stderr, flush=True)
                for name in dead:
                    print(stack.log_tail(name), file=sys.stderr)
                status = EXIT_FAILED
                break
    except (DevStackError, RuntimeError, OSError) as exc:
        print(f"error: the dev stack did not start: {exc}", file=sys.stderr)
        status = EXIT_FAILED
    finally:
        print("dev: stopping the broker, moto, OpenBao and the issuer", flush=True)
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("dev: stopped", flush=True)
    return status
