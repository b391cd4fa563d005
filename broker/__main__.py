"""`luigi-creds-broker`: the broker's composition root and admin CLI.

The only place that reads the environment and files and builds clients (httpx, boto3, the audit
store); everything else receives its collaborators. Subcommands: serve, check-config, explain,
audit, sessions, dev.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.audit.key_files import (
    UnsignedAuditRefused,
    accessor_salt_path,
    checkpoint_key_path,
    required_checkpoint_key_path,
)
from broker.background import Periodic
from broker.config import Config, ConfigError
from broker.config_lint import load_config
from broker.loopback import is_loopback_host
from broker.sealing import RefSealer

if TYPE_CHECKING:
    from broker.audit.store import AuditLedger
    from broker.mint.aws import StsLocation
    from broker.mint.grants import GrantMinter

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


def _sts_client(config: Config) -> Any:
    """A boto3 STS client, for the admin commands."""
    return _sts_session_client(config)[1]


# boto3's default would be 60 s to connect and 60 s to read: an exchange waiting that long has
# lost its caller long before.
_STS_TIMEOUT = 10.0
# How often a SQLite store's WAL is checkpointed (broker/storage.py, checkpoint_in_background).
WAL_CHECKPOINT_SECONDS = 1.0


def _sts_http(config: Config, where: StsLocation | None = None) -> Any:
    """The signed STS client every AWS exchange uses; boto3 resolves the broker's credentials
    (its default chain) and the regional endpoint once, here. `where`: a grant's own region,
    endpoint or profile (broker/mint/aws.py StsLocation), else [upstream.aws]."""
    from broker.mint.sts_http import StsHTTP

    session, client = _sts_session_client(config, where)
    # The session keeps the credentials once found (and refreshes refreshable ones).
    return StsHTTP(
        client.meta.endpoint_url,
        client.meta.region_name,
        session.get_credentials,
        timeout=_STS_TIMEOUT,
    )


def _sts_client_at(config: Config, where: StsLocation) -> Any:
    """A boto3 STS client for a grant's location (see `_sts_session_client`)."""
    return _sts_session_client(config, where)[1]


def _sts_session_client(config: Config, where: StsLocation | None = None) -> tuple[Any, Any]:
    """A boto3 session and STS client for a grant's own region, endpoint and/or profile
    (broker/mint/aws.py), each else [upstream.aws]'s; `where` None: [upstream.aws] itself.

    The endpoint is the grant's, else [upstream.aws].endpoint_url when the grant stays in the
    upstream region's partition (a private endpoint or a test server), else the region's own
    (boto3 knows aws-cn's and aws-us-gov's hosts). The broker's own AWS identity comes from
    boto3's default chain (env, instance profile, ...) unless the grant names a profile."""
    import boto3

    from broker.config import AWS_PARTITIONS

    region = (where and where.region) or config.aws.region

    def partition(name: str) -> str:
        return next((p for p, pre in AWS_PARTITIONS.items() if pre and name.startswith(pre)), "aws")

    endpoint = where.endpoint_url if where else None
    if endpoint is None and partition(region) == partition(config.aws.region):
        endpoint = config.aws.endpoint_url
    session = boto3.session.Session(profile_name=where.profile if where else None)
    return session, session.client("sts", region_name=region, endpoint_url=endpoint)


def build_minter(config: Config, hash_ref: Callable[[str], str]) -> GrantMinter:
    """The AWS and Vault minters the policy needs, and nothing it does not."""
    from broker.mint.aws import AwsMinter
    from broker.mint.grants import GrantMinter
    from broker.mint.vault import VaultMinter

    aws = None
    if any(g.aws for g in config.grants):
        aws = AwsMinter(_sts_http(config), lambda where: _sts_http(config, where))
    vault = None
    if config.vault is not None and any(g.vault for g in config.grants):
        vault = VaultMinter(config.vault, clock=_now)
    return GrantMinter(aws=aws, vault=vault, hash_ref=hash_ref, clock=_now)


def _vault_readiness(config: Config, vault: Any, active: Any) -> Callable[[], None]:
    """Vault answers and our login works, then: our token may do what the grants need (the
    grants of the policy in force: a reload that adds a grant is checked from then on)."""
    from broker.upstream_check import VaultPermissionCheck

    permissions = VaultPermissionCheck(config, vault.identity.token)
    active.subscribe(lambda loaded: permissions.policy_changed(loaded.config))

    def check() -> None:
        vault.check_ready()
        permissions()

    return check


def reconcile_dangling(audit: AuditLedger) -> int:
    """Close intents a crash left without a terminal record (a gap in the ledger is never
    silent)."""
    from broker.audit.events import Outcome

    dangling = audit.dangling_intents()
    for intent in dangling:
        audit.append(
            dataclasses.replace(
                intent,
                time=_now(),
                outcome=Outcome.RECONCILED,
                # The process died between intent and terminal record: the credential, if one
                # was minted, never left the process, but it may exist upstream (CloudTrail or
                # Vault metadata carry the request id to check).
                reason="issued_unknown_delivery",
            )
        )
    if dangling:
        log.warning("reconciled dangling intents", extra={"count": len(dangling)})
    return len(dangling)


def build_app(config: Config) -> Any:
    """Wire the broker from config: the one place clients and stores are constructed."""
    import httpx

    from broker.app import Readiness, create_app
    from broker.audit import open_store
    from broker.dpop import DpopGuard, NonceSource
    from broker.exchange import Exchanger
    from broker.issuers import IssuerRegistry
    from broker.metrics import Metrics, now_active
    from broker.openapi import OPENAPI
    from broker.policy import Policy
    from broker.policy_reload import ActivePolicy, LoadedPolicy, PolicyMetrics, read_policy
    from broker.revocation import SessionEnder
    from broker.sessions import open_state
    from broker.storage import Database, StoreUnavailable

    metrics = Metrics()
    # The policy in force starts as the file's current bytes (hashed for the audit); a policy
    # built in memory (no file) is served as is and never reloaded.
    policy_file = Path(config.source)
    if policy_file.is_file():
        loaded = read_policy(policy_file, _now)
        config = loaded.config
    else:
        loaded = LoadedPolicy(config, Policy.compile(config), "", _now())
    active = ActivePolicy(loaded)
    # NOTE: no redirects, short timeouts; issuers.py adds body caps and host pinning on top.
    http = httpx.Client(follow_redirects=False, timeout=httpx.Timeout(5.0), trust_env=False)
    issuers = IssuerRegistry(config.issuers, http, clock=_now, on_fetch=metrics.on_jwks_fetch)
    issuers.warm()
    # One store for the audit ledger, the replay ledger and the sessions: their writes share
    # transactions and one group-committing writer.
    database = Database.open(config.broker.audit_store)
    audit = open_store(
        database,
        signing_key_path=required_checkpoint_key_path(config.broker),
        salt_path=accessor_salt_path(config.broker),
        clock=_now,
    )
    reconcile_dangling(audit)
    replay, sessions = open_state(database, sealer=RefSealer(audit.accessor_salt()))
    minter = build_minter(config, audit.hash_ref)
    minter.observe = metrics.on_upstream
    database.on_write = metrics.on_store_write
    database.on_batch = metrics.on_store_batch
    metrics.watch(
        active_sessions=now_active(sessions.count_active, _now), key_ages=issuers.key_ages
    )
    ender = SessionEnder(sessions, minter, audit, hash_ref=audit.hash_ref, clock=_now)
    exchanger = Exchanger(
        config,
        loaded.policy,
        issuers,
        audit,
        minter=minter,
        replay=replay,
        sessions=sessions,
        ender=ender,
        clock=_now,
        # Nonces checkable by every replica on this store; proof jtis in the shared replay ledger.
        dpop=DpopGuard(replay, NonceSource.from_store(database), leeway=config.broker.leeway),
        active=active,
    )
    reloader = _policy_reloader(policy_file, active, audit, minter, PolicyMetrics(metrics.registry))

    def issuers_ready() -> None:
        missing = [name for name, ok in issuers.status().items() if not ok]
        if missing:
            raise RuntimeError("issuer keys not loaded")

    checks: dict[str, Callable[[], None]] = {
        "issuers": issuers_ready,
        "audit": exchanger.check_audit,
    }
    checks.update(minter.readiness_checks())
    if minter.vault is not None:
        checks["vault"] = _vault_readiness(config, minter.vault, active)

    # The tally of unauthenticated refusals is written once per window, even when junk stops.
    flusher = Periodic("denial-flusher", lambda _: exchanger.flush_denials())
    flusher.start(config.broker.denial_tally_seconds)
    # SQLite: the WAL is checkpointed here, once a second, not inside a request's commit.
    checkpointer = Periodic("wal-checkpoint", lambda _: database.checkpoint_wal())
    if database.checkpoint_in_background():
        checkpointer.start(WAL_CHECKPOINT_SECONDS)

    def shutdown() -> None:
        if reloader is not None:
            reloader.stop()
        # The last window of unauthenticated refusals is written before the final checkpoint.
        flusher.stop()
        checkpointer.stop()
        exchanger.flush_denials()
        # A signed checkpoint at a clean stop covers the records since the last one, which
        # otherwise only the hash chain protects (see broker/audit/ledger.py).
        try:
            audit.checkpoint()
        except StoreUnavailable:
            log.error("no checkpoint at shutdown: audit store unavailable")
        database.close()
        http.close()

    details = {"policy": reloader.status} if reloader is not None else {}
    return create_app(
        exchanger,
        readiness=Readiness(checks, details),
        metrics=metrics,
        max_body_bytes=config.broker.max_body_bytes,
        openapi=OPENAPI,
        on_shutdown=shutdown,
    )


def _policy_reloader(
    path: Path, active: Any, audit: AuditLedger, minter: GrantMinter, metrics: Any
) -> Any:
    """Audit the policy in force, then watch its file (SIGHUP or a change on disk reloads it).

    None for a policy built in memory: there is no file to watch."""
    from broker.policy_reload import PolicyReloader

    if not active.current.sha256:
        return None

    def can_mint(grant: Any) -> str | None:
        if grant.aws is not None and not minter.mints_aws:
            return "an aws grant needs a restart: the broker started without AWS grants"
        if grant.vault is not None and minter.vault is None:
            return "a vault grant needs a restart: the broker started without Vault grants"
        return None

    reloader = PolicyReloader(
        path,
        active,
        audit,
        _now,
        metrics=metrics,
        can_mint=can_mint,
        stamp=audit.stamp_policy,
    )
    reloader.announce()
    reloader.start()
    # SIGHUP reloads at once; the handler only wakes the watcher thread.
    on_sighup(reloader.request_reload)
    return reloader


# What SIGHUP does: every reload registered here (the policy file, the TLS certificate). One
# handler for all, so registering one reload never replaces another's.
_SIGHUP_ACTIONS: list[Callable[[], None]] = []


def on_sighup(action: Callable[[], None]) -> None:
    """Run `action` on SIGHUP (it must be signal-safe: set an event and return)."""
    _SIGHUP_ACTIONS.append(action)

    def handler(signum: int, frame: object) -> None:
        for registered in _SIGHUP_ACTIONS:
            registered()

    # Installed in the main thread before uvicorn runs (it handles SIGINT and SIGTERM only).
    with contextlib.suppress(ValueError):  # not the main thread (an embedding test): poll only
        signal.signal(signal.SIGHUP, handler)


def cmd_serve(args: argparse.Namespace) -> int:
    import ssl

    import uvicorn

    from broker import logs
    from broker.cpu import run_on_one_cpu
    from broker.tls import CertificateReloader

    logs.configure(args.log_level)
    # `kill -USR1 <pid>` prints every thread's stack to stderr (code locations only, no values):
    # how an operator sees where a hung request waits.
    faulthandler.register(signal.SIGUSR1)
    config = _load(args.config)
    try:
        required_checkpoint_key_path(config.broker)
    except UnsignedAuditRefused as exc:
        log.error("refusing to start", extra={"reason": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    host, _, port = config.broker.listen.rpartition(":")
    if config.broker.single_cpu:
        # Before build_app starts the background threads (they would inherit it anyway).
        cpu = run_on_one_cpu()
        if cpu is not None:
            log.info("running on one CPU", extra={"cpu": cpu})
    app = build_app(config)
    settings = config.broker
    reloader: CertificateReloader | None = None

    def tls_context(server_config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        # uvicorn's own context, kept by a reloader that renews its certificate in place.
        nonlocal reloader
        assert settings.tls_cert_file is not None and settings.tls_key_file is not None
        context = default()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        reloader = CertificateReloader(context, settings.tls_cert_file, settings.tls_key_file)
        return context

    tls = settings.tls_cert_file is not None and settings.tls_key_file is not None
    if not tls and not is_loopback_host(host):
        # Allowed by plain_http_behind_proxy only (config validation refuses it otherwise).
        message = (
            f"SERVING PLAIN HTTP on {settings.listen}: tokens and credentials cross the network "
            "unencrypted unless the TLS-terminating proxy in trusted_proxies is the only way in"
        )
        log.warning(message)
        print(f"WARNING: {message}", file=sys.stderr)
    log.info("listening", extra={"listen": settings.listen, "tls": tls})
    proxies = list(settings.trusted_proxies)
    server_config = uvicorn.Config(
        app,
        host=host.strip("[]"),
        port=int(port),
        log_config=None,
        access_log=False,
        server_header=False,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 (or $FORWARDED_ALLOW_IPS) by default;
        # the audited client address must come from the socket unless a proxy is configured.
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or [],
        ssl_certfile=str(settings.tls_cert_file) if tls else None,
        ssl_keyfile=str(settings.tls_key_file) if tls else None,
        ssl_context_factory=tls_context if tls else None,
    )
    server_config.load()
    if reloader is not None:
        watched = reloader
        log.info("serving TLS certificate", extra={"serving": watched.served})
        watched.start(interval=settings.tls_reload_seconds)
        # SIGHUP: reload now (the handler only wakes the reloader's thread).
        on_sighup(watched.request_reload)
    try:
        uvicorn.Server(server_config).run()
    finally:
        if reloader is not None:
            reloader.stop()
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
    try:
        key = required_checkpoint_key_path(config.broker)
    except UnsignedAuditRefused as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return EXIT_DENIED
    print(f"{path}: ok ({len(config.issuers)} issuers, {len(config.grants)} grants)")
    if config.broker.audit_key_file is None:
        print(f"audit checkpoints: signed with {key} (created 0600 on first start)")
    if args.online:
        return EXIT_OK if _check_upstreams_online(config) else EXIT_DENIED
    return EXIT_OK


def _check_upstreams_online(config: Config) -> bool:
    """Ask Vault and AWS whether the broker's identities can do what the grants need; print
    one line per finding. True when nothing is missing."""
    from botocore.exceptions import BotoCoreError, ClientError

    from broker.logs import scrub
    from broker.mint import UpstreamError
    from broker.upstream_check import AWS_UNCHECKABLE, VaultPermissionCheck, aws_identity

    ok = True
    minter = build_minter(config, hash_ref=lambda ref: ref)
    if minter.vault is not None:
        check = VaultPermissionCheck(config, minter.vault.identity.token)
        try:
            minter.vault.check_ready()
            problems = check.problems()
        except UpstreamError as exc:
            problems = [f"Vault login or health failed ({exc.reason}): {exc.detail or '-'}"]
        for problem in problems:
            print(f"vault: MISSING {scrub(problem)}")
        for note in check.notes:
            print(f"vault: note {note}")
        if not problems:
            print("vault: ok, the broker's token has every capability its grants need")
        ok = ok and not problems
    if any(g.aws for g in config.grants):
        try:
            print(f"aws: ok, the broker is {aws_identity(_sts_client(config))}")
        except (ClientError, BotoCoreError) as exc:
            print(f"aws: FAIL sts:GetCallerIdentity: {scrub(str(exc))}")
            ok = False
        print(f"aws: not checked: {AWS_UNCHECKABLE}")
    return ok


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


# -- sessions ------------------------------------------------------------------------------------


def cmd_sessions(args: argparse.Namespace) -> int:
    from broker.audit import open_store
    from broker.revocation import SessionEnder
    from broker.sessions import open_state
    from broker.storage import Database

    config = _load(args.config)
    salt_path = accessor_salt_path(config.broker)
    if salt_path is None:
        # Only a PostgreSQL store without audit_key_file gets here, which `serve` refuses too.
        print("error: set [broker] audit_salt_file (or audit_key_file)", file=sys.stderr)
        return EXIT_USAGE
    database = Database.open(config.broker.audit_store)
    audit = open_store(
        database,
        signing_key_path=checkpoint_key_path(config.broker),
        salt_path=salt_path,
        clock=_now,
    )
    _, sessions = open_state(database, sealer=RefSealer(audit.accessor_salt()))
    now = _now()
    if args.action == "list":
        rows = sessions.list(
            active_only=not args.all, subject=args.subject, issuer=args.issuer, now=now
        )
        if args.json:
            print(json.dumps([_session_json(s) for s in rows], indent=2))
        else:
            print(f"{'SESSION':<28} {'ISSUER':<10} {'EXPIRES':<20} {'STATE':<16} SUBJECT")
            for s in rows:
                state = s.revoked_reason or ("active" if s.active(now) else "expired")
                expires = s.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                print(f"{s.id:<28} {s.issuer:<10} {expires:<20} {state:<16} {s.subject}")
        return EXIT_OK
    if not (args.session or args.subject or args.issuer):
        print("error: say which sessions: --session, --subject and/or --issuer", file=sys.stderr)
        return EXIT_USAGE
    minter = build_minter(config, audit.hash_ref)
    ender = SessionEnder(sessions, minter, audit, hash_ref=audit.hash_ref, clock=_now)
    ended = sessions.revoke(
        session_id=args.session,
        subject=args.subject,
        issuer=args.issuer,
        reason="operator_revoked",
        now=now,
    )
    request_id = "cli-" + now.strftime("%Y%m%dT%H%M%SZ")
    clean = all([ender.end(s, reason="operator_revoked", request_id=request_id) for s in ended])
    print(f"revoked {len(ended)} session(s)" + ("" if clean else "; some Vault revocations failed"))
    return EXIT_OK if clean else EXIT_DENIED


def _session_json(session: Any) -> dict[str, Any]:
    return {
        "id": session.id,
        "issuer": session.issuer,
        "subject": session.subject,
        "created_at": session.created_at.isoformat(),
        "expires_at": session.expires_at.isoformat(),
        "revoked_at": session.revoked_at.isoformat() if session.revoked_at else None,
        # RFC 7638 thumbprint of the DPoP key the session is bound to (RFC 9449 `cnf.jkt`).
        "key_thumbprint": session.key_thumbprint,
        "revoked_reason": session.revoked_reason,
    }


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
    check.add_argument(
        "--online",
        action="store_true",
        help="also ask Vault and AWS whether the broker's own identities can do what the "
        "grants need, and name what is missing",
    )
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

    sessions = sub.add_parser(
        "sessions",
        help="list or revoke refresh sessions",
        description=(
            "Refresh sessions are what a CI job holds after its one token exchange. Revoking one "
            "ends it at once and revokes every Vault token and lease it minted; AWS sessions, "
            "which STS cannot revoke, are marked revoked in the audit."
        ),
    )
    sessions.add_argument("action", choices=["list", "revoke"])
    sessions.add_argument("--config", required=True, help="policy file (broker.toml)")
    sessions.add_argument("--session", help="one session id (lcs_...)")
    sessions.add_argument("--subject", help="every session of this token subject")
    sessions.add_argument("--issuer", help="every session from this issuer name")
    sessions.add_argument("--all", action="store_true", help="list: include ended sessions")
    sessions.add_argument("--json", action="store_true", help="list: JSON output")
    sessions.set_defaults(func=cmd_sessions)

    from broker.audit import cli as audit_cli

    audit_cli.register(sub)
    from broker.dev import cli as dev_cli

    dev_cli.register(sub)
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
