"""Benchmark: our token exchange next to OpenBao's own JWT login, in one run, on one machine.

Owns the benchmark run: it starts, on loopback, the dev OIDC issuer, an OpenBao dev server, moto
and our broker (through broker.dev and the test suite's helpers in tests/), configures OpenBao's
JWT auth method and our broker with equivalent rules against the same issuer, checks that both
hand out the same Vault token (policies, TTL, what it reads), then drives both over HTTP with
pre-minted tokens and reports latency percentiles and throughput per scenario, and the ratio
ours/peer for every comparable pair. Talks to the issuer, OpenBao, moto and the broker over
loopback HTTP; hvac only to set OpenBao up (the throwaway dev server's root token) and for the
untimed equivalence check.

Scenarios (each in a sequential phase and a concurrent phase of C threads):
  vault_token      peer: POST /v1/auth/jwt/login at OpenBao -> a Vault token
                   ours: POST /v1/token exchange for a vault-token grant -> a Vault token
  vault_refresh    ours: grant_type=refresh_token chain for the same grant (peer: the JWT login,
                   the only way OpenBao has to turn an identity into a token)
  aws_exchange     ours: exchange for an AWS grant against moto; no peer (ratios are N/A)
  reject_*         both: the same hostile tokens (unknown kid, bad signature, alg none)
  deny_other_project  both: a genuine token of another project, refused by the binding

Every request has its own token (our broker consumes each jti once), and OpenBao gets as many
distinct tokens as we do. Warm-up requests run first and are left out of every figure.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac

from broker.dev.claims import GITLAB_PROJECT_ID, preset_claims
from broker.dev.harness import (
    Broker,
    DevIssuer,
    Moto,
    exchange_form,
    fresh_pg_database,
    refresh_form,
    start_broker,
    start_dev_issuer,
    start_moto,
)
from broker.dev.issuer import IssuerState, SigningKey, encode_jwt
from broker.dev.policy_file import (
    GITLAB,
    broker_table,
    dev_issuer,
    etl_project_grant,
    etl_writer_grant,
    upstream_aws,
    upstream_vault_approle,
)
from broker.dev.processes import free_port
from broker.dev.vault import BAO, ETL_POLICY, OpenBao, setup_broker

AUDIENCE = "luigi-creds"
VAULT_GRANT = "etl-vault"
AWS_GRANT = "etl-writer"
BAO_ROLE = "etl"
FORM = "application/x-www-form-urlencoded"
# Tokens are minted just before their scenario runs; 15 min outlives the longest phase.
TOKEN_TTL_SECONDS = 900
FORGED_KINDS = ("unknown_kid", "bad_signature", "alg_none")
# Limits far above what two cores can push: the benchmark measures the pipeline, not the bucket.
UNLIMITED_RATE = {"per_second": 1000000, "burst": 1000000}
HTTP_TIMEOUT_SECONDS = 30.0

OURS = "luigi-creds"
PEER = "openbao"


# -- the stack ----------------------------------------------------------------------------------


@dataclass
class Stack:
    """Every server of one run, and the issuer's signing keys loaded into this process."""

    issuer: DevIssuer
    signer: IssuerState
    bao: AuditedOpenBao
    moto: Moto
    broker: Broker
    attacker: SigningKey = field(repr=False)

    def mint(self, **claims: str) -> str:
        """A fresh GitLab-shaped token (own jti), signed by the issuer; `claims` override."""
        return self.signer.mint(
            {"preset": "gitlab", "audience": AUDIENCE, "ttl": TOKEN_TTL_SECONDS, "claims": claims},
            now=datetime.now(UTC),
        )

    def claims(self) -> dict[str, Any]:
        """GitLab-shaped claims for this issuer and audience, as `mint` signs by default."""
        return preset_claims(
            "gitlab",
            issuer=self.signer.issuer_url,
            audience=AUDIENCE,
            now=datetime.now(UTC),
            ttl=TOKEN_TTL_SECONDS,
        )

    def hostile(self, kind: str) -> str:
        """A token the issuer never signed, of `kind` (see FORGED_KINDS)."""
        claims = self.claims()
        if kind == "unknown_kid":
            # Signed by a key the issuer never published, under a fresh kid every time, so no
            # cache of "kids seen missing" can short-cut the rejection.
            return encode_jwt(claims, self.attacker, header={"kid": secrets.token_urlsafe(12)})
        if kind == "bad_signature":
            head, body, signature = self.mint().split(".")
            raw = bytearray(_unb64(signature))
            raw[len(raw) // 2] ^= 0x01
            return f"{head}.{body}.{_b64(bytes(raw))}"
        if kind == "alg_none":
            header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            return f"{header}.{_b64(json.dumps(claims).encode())}."
        raise ValueError(f"unknown hostile kind {kind!r}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class AuditedOpenBao(OpenBao):
    """The dev server of broker.dev.vault, plus a file audit device when `audit_file` is set.

    OpenBao 2 refuses to enable audit devices over the API; they are declared in a config file
    that `-dev` mode reads beside its own defaults.
    """

    audit_file: Path | None = None

    def server_flags(self) -> list[str]:
        if self.audit_file is None:
            return []
        config = self.workdir / "openbao-audit.hcl"
        device = f'audit "file" "bench" {{\n  options {{ file_path = "{self.audit_file}" }}\n}}\n'
        config.write_text(device, encoding="utf-8")
        return [f"-config={config}"]


def configure_openbao_jwt(bao: OpenBao, issuer_url: str) -> None:
    """OpenBao's JWT auth against our issuer, bound like our grant: audience, project_id, policy."""
    root = bao.root()
    root.sys.enable_auth_method("jwt")
    root.write(
        "auth/jwt/config",
        jwks_url=issuer_url + "/jwks",
        bound_issuer=issuer_url,
        jwt_supported_algs=["RS256", "ES256"],
    )
    root.write(
        f"auth/jwt/role/{BAO_ROLE}",
        role_type="jwt",
        bound_audiences=[AUDIENCE],
        user_claim="sub",
        bound_claims={"project_id": GITLAB_PROJECT_ID},
        token_policies=[ETL_POLICY],
        token_ttl="15m",
    )


def broker_config(
    *,
    listen: str,
    issuer_url: str,
    audit_store: str,
    moto_url: str,
    role_arn: str,
    bao_url: str,
    role_id_file: Path,
    secret_id_file: Path,
    audit_key_file: Path | None = None,
) -> str:
    """Our policy: a vault-token grant equivalent to the OpenBao role, and one AWS grant.

    `audit_key_file`: the checkpoint key replicas on one PostgreSQL share (an SQLite store gets
    one beside it by default)."""
    key = {"audit_key_file": str(audit_key_file)} if audit_key_file else {}
    limits = {
        f"rate_limit_{kind}": UNLIMITED_RATE for kind in ("identity", "grant", "client_failures")
    }
    vault_grant = etl_project_grant(VAULT_GRANT, ttl="15m", vault={"token_policies": [ETL_POLICY]})
    return "\n".join(
        (
            broker_table(listen, audit_store, **key, **limits),
            dev_issuer(issuer_url),
            vault_grant,
            etl_writer_grant(issuer=GITLAB, role_arn=role_arn, session_name="{project_path}"),
            upstream_aws(moto_url),
            upstream_vault_approle(bao_url, role_id_file, secret_id_file),
        )
    )


@contextmanager
def running_stack(
    workdir: Path, store: str = "sqlite", *, peer_audit: bool = True
) -> Iterator[Stack]:
    """Start issuer, OpenBao, moto and broker under `workdir`; stop them all on exit.

    `store` is where the broker keeps its audit ledger and sessions: "sqlite" (a file under
    `workdir`) or "postgresql" (a fresh database on the test cluster, dropped afterwards).
    `peer_audit` enables OpenBao's file audit device, so both sides record every request.
    """
    with ExitStack() as stop:
        if store == "postgresql":
            audit_store = stop.enter_context(fresh_pg_database("bench"))
        else:
            audit_store = f"sqlite:///{workdir / 'audit.db'}"
        issuer = start_dev_issuer(workdir, algs="RS256")
        stop.callback(issuer.stop)
        # The child saved its keys in the state dir: load them to sign here, with no HTTP hop.
        signer = IssuerState(issuer.url, state_dir=workdir / "dev-issuer-state")
        signer.load_or_generate(["RS256"])
        bao = AuditedOpenBao(
            workdir=workdir,
            port=free_port(),
            root_token=secrets.token_urlsafe(24),
            audit_file=workdir / "openbao-audit.jsonl" if peer_audit else None,
        )
        bao.start()
        stop.callback(bao.stop)
        # The broker's own AppRole login lives 1 h so no re-login lands inside a phase.
        vault = setup_broker(bao, workdir / "approle", login_ttl="1h", login_max_ttl="2h")
        configure_openbao_jwt(bao, issuer.url)
        moto = start_moto(workdir)
        stop.callback(moto.stop)
        role_arn = moto.create_role(AWS_GRANT)
        listen = f"127.0.0.1:{free_port()}"
        text = broker_config(
            listen=listen,
            issuer_url=issuer.url,
            audit_store=audit_store,
            moto_url=moto.url,
            role_arn=role_arn,
            bao_url=bao.url,
            role_id_file=vault.role_id_file,
            secret_id_file=vault.secret_id_file,
        )
        broker = start_broker(workdir / "broker", text, env=moto.broker_env)
        stop.callback(broker.stop)
        yield Stack(issuer, signer, bao, moto, broker, attacker=SigningKey.generate("RS256"))


# -- driving requests ---------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection to a loopback server, owned by one worker thread."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._conn = http.client.HTTPConnection(
            self._host, self._port, timeout=HTTP_TIMEOUT_SECONDS
        )

    last_headers: Mapping[str, str] = {}

    def post(
        self,
        path: str,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        return self.request("POST", path, body, {"Content-Type": content_type, **(headers or {})})

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] = {}
    ) -> tuple[int, bytes]:
        try:
            self._conn.request(method, path, body=body, headers=dict(headers))
            response = self._conn.getresponse()
            data = response.read()
            self.last_headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, data
        except (http.client.HTTPException, OSError):
            # A broken connection is reported as status 0 by the caller's check; start afresh.
            self._conn.close()
            self._conn = http.client.HTTPConnection(
                self._host, self._port, timeout=HTTP_TIMEOUT_SECONDS
            )
            return 0, b""

    def close(self) -> None:
        self._conn.close()


# A job sends one request on a worker's connection and returns True when the answer is right.
Job = Callable[[Connection], bool]


def ours_exchange(
    token: str, grant: str, on_issued: Callable[[Mapping[str, str]], None] | None = None
) -> Job:
    """Our exchange of `token` for `grant`; `on_issued` sees a 200 answer's headers."""
    body = urllib.parse.urlencode(exchange_form(token, grant)).encode("ascii")

    def job(conn: Connection) -> bool:
        status, raw = conn.post("/v1/token", body, FORM)
        if on_issued is not None and status == 200:
            on_issued(conn.last_headers)
        return status == 200 and bool(json.loads(raw).get("credentials"))

    return job


class RefreshChain:
    """A session's refresh handle, rotated by every step (each step uses the previous answer)."""

    def __init__(self, handle: str, grant: str) -> None:
        self.handle = handle
        self.grant = grant

    def step(self, conn: Connection) -> bool:
        body = urllib.parse.urlencode(refresh_form(self.handle, self.grant)).encode("ascii")
        status, raw = conn.post("/v1/token", body, FORM)
        if status != 200:
            return False
        answer = json.loads(raw)
        self.handle = str(answer["refresh_token"])
        return bool(answer.get("credentials"))


# How the broker refuses each kind. An unknown kid is answered 400 after the one refetch it may
# trigger, and 503 + Retry-After while the refetch cooldown holds (the kid might belong to a key
# the issuer is rotating in, so the caller is told to retry, not that the token is bad).
REFUSALS: dict[str, set[tuple[int, str]]] = {
    "unknown_kid": {(400, "invalid_request"), (503, "temporarily_unavailable")},
}


def ours_reject(token: str, error: str = "invalid_request", kind: str = "") -> Job:
    body = urllib.parse.urlencode(exchange_form(token, VAULT_GRANT)).encode("ascii")

    def job(conn: Connection) -> bool:
        status, raw = conn.post("/v1/token", body, FORM)
        return (status, json.loads(raw).get("error")) in expected

    expected = REFUSALS.get(kind, {(400, error)})

    return job


def peer_login(token: str, *, expect_ok: bool) -> Job:
    body = json.dumps({"role": BAO_ROLE, "jwt": token}).encode("utf-8")

    def job(conn: Connection) -> bool:
        status, raw = conn.post("/v1/auth/jwt/login", body, "application/json")
        if expect_ok:
            return status == 200 and bool(json.loads(raw)["auth"]["client_token"])
        # OpenBao answers a token it cannot verify with 400 (invalid request) or 403.
        return status in (400, 403)

    return job


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """Latencies (seconds) of the timed requests of one scenario/system/phase, and the wall time."""

    latencies: tuple[float, ...]
    wall: float
    errors: int


def _run_jobs(jobs: Sequence[Job], conn: Connection, out: list[float]) -> int:
    errors = 0
    for job in jobs:
        start = time.perf_counter()
        ok = job(conn)
        out.append(time.perf_counter() - start)
        errors += not ok
    return errors


def measure(
    url: str | Sequence[str], workers: Sequence[tuple[Sequence[Job], Sequence[Job]]]
) -> Measured:
    """Run each worker's (warm-up, timed) jobs on its own thread and connection.

    With several URLs (replicas of one service), worker i talks to URL i modulo their number.

    Warm-ups run first on every thread; the clock starts when all threads have finished them and
    stops when the last timed job returns.
    """
    # The clock starts in the barrier's action, before any thread is released: read after the
    # barrier instead, a fast worker could finish before the start was taken (negative wall).
    started_at = [0.0]
    barrier = threading.Barrier(
        len(workers) + 1, action=lambda: started_at.__setitem__(0, time.perf_counter())
    )
    latencies: list[list[float]] = [[] for _ in workers]
    errors = [0] * len(workers)
    finished: list[float] = [0.0] * len(workers)

    urls = [url] if isinstance(url, str) else list(url)

    def work(index: int, warmup: Sequence[Job], timed: Sequence[Job]) -> None:
        conn = Connection(urls[index % len(urls)])
        try:
            _run_jobs(warmup, conn, [])
            barrier.wait()
            errors[index] = _run_jobs(timed, conn, latencies[index])
            finished[index] = time.perf_counter()
        finally:
            conn.close()

    threads = [
        threading.Thread(target=work, args=(i, warm, timed), daemon=True)
        for i, (warm, timed) in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    for thread in threads:
        thread.join()
    return Measured(
        latencies=tuple(x for per in latencies for x in per),
        wall=max(finished) - started_at[0],
        errors=sum(errors),
    )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(phase: str, scenario: str, system: str, m: Measured) -> dict[str, Any]:
    values = sorted(m.latencies)
    return {
        "phase": phase,
        "scenario": scenario,
        "system": system,
        "requests": len(values),
        "errors": m.errors,
        "p50_ms": round(percentile(values, 50) * 1000, 3),
        "p95_ms": round(percentile(values, 95) * 1000, 3),
        "p99_ms": round(percentile(values, 99) * 1000, 3),
        "throughput_rps": round(len(values) / m.wall, 1) if m.wall > 0 else None,
        "wall_s": round(m.wall, 3),
    }


# -- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    requests: int
    concurrency: int
    hostile: int
    warmup: int
    store: str = "sqlite"
    peer_audit: bool = True
    load: bool = True
    pg_replicas: bool = True
    load_scale: float = 1.0
    only_pg_replicas: bool = False


def _split(jobs: list[Job], warmup: int, threads: int) -> list[tuple[list[Job], list[Job]]]:
    """Deal `jobs` (warm-ups first, `warmup` per thread) round-robin onto `threads` workers."""
    warm, timed = jobs[: warmup * threads], jobs[warmup * threads :]
    return [(warm[i::threads], timed[i::threads]) for i in range(threads)]


def run_phase(stack: Stack, phase: str, settings: Settings) -> list[dict[str, Any]]:
    """Every scenario once for `phase` ("sequential" or "concurrent"); one row per system."""
    threads = 1 if phase == "sequential" else settings.concurrency
    per_thread = settings.requests
    count = (settings.warmup + per_thread) * threads
    broker, bao = stack.broker.url, stack.bao.url
    rows: list[dict[str, Any]] = []

    def record(scenario: str, system: str, url: str, jobs: list[Job], warmup: int) -> None:
        # JWKS fetches the issuer served while this scenario ran (warm-ups included): what one
        # system's verification costs the identity provider.
        before = stack.issuer.stats()["jwks_fetches"]
        measured = measure(url, _split(jobs, warmup, threads))
        fetches = stack.issuer.stats()["jwks_fetches"] - before
        rows.append({**summarize(phase, scenario, system, measured), "jwks_fetches": fetches})
        _progress(rows[-1])

    peer_jobs = [peer_login(stack.mint(), expect_ok=True) for _ in range(count)]
    record("vault_token", PEER, bao, peer_jobs, settings.warmup)
    ours_jobs = [ours_exchange(stack.mint(), VAULT_GRANT) for _ in range(count)]
    record("vault_token", OURS, broker, ours_jobs, settings.warmup)

    chains = [RefreshChain(_session_handle(stack), VAULT_GRANT) for _ in range(threads)]
    # Thread i gets chain i for every one of its steps: a chain is sequential by nature.
    refresh_jobs: list[Job] = [chains[i % threads].step for i in range(count)]
    record("vault_refresh", OURS, broker, refresh_jobs, settings.warmup)

    aws_jobs = [ours_exchange(stack.mint(), AWS_GRANT) for _ in range(count)]
    record("aws_exchange", OURS, broker, aws_jobs, settings.warmup)

    # Hostile tokens: `hostile` in each phase, split evenly over the kinds, the same tokens for
    # both systems (OpenBao keeps no record of a token, so ours sees each one fresh). One extra
    # token per thread warms up.
    hostile_per_thread = max(1, settings.hostile // len(FORGED_KINDS) // threads)
    for kind in FORGED_KINDS:
        tokens = [stack.hostile(kind) for _ in range(threads * (1 + hostile_per_thread))]
        record(f"reject_{kind}", PEER, bao, [peer_login(t, expect_ok=False) for t in tokens], 1)
        record(f"reject_{kind}", OURS, broker, [ours_reject(t, kind=kind) for t in tokens], 1)

    # A genuine token of another project: signature and claims verify, the binding denies it
    # (OpenBao: bound_claims; ours: [grant.match], answered invalid_target).
    tokens = [stack.mint(project_id="99999999") for _ in range(threads * (1 + hostile_per_thread))]
    record("deny_other_project", PEER, bao, [peer_login(t, expect_ok=False) for t in tokens], 1)
    record(
        "deny_other_project", OURS, broker, [ours_reject(t, "invalid_target") for t in tokens], 1
    )
    return rows


def _session_handle(stack: Stack) -> str:
    """Open a refresh session (untimed) and return its first handle."""
    status, body, _ = stack.broker.exchange(stack.mint(), VAULT_GRANT)
    if status != 200:
        raise RuntimeError(f"could not open a refresh session: {status} {body.get('error')}")
    return str(body["refresh_token"])


def equivalence(stack: Stack) -> dict[str, dict[str, Any]]:
    """One Vault token from each side (untimed), looked up at OpenBao: the two must match.

    The comparison is only fair if both paths hand out the same thing: a token with the same
    policies and TTL, that reads the grant's secret. Raises RuntimeError when they differ.
    """
    status, body, _ = stack.broker.exchange(stack.mint(), VAULT_GRANT)
    if status != 200:
        raise RuntimeError(f"our exchange failed: {status} {body.get('error')}")
    ours = str(body["credentials"]["token"])
    login = hvac.Client(url=stack.bao.url, timeout=10).auth.jwt.jwt_login(
        role=BAO_ROLE, jwt=stack.mint()
    )
    peer = str(login["auth"]["client_token"])
    seen: dict[str, dict[str, Any]] = {}
    for system, token in ((OURS, ours), (PEER, peer)):
        client = hvac.Client(url=stack.bao.url, token=token, timeout=10)
        data = client.auth.token.lookup_self()["data"]
        secret = client.secrets.kv.v2.read_secret_version(
            path="etl/db", raise_on_deleted_version=True
        )
        seen[system] = {
            "policies": sorted(data["policies"]),
            "creation_ttl": data["creation_ttl"],
            "renewable": data["renewable"],
            "reads_etl_secret": bool(secret["data"]["data"]),
        }
    if seen[OURS] != seen[PEER]:
        raise RuntimeError(f"the two Vault tokens differ: {seen}")
    return seen


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """ours/peer per phase and scenario: latency ratios (>1 = we are slower) and throughput."""
    index = {(r["phase"], r["scenario"], r["system"]): r for r in rows}
    out: list[dict[str, Any]] = []
    for row in rows:
        if row["system"] != OURS:
            continue
        phase, scenario = row["phase"], row["scenario"]
        # The refresh chain is our second path to a Vault token: compare it with the login too.
        peer_scenario = "vault_token" if scenario == "vault_refresh" else scenario
        peer = index.get((phase, peer_scenario, PEER))
        entry: dict[str, Any] = {"phase": phase, "scenario": scenario, "peer": None}
        for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps"):
            ratio = None
            if peer is not None and peer[key] and row[key] is not None:
                ratio = round(row[key] / peer[key], 2)
            entry[key.rsplit("_", 1)[0]] = ratio
        if peer is not None:
            entry["peer"] = f"{PEER} {peer_scenario}"
        out.append(entry)
    return out


# -- report -------------------------------------------------------------------------------------


def machine_facts(load_before: tuple[float, float, float]) -> dict[str, Any]:
    bao = subprocess.run([BAO, "version"], capture_output=True, text=True, check=False, timeout=30)
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "bao": bao.stdout.strip() or bao.stderr.strip(),
        # Other work on the machine skews both systems; the 1-minute load shows how much.
        "load_before": round(load_before[0], 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "N/A"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into README)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join([line, rule, *body])


RESULT_HEADERS = ("phase", "scenario", "system", "n", "err", "p50 ms", "p95 ms", "p99 ms", "req/s")


def result_cells(row: Mapping[str, Any]) -> list[Any]:
    """The cells under RESULT_HEADERS for one result row."""
    keys = ("phase", "scenario", "system", "requests", "errors", "p50_ms", "p95_ms", "p99_ms")
    return [*(row[k] for k in keys), row["throughput_rps"]]


def render(report: dict[str, Any]) -> str:
    machine = report["machine"]
    settings = report["settings"]
    head = [
        f"machine: {machine['cores']} cores ({machine['cores_usable']} usable) {machine['cpu']}",
        f"python {machine['python']} on {machine['platform']}; {machine['bao']}",
        f"load (1 min) before/after: {machine['load_before']} / {machine['load_after']}",
        f"settings: {json.dumps(settings)}",
    ]
    parts = head
    if report["results"]:
        results = table(
            [*RESULT_HEADERS, "jwks"],
            [[*result_cells(r), r["jwks_fetches"]] for r in report["results"]],
        )
        compared = table(
            ["phase", "ours", "peer", "p50 x", "p95 x", "p99 x", "req/s x"],
            [
                [
                    r["phase"],
                    r["scenario"],
                    r["peer"],
                    r["p50"],
                    r["p95"],
                    r["p99"],
                    r["throughput"],
                ]
                for r in report["ratios"]
            ],
        )
        parts = [*head, "", results, "", "ratios ours/peer:", compared]
    if report.get("load"):
        from bench.load import render_load

        parts += ["", render_load(report["load"])]
    parts.append(f"\ntotal run time {report['duration_s']} s")
    return "\n".join(parts)


def _progress(row: dict[str, Any]) -> None:
    print(
        f"  {row['phase']:<10} {row['scenario']:<22} {row['system']:<11} "
        f"n={row['requests']} err={row['errors']} p50={row['p50_ms']} ms",
        file=sys.stderr,
        flush=True,
    )


def run(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Start the stack under `workdir`, run both phases, return the report."""
    started = time.monotonic()
    load_before = os.getloadavg()
    with running_stack(workdir, settings.store, peer_audit=settings.peer_audit) as stack:
        if settings.only_pg_replicas:
            from bench.load import run_two_replicas

            replicas = run_two_replicas(stack, workdir, _progress, settings.load_scale)
            return {
                "machine": machine_facts(load_before),
                "settings": {"only_pg_replicas": True, "load_scale": settings.load_scale},
                "results": [],
                "ratios": [],
                "load": {"results": [], "own_time": {}, "two_replicas_pg": replicas},
                "duration_s": round(time.monotonic() - started, 1),
            }
        tokens = equivalence(stack)
        rows = run_phase(stack, "sequential", settings)
        if settings.concurrency > 1:
            rows += run_phase(stack, "concurrent", settings)
        load: dict[str, Any] | None = None
        if settings.load:
            from bench.load import run_load

            load = run_load(
                stack,
                workdir,
                _progress,
                two_replicas_pg=settings.pg_replicas,
                scale=settings.load_scale,
            )
    return {
        "machine": machine_facts(load_before),
        "settings": {
            "requests": settings.requests,
            "concurrency": settings.concurrency,
            "hostile_total": settings.hostile,
            "warmup": settings.warmup,
            "audit_store": settings.store,
            "openbao_audit_device": "file" if settings.peer_audit else None,
        },
        "vault_tokens": tokens,
        "results": rows,
        "ratios": ratios(rows),
        "load": load,
        "duration_s": round(time.monotonic() - started, 1),
    }


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exchange", description=__doc__)
    parser.add_argument(
        "--requests", type=_positive, default=300, help="timed requests per scenario per thread"
    )
    parser.add_argument(
        "--concurrency", type=_positive, default=8, help="threads in the concurrent phase"
    )
    parser.add_argument(
        "--hostile",
        type=_positive,
        default=1000,
        help="hostile tokens per phase, split over the three kinds",
    )
    parser.add_argument(
        "--warmup", type=int, default=20, help="untimed requests per scenario per thread"
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the broker's audit and session store (postgresql: $LUIGI_CREDS_TEST_PG cluster)",
    )
    parser.add_argument(
        "--no-peer-audit",
        action="store_true",
        help="leave OpenBao without an audit device (by default it logs to a file, like ours)",
    )
    parser.add_argument(
        "--no-load", action="store_true", help="skip the load section (concurrency 1/16/64)"
    )
    parser.add_argument(
        "--load-scale",
        type=float,
        default=1.0,
        help="multiply the load section's requests per thread (at least 1 each)",
    )
    parser.add_argument(
        "--no-pg-replicas",
        action="store_true",
        help="skip two brokers on one PostgreSQL ($LUIGI_CREDS_TEST_PG) in the load section",
    )
    parser.add_argument(
        "--only-pg-replicas",
        action="store_true",
        help="run only the two-replica PostgreSQL part of the load section (for iterating on it)",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep server logs here (default: a tmp dir)")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    settings = Settings(
        args.requests,
        args.concurrency,
        args.hostile,
        args.warmup,
        args.store,
        peer_audit=not args.no_peer_audit,
        load=not args.no_load,
        pg_replicas=not args.no_pg_replicas,
        load_scale=args.load_scale,
        only_pg_replicas=args.only_pg_replicas,
    )
    with ExitStack() as cleanup:
        if args.workdir is not None:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        report = run(settings, workdir)
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if any(r["errors"] for r in report["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
