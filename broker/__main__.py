"""`luigi-creds-broker`: the broker's composition root and admin CLI.

The only place that reads the environment and files and builds clients (httpx, boto3, the audit
store); everything else receives its collaborators. Subcommands: serve, check-config, explain,
audit, sessions, dev.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.config import Config, ConfigError, load_config

log = logging.getLogger("broker")

EXIT_OK = 0
EXIT_DENIED = 1
EXIT_USAGE = 2


def _now() -> datetime:
    return datetime.now(UTC)


def _load(path: str | None) -> Config:
    if not path:
        raise SystemExit("error: --config broker.toml is required")
    return load_config(Path(path))


# -- serve ---------------------------------------------------------------------------------------


def build_app(config: Config) -> Any:
    """Wire the broker from config: the one place clients and stores are constructed."""
    import boto3
    import httpx

    from broker.app import Metrics, Readiness, create_app
    from broker.audit import open_store
    from broker.exchange import Exchanger
    from broker.issuers import IssuerRegistry
    from broker.mint.aws import AwsMinter
    from broker.openapi import OPENAPI
    from broker.policy import Policy

    metrics = Metrics()
    # NOTE: no redirects, short timeouts; issuers.py adds body caps and host pinning on top.
    http = httpx.Client(follow_redirects=False, timeout=httpx.Timeout(5.0), trust_env=False)
    issuers = IssuerRegistry(config.issuers, http, clock=_now, on_fetch=metrics.on_jwks_fetch)
    issuers.warm()
    audit = open_store(
        config.broker.audit_store,
        signing_key_path=config.broker.audit_key_file,
        salt_path=config.broker.audit_salt_file,
        clock=_now,
    )
    aws = None
    if any(g.aws for g in config.grants):
        sts = boto3.session.Session().client(
            "sts", region_name=config.aws.region, endpoint_url=config.aws.endpoint_url
        )
        aws = AwsMinter(sts)
    exchanger = Exchanger(config, Policy.compile(config), issuers, audit, aws=aws, clock=_now)

    def issuers_ready() -> None:
        missing = [name for name, ok in issuers.status().items() if not ok]
        if missing:
            raise RuntimeError("issuer keys not loaded")

    checks = {"issuers": issuers_ready, "audit": exchanger.check_audit}
    if aws is not None:
        checks["aws"] = aws.check_reachable
    return create_app(
        exchanger,
        readiness=Readiness(checks),
        metrics=metrics,
        max_body_bytes=config.broker.max_body_bytes,
        openapi=OPENAPI,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from broker import logs

    logs.configure(args.log_level)
    config = _load(args.config)
    host, _, port = config.broker.listen.rpartition(":")
    app = build_app(config)
    tls: dict[str, Any] = {}
    if config.broker.tls_cert_file and config.broker.tls_key_file:
        tls = {
            "ssl_certfile": str(config.broker.tls_cert_file),
            "ssl_keyfile": str(config.broker.tls_key_file),
        }
    log.info("listening", extra={"listen": config.broker.listen, "tls": bool(tls)})
    uvicorn.run(
        app,
        host=host.strip("[]"),
        port=int(port),
        log_config=None,
        access_log=False,
        server_header=False,
        **tls,
    )
    return EXIT_OK


# -- check-config and explain --------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.file or args.config
    if not path:
        print("error: give the policy file: check-config broker.toml", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(Path(path))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_DENIED
    print(f"{path}: ok ({len(config.issuers)} issuers, {len(config.grants)} grants)")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from broker.explain import explain

    config = _load(args.config)
    try:
        claims = json.loads(Path(args.claims).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read claims from {args.claims}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(claims, dict):
        print("error: the claims file must hold a JSON object", file=sys.stderr)
        return EXIT_USAGE
    text, allowed = explain(config, claims, grant=args.grant, issuer=args.issuer)
    print(text)
    return EXIT_OK if allowed else EXIT_DENIED


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luigi-creds-broker",
        description=(
            "Exchange CI and Okta OIDC tokens for short-lived AWS and Vault credentials, "
            "checked against a policy file and audited."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP broker")
    serve.add_argument("--config", required=True, help="policy file (broker.toml)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser(
        "check-config", help="validate a policy file and list every problem in it"
    )
    check.add_argument("file", nargs="?", help="policy file (broker.toml)")
    check.add_argument("--config", help="policy file, as for every other subcommand")
    check.set_defaults(func=cmd_check_config)

    explain = sub.add_parser(
        "explain",
        help="say offline why a token's claims would be allowed or denied a grant",
        description=(
            "Evaluate the policy against a JSON file of token claims, print the trace of every "
            "claim check and what would be minted. Exit 0 if allowed, 1 if denied."
        ),
    )
    explain.add_argument("--config", required=True, help="policy file (broker.toml)")
    explain.add_argument("--claims", required=True, help="JSON file with the token's claims")
    explain.add_argument("--grant", help="grant name (default: every grant)")
    explain.add_argument("--issuer", help="issuer name (default: found by the claims' iss)")
    explain.set_defaults(func=cmd_explain)

    from broker.audit import cli as audit_cli

    audit_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
