"""Benchmark, load section: the Vault-token exchange under concurrency, against its ceiling.

Part of `make bench` (bench/exchange.py runs it after its latency phases, on the same stack).
At each concurrency (1, 16, 64 client threads, one keep-alive connection each) and in one run:

  ceiling   OpenBao creating a token through the broker's token role with the broker's own
            AppRole login: the one upstream call an exchange must make, so no exchange can beat it
  peer      OpenBao's own JWT login (what a user would use instead of the broker)
  ours      the broker's Vault-token exchange

plus the refresh path at 16, an AWS grant next to a direct AssumeRole on the same moto (one
thread), and the broker's CPU per exchange (its process's user+system time over the requests
served), OpenBao's CPU per token, the broker's peak RSS after the 64-thread run, and the
broker's own time per exchange from its Server-Timing header (`total` - `mint`: everything
but the upstream call and uvicorn's HTTP framing, the wait for an exchange thread included).
With `two_replicas_pg`, two brokers share one fresh PostgreSQL database and the client threads
alternate between them.

Every figure that matters is a ratio between systems measured in the same run: the machine is
shared, so absolute numbers move with its load.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from bench.exchange import (
    AWS_GRANT,
    FORM,
    PEER,
    VAULT_GRANT,
    Broker,
    Connection,
    Job,
    Measured,
    RefreshChain,
    Stack,
    _session_handle,
    _split,
    broker_config,
    fresh_pg_database,
    measure,
    ours_exchange,
    peer_login,
    start_broker,
    summarize,
)
from bench.store_writes import cluster_cpu
from broker.app import new_request_id
from broker.config import Config
from broker.config_lint import load_config
from broker.dev.processes import free_port
from broker.mint.vault import clamp_ttl, plan_token, token_create_body
from broker.sessions import SESSION_ID_PREFIX

OURS = "luigi-creds"
CEILING = "openbao-create"
LEVELS = (1, 16, 64)
# Timed requests per thread at each concurrency: about the same total work per level.
PER_THREAD = {1: 150, 16: 120, 64: 36}
WARMUP_PER_THREAD = 2
# At each level the systems take turns in this many rounds (ceiling, peer, ours, ceiling, ...)
# and each system's rounds are added up: a burst of load on the shared machine then lands on
# all of them instead of on whichever was running, and the ratios stay put between runs.
ROUNDS = 3
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def postgres_cpu(url: str) -> Callable[[], float] | None:
    """A reader of the PostgreSQL cluster's CPU seconds so far (every process of the server at
    `url`, including backends that have exited), or None when it is not a process on this host.

    The postmaster's children are its backends and helpers; a child that exited has been waited
    for, so its time is in the postmaster's cutime/cstime.
    """
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    try:
        status = Path(f"/proc/{backend}/status").read_text()
    except OSError:
        return None
    postmaster = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")
    )

    return lambda: cluster_cpu(postmaster)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class OwnTime:
    """The broker's own milliseconds per answered exchange, from its Server-Timing header:
    `total` minus `mint` (everything but the upstream call, the wait for a thread and the work
    no phase names included); from a broker without `total`, the sum of its phases."""

    PHASES = ("verify", "policy", "state", "audit")

    def __init__(self) -> None:
        self.values: list[float] = []
        self._lock = threading.Lock()

    def add(self, headers: Mapping[str, str]) -> None:
        durations: dict[str, float] = {}
        for part in headers.get("server-timing", "").split(","):
            name, _, dur = part.strip().partition(";dur=")
            if dur:
                durations[name] = float(dur)
        if "total" in durations:
            own = durations["total"] - durations.get("mint", 0.0)
        elif any(name in durations for name in self.PHASES):
            own = sum(durations.get(name, 0.0) for name in self.PHASES)
        else:
            return  # a broker without Server-Timing reports nothing, not zero
        with self._lock:
            self.values.append(own)

    def summary(self) -> dict[str, float | None]:
        values = sorted(self.values)
        if not values:
            return {"p50_ms": None, "p99_ms": None}
        return {
            "p50_ms": round(values[len(values) // 2], 3),
            "p99_ms": round(values[min(len(values) - 1, int(len(values) * 0.99))], 3),
        }


def token_create_job(path: str, token: str, body: Mapping[str, Any]) -> Job:
    """The broker's own upstream call, made directly: the ceiling for any exchange."""
    raw = json.dumps(body).encode()

    def job(conn: Connection) -> bool:
        status, answer = conn.post(path, raw, "application/json", {"X-Vault-Token": token})
        return status == 200 and bool(json.loads(answer)["auth"]["client_token"])

    return job


def exchange_token_body(config: Config, stack: Stack, explicit_max_ttl: int) -> dict[str, Any]:
    """The token-create body the broker sends for one Vault-token exchange of the bench's
    grant, built by the broker's own code (`plan_token`, `token_create_body`) from values shaped
    as an exchange's: the session's issuer and subject, a fresh session and request id, and the
    explicit max TTL a real exchange's token carries. Metadata costs OpenBao CPU (stored with
    the token, HMACed into its audit log), so a lighter body would overstate the ceiling."""
    grant = next(g for g in config.grants if g.name == VAULT_GRANT)
    issuer = next(i for i in config.issuers if i.url == stack.signer.issuer_url)
    subject = stack.claims()["sub"]
    ttl = clamp_ttl(grant.ttl, None)
    plan = plan_token(
        grant,
        ttl=ttl,
        metadata={
            "issuer": issuer.name,
            "subject": str(subject),
            "session": SESSION_ID_PREFIX + secrets.token_urlsafe(16),
            "request_id": new_request_id(),
        },
        explicit_max_ttl=explicit_max_ttl,
    )
    return token_create_body(plan)


def _ceiling_job_factory(stack: Stack) -> Callable[[], Job]:
    config = load_config(stack.broker.config_path)
    vault = config.vault
    assert vault is not None and vault.role_id_file and vault.secret_id_file
    login = hvac.Client(url=stack.bao.url, timeout=10).auth.approle.login(
        role_id=vault.role_id_file.read_text().strip(),
        secret_id=vault.secret_id_file.read_text().strip(),
    )
    token = str(login["auth"]["client_token"])
    path = f"/v1/auth/token/create/{vault.token_role}"
    meta_keys, explicit_max_ttl = _exchanged_token_shape(stack)
    body = exchange_token_body(config, stack, explicit_max_ttl)
    if sorted(body["meta"]) != meta_keys:
        raise RuntimeError(f"the ceiling's metadata {sorted(body['meta'])} is not ours {meta_keys}")
    return lambda: token_create_job(
        path, token, exchange_token_body(config, stack, explicit_max_ttl)
    )


def _exchanged_token_shape(stack: Stack) -> tuple[list[str], int]:
    """The metadata keys and explicit max TTL of a token from one real exchange (untimed)."""
    status, answer, _ = stack.broker.exchange(stack.mint(), VAULT_GRANT)
    if status != 200:
        raise RuntimeError(f"our exchange failed: {status} {answer.get('error')}")
    client = hvac.Client(url=stack.bao.url, token=answer["credentials"]["token"], timeout=10)
    data = client.auth.token.lookup_self()["data"]
    return sorted(data.get("meta") or {}), int(data["explicit_max_ttl"])


def assume_role_job(role_arn: str, index: int, moto_url: str, keys: Mapping[str, str]) -> Job:
    """A direct STS AssumeRole (Query API) at moto, signed with SigV4 as boto3 signs it, by the
    broker's own IAM user (moto enforces IAM, so an unsigned call would be refused)."""
    body = urllib.parse.urlencode(
        {
            "Action": "AssumeRole",
            "Version": "2011-06-15",
            "RoleArn": role_arn,
            "RoleSessionName": f"bench-{index}",
            "DurationSeconds": "900",
        }
    ).encode()

    signer = SigV4Auth(
        Credentials(keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"]), "sts", "us-east-1"
    )

    def job(conn: Connection) -> bool:
        # Signed per request (timestamped), as a direct caller would: part of the direct cost.
        request = AWSRequest(method="POST", url=moto_url + "/", data=body)
        request.headers["Content-Type"] = FORM
        signer.add_auth(request)
        headers = {k: str(v) for k, v in request.headers.items() if k.lower() != "content-type"}
        status, raw = conn.post("/", body, FORM, headers)
        return status == 200 and b"<AccessKeyId>" in raw

    return job


@dataclass
class Target:
    """Where a scenario's requests go: one or several URLs (threads alternate) and its pids."""

    urls: Sequence[str]
    pids: Sequence[int]
    # The shared store server's CPU (`postgres_cpu`), counted next to the pids' when given.
    store_cpu: Callable[[], float] | None = None


def _per_thread(threads: int, scale: float) -> int:
    return max(1, round(PER_THREAD[threads] * scale))


def measured_row(
    phase: str,
    scenario: str,
    system: str,
    urls: Sequence[str],
    jobs: list[Job],
    threads: int,
    pids: Sequence[int],
    *,
    digits: int = 2,
) -> dict[str, Any]:
    """The summary row of `jobs` run on `threads` workers, with the CPU `pids` spent per request
    (None without pids)."""
    cpu_before = [cpu_seconds(p) for p in pids]
    measured = measure(urls, _split(jobs, WARMUP_PER_THREAD, threads))
    cpu = sum(cpu_seconds(p) for p in pids) - sum(cpu_before)
    total = len(jobs)  # warm-ups included: the CPU clock ran for them too
    row = summarize(phase, scenario, system, measured)
    row["cpu_ms_per_request"] = round(cpu / total * 1000, digits) if pids else None
    return row


@dataclass(frozen=True)
class System:
    """One system measured at a level: where its requests go and how each is made."""

    scenario: str
    name: str
    urls: Sequence[str]
    make_job: Callable[[], Job]
    pids: Sequence[int]
    # The shared store server's CPU (`postgres_cpu`), reported per request when given.
    store_cpu: Callable[[], float] | None = None


def interleaved(
    phase: str,
    systems: Sequence[System],
    threads: int,
    per_thread: int,
    progress: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Each of `systems` on `threads` workers for `per_thread` timed requests per thread, in
    ROUNDS alternating rounds; one summary row per system over all its rounds, with the CPU
    its pids spent per request (warm-ups included: the CPU clock ran for them too)."""
    per_round = max(1, -(-per_thread // ROUNDS))
    latencies: dict[str, list[float]] = {s.name: [] for s in systems}
    wall = dict.fromkeys(latencies, 0.0)
    errors = dict.fromkeys(latencies, 0)
    cpu = dict.fromkeys(latencies, 0.0)
    sent = dict.fromkeys(latencies, 0)
    store = dict.fromkeys(latencies, 0.0)
    for _ in range(ROUNDS):
        for system in systems:
            # Made before the clock starts: making one may sign a token.
            jobs = [system.make_job() for _ in range((WARMUP_PER_THREAD + per_round) * threads)]
            store_before = system.store_cpu() if system.store_cpu is not None else 0.0
            cpu_before = sum(cpu_seconds(p) for p in system.pids)
            measured = measure(system.urls, _split(jobs, WARMUP_PER_THREAD, threads))
            cpu[system.name] += sum(cpu_seconds(p) for p in system.pids) - cpu_before
            if system.store_cpu is not None:
                store[system.name] += system.store_cpu() - store_before
            latencies[system.name] += measured.latencies
            wall[system.name] += measured.wall
            errors[system.name] += measured.errors
            sent[system.name] += len(jobs)
    rows = []
    for system in systems:
        name = system.name
        measured = Measured(tuple(latencies[name]), wall[name], errors[name])
        row = summarize(phase, system.scenario, name, measured)
        row["cpu_ms_per_request"] = round(cpu[name] / sent[name] * 1000, 2) if system.pids else None
        if system.store_cpu is not None:
            row["store_cpu_ms_per_request"] = round(store[name] / sent[name] * 1000, 2)
        rows.append(row)
        progress(row)
    return rows


def run_level(
    stack: Stack,
    threads: int,
    ours: Target,
    own: OwnTime,
    progress: Callable[[dict[str, Any]], None],
    scale: float,
) -> list[dict[str, Any]]:
    """Ceiling, peer and ours at `threads`, alternating; ours with CPU per exchange."""
    ceiling = _ceiling_job_factory(stack)
    bao_pid = stack.bao.process.pid if stack.bao.process else 0
    systems = (
        System("vault_token", CEILING, [stack.bao.url], ceiling, [bao_pid]),
        System(
            "vault_token",
            PEER,
            [stack.bao.url],
            lambda: peer_login(stack.mint(), expect_ok=True),
            [bao_pid],
        ),
        System(
            "vault_token",
            OURS,
            ours.urls,
            lambda: ours_exchange(stack.mint(), VAULT_GRANT, own.add),
            ours.pids,
            ours.store_cpu,
        ),
    )
    return interleaved(f"c{threads}", systems, threads, _per_thread(threads, scale), progress)


def run_load(
    stack: Stack,
    workdir: Path,
    progress: Callable[[dict[str, Any]], None],
    *,
    two_replicas_pg: bool,
    scale: float = 1.0,
) -> dict[str, Any]:
    """The load section on `stack` (and, with `two_replicas_pg`, on two brokers over PG)."""
    broker_pid = stack.broker.process.pid
    ours = Target([stack.broker.url], [broker_pid])
    rows: list[dict[str, Any]] = []
    own_by_level: dict[str, Any] = {}
    for threads in LEVELS:
        own = OwnTime()
        rows += run_level(stack, threads, ours, own, progress, scale)
        own_by_level[f"c{threads}"] = own.summary()
    rss = peak_rss_mb(broker_pid)

    # The refresh path at 16: each thread rotates its own session's handle.
    threads = 16
    count = (WARMUP_PER_THREAD + _per_thread(threads, scale)) * threads
    chains = [RefreshChain(_session_handle(stack), VAULT_GRANT) for _ in range(threads)]
    refresh: list[Job] = [chains[i % threads].step for i in range(count)]
    row = measured_row("c16", "vault_refresh", OURS, ours.urls, refresh, threads, [broker_pid])
    rows.append(row)
    progress(row)

    # AWS: our grant next to the same AssumeRole sent straight to moto, one thread each.
    count = WARMUP_PER_THREAD + _per_thread(1, scale)
    role_arn = stack.moto.create_role(AWS_GRANT + "-direct")
    direct = [
        assume_role_job(role_arn, i, stack.moto.url, stack.moto.broker_env) for i in range(count)
    ]
    rows.append(
        summarize(
            "c1",
            "aws_assume_role",
            "moto-direct",
            measure([stack.moto.url], _split(direct, WARMUP_PER_THREAD, 1)),
        )
    )
    progress(rows[-1])
    aws = [ours_exchange(stack.mint(), AWS_GRANT) for _ in range(count)]
    row = measured_row("c1", "aws_assume_role", OURS, ours.urls, aws, 1, [broker_pid])
    rows.append(row)
    progress(row)

    rows += run_edge(stack, progress, scale)

    replicas: list[dict[str, Any]] = []
    if two_replicas_pg:
        replicas = run_two_replicas(stack, workdir, progress, scale)
    return {
        "results": rows,
        "own_time": own_by_level,
        "peak_rss_mb_after_c64": round(rss, 1),
        "two_replicas_pg": replicas,
    }


def healthz_job(conn: Connection) -> bool:
    status, raw = conn.request("GET", "/healthz")
    return status == 200 and raw == b'{"status":"ok"}'


# Refused at the form, before any token is read: only the HTTP edge, the hop into an exchange
# thread and the tally of unauthenticated refusals run.
_UNSERVED_GRANT = urllib.parse.urlencode({"grant_type": "password"}).encode("ascii")


def unserved_grant_job(conn: Connection) -> bool:
    status, raw = conn.post("/v1/token", _UNSERVED_GRANT, FORM)
    return status == 400 and json.loads(raw).get("error") == "unsupported_grant_type"


def run_edge(
    stack: Stack, progress: Callable[[dict[str, Any]], None], scale: float
) -> list[dict[str, Any]]:
    """The broker's CPU for requests that do no exchange, one thread: what the HTTP edge costs
    (`edge_healthz`) and the edge plus the thread hop and a refusal (`edge_refused`)."""
    pid = stack.broker.process.pid
    count = WARMUP_PER_THREAD + 2 * _per_thread(1, scale)
    rows = []
    for scenario, job in (("edge_healthz", healthz_job), ("edge_refused", unserved_grant_job)):
        urls = [stack.broker.url]
        row = measured_row("c1", scenario, OURS, urls, [job] * count, 1, [pid], digits=3)
        rows.append(row)
        progress(row)
    return rows


def run_two_replicas(
    stack: Stack, workdir: Path, progress: Callable[[dict[str, Any]], None], scale: float
) -> list[dict[str, Any]]:
    """Ceiling, peer and two brokers on one PostgreSQL database, at 16 threads."""
    config = load_config(stack.broker.config_path)
    vault = config.vault
    aws = config.aws
    assert vault is not None and vault.role_id_file and vault.secret_id_file and aws is not None
    issuer_url = config.issuers[0].url
    role_arn = next(g.aws.role_arn for g in config.grants if g.aws is not None)
    with ExitStack() as stop:
        url = stop.enter_context(fresh_pg_database("bench2"))
        brokers: list[Broker] = []
        # One checkpoint key for both replicas of the one ledger, made here (never committed).
        key_file = workdir / "pg-audit-checkpoint.ed25519"
        pem = Ed25519PrivateKey.generate().private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
        # Created owner-only: the key is never readable by others, not even for a moment.
        with os.fdopen(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(pem)
        for i in range(2):
            text = broker_config(
                listen=f"127.0.0.1:{free_port()}",
                issuer_url=issuer_url,
                audit_store=url,
                moto_url=str(aws.endpoint_url),
                role_arn=role_arn,
                bao_url=vault.url,
                role_id_file=vault.role_id_file,
                secret_id_file=vault.secret_id_file,
                audit_key_file=key_file,
            )
            broker = start_broker(workdir / f"replica-{i}", text, env=stack.moto.broker_env)
            stop.callback(broker.stop)
            brokers.append(broker)
        target = Target(
            [b.url for b in brokers], [b.process.pid for b in brokers], postgres_cpu(url)
        )
        rows = run_level(stack, 16, target, OwnTime(), progress, scale)
        for row in rows:
            row["phase"] = "pg2-c16"
        # The two brokers wrote one chain: it must verify end to end.
        check = brokers[0].cli("audit", "verify")
        rows.append({"chain_verifies": check.returncode == 0})
        return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def load_ratios(load: dict[str, Any]) -> list[list[Any]]:
    """[what, ratio, target] rows: the figures the broker is judged by."""
    index = {(r.get("phase"), r.get("scenario"), r.get("system")): r for r in load["results"]}
    out: list[list[Any]] = []
    for threads in LEVELS:
        phase = f"c{threads}"
        ours = index.get((phase, "vault_token", OURS), {})
        ceiling = index.get((phase, "vault_token", CEILING), {})
        peer = index.get((phase, "vault_token", PEER), {})
        target = ">= 0.6" if threads == 16 else ""
        rps = "throughput_rps"
        out.append(
            [f"{phase} exchange / ceiling req/s", _ratio(ours.get(rps), ceiling.get(rps)), target]
        )
        out.append([f"{phase} exchange / peer req/s", _ratio(ours.get(rps), peer.get(rps)), ""])
    refresh = index.get(("c16", "vault_refresh", OURS), {})
    ceiling16 = index.get(("c16", "vault_token", CEILING), {})
    out.append(
        [
            "c16 refresh / ceiling req/s",
            _ratio(refresh.get("throughput_rps"), ceiling16.get("throughput_rps")),
            "",
        ]
    )
    aws = index.get(("c1", "aws_assume_role", OURS), {})
    direct = index.get(("c1", "aws_assume_role", "moto-direct"), {})
    out.append(
        [
            "c1 AWS grant / direct AssumeRole p50",
            _ratio(aws.get("p50_ms"), direct.get("p50_ms")),
            "<= 1.2",
        ]
    )
    pg = {(r.get("scenario"), r.get("system")): r for r in load.get("two_replicas_pg", [])}
    if pg:
        ours_pg = pg.get(("vault_token", OURS), {})
        ceil_pg = pg.get(("vault_token", CEILING), {})
        out.append(
            [
                "pg2-c16 exchange / ceiling req/s",
                _ratio(ours_pg.get("throughput_rps"), ceil_pg.get("throughput_rps")),
                ">= 0.5",
            ]
        )
    return out


def render_load(load: dict[str, Any]) -> str:
    from bench.exchange import RESULT_HEADERS, result_cells, table

    rows = [r for r in [*load["results"], *load.get("two_replicas_pg", [])] if "scenario" in r]
    results = table(
        [*RESULT_HEADERS, "cpu ms/req"],
        [[*result_cells(r), r.get("cpu_ms_per_request")] for r in rows],
    )
    ratios = load_ratios(load)
    if not load["results"]:  # only the two replicas ran (--only-pg-replicas)
        ratios = [r for r in ratios if r[0].startswith("pg2-")]
    judged = table(["figure", "value", "target"], ratios)
    own = table(
        ["level", "own p50 ms", "own p99 ms"],
        [[level, v["p50_ms"], v["p99_ms"]] for level, v in load["own_time"].items()]
        or [["-", None, None]],
    )
    facts = []
    if "peak_rss_mb_after_c64" in load:
        facts.append(
            f"broker peak RSS after c64: {load['peak_rss_mb_after_c64']} MiB (target <= 150)"
        )
    pg_ours = [
        r for r in load.get("two_replicas_pg", []) if r.get("store_cpu_ms_per_request") is not None
    ]
    if pg_ours:
        facts.append(
            "two PostgreSQL replicas: PostgreSQL's CPU ms per exchange (all its processes):"
            f" {pg_ours[0]['store_cpu_ms_per_request']}"
        )
    chain = [r for r in load.get("two_replicas_pg", []) if "chain_verifies" in r]
    if chain:
        facts.append(
            f"two PostgreSQL replicas wrote one chain; verifies: {chain[0]['chain_verifies']}"
        )
    return "\n".join(
        [
            "load section (cpu ms/req: the serving process's CPU over the requests, warm-ups in):",
            results,
            "",
            "ratios in this run:",
            judged,
            "",
            "broker's own time per exchange (Server-Timing total - mint;"
            " targets p50 <= 1, p99 <= 5):",
            own,
            "",
            *facts,
        ]
    )
