"""Benchmark: what per-task credentials cost a Luigi pipeline, next to static credentials.

Owns the client-side benchmark. One run starts, on loopback, the dev OIDC issuer, moto (STS, S3)
and our broker (through the dev harness, broker/dev/harness.py), then:

1. **pipeline**: the same pipeline (`--tasks` tasks, each one S3 put to moto, `--workers` workers,
   `force_multiprocessing`) in a fresh job process per run, with
   - `static`: the tasks' plain boto3 finds static keys in the environment (the peer);
   - `zero`: the same task code, credentials from `[worker] task_process_context =
     luigi_creds.TaskCredentials`, the job run under `luigi-creds exec` (the zero-code path);
   - `mixin`: `CredentialsMixin` tasks using `self.aws_session(grant)`;
   - `mixin-before` (with `--before DIR`): the mixin against an older luigi_creds package
     (e.g. `git archive <commit> luigi_creds | tar -x -C DIR`), for before/after in one run;
     `zero-before` (name it in `--variants`, with `--before DIR`): the same for the task
     processes' TaskCredentials (the agent in `luigi-creds exec` stays this checkout's);
   - `zero-onechain`, `mixin-onechain` (name them in `--variants`): the job's session on one
     refresh chain (`[luigi_creds] refresh_chains = 1`), its mints one at a time as before
     sibling chains, for the chains' effect in one run;
   - `zero-nopreload`, `mixin-nopreload` (name them in `--variants`): the job run with
     `LUIGI_CREDS_PRELOAD=0`, so exec's bootstrap does not preload the task-process modules
     into the scheduling process (each task process imports them itself, as before it).
   - `zero-nolaunch` (name it in `--variants`): the job run with `LUIGI_CREDS_EARLY_START=0`:
     no early start of each task's credentials before its fork (luigi_creds/launch.py).
   Variants alternate within each round (the order rotates every round); the wall time of
   `luigi.build` is taken inside the job (process start-up excluded); medians per variant and
   the overhead over `static` are reported.
2. **first credential** (zero-code): per task, from `TaskCredentials` entering to the task's first
   usable credential (a probe thread asking as the task starts holds the minted keys), split
   into phases: settings, the start request (the agent starts the mint), set-up while the mint
   runs, what was left to wait for it, Luigi and the SDK until the keys are in hand.
   Compared with the broker exchange itself: `--exchanges` sequential refresh mints straight to
   the broker (p50), and a direct `AssumeRole` on the same moto (the upstream's share).
   Since the early start (the mint set going before the fork), also from Luigi's start of the
   task (`TaskProcess.start` in the scheduling process, before the fork and before anything
   luigi-creds does there) to the first usable credential, next to static's (Luigi's own fork
   and start-up until the task holds its keys).
3. **cached access**: µs per call of reading a credential a task already has: AWS through
   botocore's refreshable credentials (the mixin's session, and the zero-code container
   provider's), Vault through the mixin's `credential(grant)` and `VAULT_TOKEN`.

4. **CPU per task** (each pipeline run), ms per task by process group and over static's: the
   scheduling process (its whole life: `getrusage(RUSAGE_SELF)` at the job's end), its task
   processes (`RUSAGE_CHILDREN`, every one reaped first), the agent (`luigi-creds exec`, our
   job's parent: `/proc/<pid>/stat` from the job's start to its end), the rest of the job's
   tree (exec's start-up and exit, the job process's exit: outside the timed window), the
   broker and moto (`/proc/<pid>/stat` before and after the run).

The machine is shared and noisy: figures are medians of alternated runs and ratios to the peer
in the same run. Talks to the servers over loopback HTTP only.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "bench-client"
GRANT = "etl-writer"
# Moto accepts any keys: what the static peer signs with.
VARIANTS = ("static", "zero", "mixin")
UNLIMITED_RATE = "{ per_second = 1000000, burst = 1000000 }"


# -- the job (runs in its own process: `python -m bench.client job ...`) -------------------------


def _marker_dir() -> Path:
    return Path(os.environ["BENCH_OUT"])


def _put(s3: Any, n: int, body: str) -> None:
    s3.put_object(Bucket=BUCKET, Key=f"{os.environ['BENCH_PREFIX']}/{n}", Body=body.encode())


def _timings() -> dict[str, float]:
    """TaskCredentials' phases in this task's process (zero-code variant), if it ran."""
    module = sys.modules.get("luigi_creds.task_process")
    timings = getattr(module, "last_timings", None)
    if timings is None:
        return {}
    return {
        "launched": timings.launched or None,
        "entered": timings.entered,
        "settings": timings.settings,
        "agent": timings.agent,
        "context": timings.done - timings.entered,
        "aws_wait": timings.aws,
    }


def _time_the_forks() -> None:
    """Note on each Luigi task process when the scheduling process started it (before the fork,
    and before anything luigi-creds does there): the task's start, as Luigi sees it."""
    from luigi.worker import TaskProcess

    start = TaskProcess.start

    def timed_start(self: Any) -> None:
        self.bench_started_at = time.perf_counter()
        start(self)

    TaskProcess.start = timed_start  # type: ignore[method-assign]


def _fingerprint(access_key_id: str) -> str:
    """What a marker keeps of the task's access key id: enough to tell keys apart (every task's
    must differ), nothing that looks like a credential in a result file."""
    return hashlib.sha256(access_key_id.encode()).hexdigest()[:16]


def _forked_at() -> float | None:
    """When the scheduling process started this task process (perf_counter: one clock for all
    processes on Linux), if Luigi forked it."""
    import multiprocessing

    return getattr(multiprocessing.current_process(), "bench_started_at", None)


def _plain_run(task: Any) -> None:
    """One S3 put with whatever boto3's default chain finds (static keys, or TaskCredentials'),
    as S3 tasks do it: build the client, call it.

    A probe thread asks for the credentials as the task starts, to time when they are usable
    (TaskCredentials has them in hand before the task runs); the task's own calls share them.
    The static peer runs the same probe.
    """
    import threading

    import boto3

    started = time.perf_counter()
    if boto3.DEFAULT_SESSION is None:
        boto3.setup_default_session()
    session = boto3.DEFAULT_SESSION
    creds = session.get_credentials()  # resolved once, before the probe and the client share it
    usable: list[tuple[str, float]] = []
    probe = threading.Thread(
        target=lambda: usable.append(
            (creds.get_frozen_credentials().access_key, time.perf_counter())
        )
    )
    probe.start()
    s3 = session.client("s3", endpoint_url=os.environ["BENCH_S3_URL"], region_name="us-east-1")
    built = time.perf_counter()
    _put(s3, task.n, task.task_id)
    probe.join()
    key_id, usable_at = usable[0]
    marker = {
        "task": task.task_id,
        "key": _fingerprint(key_id),
        "client": built - started,
        "forked": _forked_at(),
        "run_started": started,
        "usable": usable_at,
    }
    marker.update(_timings())
    (_marker_dir() / f"{task.n}.json").write_text(json.dumps(marker))


def _task_classes(variant: str) -> type:
    """The task class of `variant`; the mixin's is defined only when asked for, so the static
    and zero-code jobs never import luigi_creds in the job's own process."""
    import luigi
    from luigi.contrib.s3 import S3Target

    def s3_output(self: Any) -> S3Target:
        # Checked with exists() by the scheduling process, as S3 pipelines do.
        return S3Target(f"s3://{BUCKET}/{os.environ['BENCH_PREFIX']}/{self.n}")

    if variant in ("static", "zero"):

        class BenchPut(luigi.Task):
            n = luigi.IntParameter()
            output = s3_output

            def run(self) -> None:
                _plain_run(self)

        return BenchPut

    from luigi_creds import CredentialsMixin

    class BenchMixinPut(CredentialsMixin, luigi.Task):
        grants = (GRANT,)
        n = luigi.IntParameter()
        output = s3_output

        def run(self) -> None:
            import threading

            # As in the zero-code task: a probe asks for the task's credential as the task
            # starts, while the task builds its session and client.
            started = time.perf_counter()
            held: list[float] = []
            probe = threading.Thread(
                target=lambda: held.append((self.credential(GRANT), time.perf_counter())[1])
            )
            probe.start()
            session = self.aws_session(GRANT, region_name="us-east-1")
            s3 = session.client("s3", endpoint_url=os.environ["BENCH_S3_URL"])
            key_id = session.get_credentials().get_frozen_credentials().access_key
            built = time.perf_counter()
            probe.join()
            _put(s3, self.n, self.task_id)
            marker = {
                "task": self.task_id,
                "key": _fingerprint(key_id),
                "sdk": built - started,
                "forked": _forked_at(),
                "run_started": started,
                "usable": held[0],
            }
            (_marker_dir() / f"{self.n}.json").write_text(json.dumps(marker))

    return BenchMixinPut


def _kind(variant: str) -> str:
    """static, zero or mixin: what a variant runs (its suffix says with what)."""
    for suffix in ("-before", "-onechain", "-nopreload", "-nolaunch"):
        variant = variant.removesuffix(suffix)
    return variant


def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc; clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rusage_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def job_cpu(parent_at_start: float | None) -> dict[str, float | None]:
    """CPU seconds of this job so far, by process group: this (scheduling) process since it
    started, its reaped task processes, and, under `luigi-creds exec`, the agent's process
    (exec, our parent) since this process started."""
    parent = None
    if parent_at_start is not None:
        parent = _proc_cpu_seconds(os.getppid()) - parent_at_start
    import multiprocessing

    # Luigi leaves the last task processes unreaped (they are joined at interpreter exit): a
    # process's CPU counts among its parent's children only once it has been waited for.
    for process in multiprocessing.active_children():
        process.join()
    return {
        "scheduling": _rusage_seconds(resource.RUSAGE_SELF),
        "tasks": _rusage_seconds(resource.RUSAGE_CHILDREN),
        "agent": parent,
    }


def job(variant: str, tasks: int, workers: int) -> dict[str, Any]:
    """Run the pipeline once in this process; the wall time of luigi.build and what it did."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import luigi

    # As in a pipeline whose scheduling process checks S3 targets: boto3 is loaded before the
    # workers fork, in every variant, so what is compared is credentials, not imports.
    import boto3  # noqa: F401

    # Under `luigi-creds exec` (unless turned off), exec's bootstrap loaded the task-process
    # modules into this process once luigi and boto3 were imported: the forks inherit them.
    preloaded = "luigi_creds.task_process" in sys.modules
    _time_the_forks()
    cls = _task_classes(_kind(variant))
    batch = [cls(n=n) for n in range(tasks)]
    started = time.perf_counter()
    ok = luigi.build(batch, workers=workers, local_scheduler=True, log_level="WARNING")
    wall = time.perf_counter() - started
    markers = [json.loads(p.read_text()) for p in sorted(_marker_dir().glob("*.json"))]
    return {"ok": bool(ok), "wall": wall, "markers": markers, "preloaded": preloaded}


# -- the stack and the runs ---------------------------------------------------------------------


@dataclass
class Stack:
    issuer: Any
    moto: Any
    broker: Any
    workdir: Path

    def token(self) -> str:
        return str(self.issuer.mint("gitlab", ttl=900))

    def server_cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the broker and by moto (S3 and STS)."""
        # Imported here: the job process (`python -m bench.client job`) must not pay for it.
        from bench.load import cpu_seconds

        return {
            "broker": cpu_seconds(self.broker.process.pid),
            "moto": cpu_seconds(self.moto.process.pid),
        }


@contextmanager
def running_stack(
    workdir: Path, grant_ttl: str = "15m", *, broker_single_cpu: bool = True
) -> Iterator[Stack]:
    from broker.dev.harness import policy_toml, start_broker, start_dev_issuer, start_moto
    from broker.dev.processes import free_port

    with ExitStack() as stop:
        issuer = start_dev_issuer(workdir, algs="RS256")
        stop.callback(issuer.stop)
        moto = start_moto(workdir)
        stop.callback(moto.stop)
        role_arn = moto.create_role(GRANT)
        moto.client("s3").create_bucket(Bucket=BUCKET)
        listen = f"127.0.0.1:{free_port()}"
        config = policy_toml(
            issuer_url=issuer.url,
            audit_db=workdir / "audit.db",
            listen=listen,
            moto_url=moto.url,
            role_arn=role_arn,
            broker_extra=(
                f"rate_limit_identity = {UNLIMITED_RATE}\nrate_limit_grant = {UNLIMITED_RATE}"
                f"\nsingle_cpu = {str(broker_single_cpu).lower()}"
            ),
            grant_ttl=grant_ttl,
        )
        broker = start_broker(workdir / "broker", config, env=moto.broker_env)
        stop.callback(broker.stop)
        yield Stack(issuer, moto, broker, workdir)


def _job_env(
    stack: Stack, variant: str, out: Path, cfg: Path, before: Path | None
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "LUIGI_CREDS_", "VAULT_", "LUIGI_CONFIG"))
    }
    python_path = [str(REPO_ROOT)]
    if variant.endswith("-before") and before is not None:
        env["BENCH_BEFORE"] = str(before.resolve())
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(python_path),
            "LUIGI_CONFIG_PATH": str(cfg),
            "BENCH_OUT": str(out),
            "BENCH_S3_URL": stack.moto.url,
            "BENCH_PREFIX": out.parent.name,
            "BENCH_TOKEN": stack.token(),
            "AWS_CONFIG_FILE": str(stack.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(stack.workdir / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    if variant.endswith("-nopreload"):
        # exec's bootstrap loads nothing into the job's scheduling process (as before it).
        env["LUIGI_CREDS_PRELOAD"] = "0"
    if variant.endswith("-nolaunch"):
        env["LUIGI_CREDS_EARLY_START"] = "0"  # luigi_creds.launch.EARLY_START_VARIABLE
    if variant == "static":
        # Static credentials as a pipeline without luigi-creds has them: a long-lived IAM user
        # key (moto's administrator, since moto checks every signature) in the environment.
        env.update(stack.moto.server.admin.env())
    return env


def run_variant(
    stack: Stack, variant: str, tasks: int, workers: int, before: Path | None
) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=stack.workdir))
    out = run_dir / "out"
    out.mkdir()
    cfg = run_dir / "luigi.cfg"
    zero = _kind(variant) == "zero"
    context = "task_process_context = luigi_creds.TaskCredentials\n" if zero else ""
    cfg.write_text(
        "[core]\nautoload_range = false\n"
        f"\n[worker]\nforce_multiprocessing = true\n{context}"
        f"\n[s3]\nendpoint_url = {stack.moto.url}\nregion_name = us-east-1\n"
        f"\n[luigi_creds]\nbroker_url = {stack.broker.url}\ntoken_source = env:BENCH_TOKEN\n"
        + (f"aws_grant = {GRANT}\n" if zero else "")
        + ("refresh_chains = 1\n" if variant.endswith("-onechain") else "")
    )
    result = run_dir / "result.json"
    argv = [sys.executable, "-m", "bench.client", "job", variant, str(tasks), str(workers),
            str(result)]  # fmt: skip
    if variant != "static":
        # Under exec, the scheduling process has credentials for its S3 checks too.
        argv = [str(BIN / "luigi-creds"), "exec", "--grant", GRANT, "--", *argv]
    env = _job_env(stack, variant, out, cfg, before)
    servers_before = stack.server_cpu()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        argv, env=env, cwd=run_dir, capture_output=True, text=True, timeout=900, check=False
    )
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    servers_after = stack.server_cpu()
    if done.returncode != 0 or not result.exists():
        raise SystemExit(f"{variant} job failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(result.read_text())
    keys = {m["key"] for m in report["markers"]}
    if not report["ok"] or len(report["markers"]) != tasks:
        raise SystemExit(f"{variant} job did not run every task:\n{done.stderr[-3000:]}")
    if variant != "static" and len(keys) != tasks:
        raise SystemExit(f"{variant}: {len(keys)} distinct keys for {tasks} tasks")
    # CPU seconds spent on the run: the job's whole process tree (exec and its agent, Luigi,
    # every task process), and the servers it used. On a saturated machine wall time follows
    # total CPU, so this says where an overhead comes from.
    tree = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    own = report.pop("cpu")
    agent = own["agent"] or 0.0
    report["cpu_s"] = {
        "job tree (client side)": tree,
        "scheduling process": own["scheduling"],
        "task processes": own["tasks"],
        "agent (exec, while the job ran)": agent,
        # exec's start-up (its imports, the session's exchange, its own grant's mint) and
        # exit (revoke, summary), and the job process's own exit: the tree's remainder.
        "exec start-up/exit, job exit": tree - own["scheduling"] - own["tasks"] - agent,
        **{k: servers_after[k] - servers_before[k] for k in servers_after},
    }
    return report


def broker_exchange(stack: Stack, count: int) -> dict[str, Any]:
    """p50 of the broker's own refresh mint (our client, straight to the broker; through httpx
    and through the agent's http.client poster, with the client's CPU per mint) and of a direct
    AssumeRole on the same moto (the upstream's share of it), in ms."""
    import httpx

    from luigi_creds.client import BrokerClient
    from luigi_creds.identity import EnvTokenSource

    def clock() -> datetime:
        return datetime.now(UTC)

    from luigi_creds.broker_http import BrokerHttp

    # The same mints through httpx (as before: the ratio's reference) and through the agent's
    # own http.client poster, alternated; each on a session of its own.
    kept_alive = BrokerHttp(timeout=30)
    mints: dict[str, list[float]] = {"httpx": [], "http.client": []}
    cpu: dict[str, list[float]] = {"httpx": [], "http.client": []}
    with httpx.Client(timeout=30) as http:
        clients = {}
        for name, poster in (("httpx", http), ("http.client", kept_alive)):
            environ = {"BENCH_TOKEN": stack.token()}
            clients[name] = BrokerClient(
                stack.broker.url, EnvTokenSource("BENCH_TOKEN", environ), http=poster, clock=clock
            )
            clients[name].mint(GRANT, task="bench-warmup")
            clients[name].mint(GRANT, task="bench-warmup-2")
        for n in range(count):
            for name, client in clients.items():
                started, on_cpu = time.perf_counter(), time.thread_time()
                client.mint(GRANT, task=f"bench-{name}-{n}")
                mints[name].append(time.perf_counter() - started)
                cpu[name].append(time.thread_time() - on_cpu)
        for client in clients.values():
            client.revoke()
    kept_alive.close()
    # The direct call as the broker makes it: signed by the broker's own IAM user, whom the
    # role trusts (moto enforces that).
    sts = stack.moto.server.client("sts", stack.moto.server.broker)
    role = f"arn:aws:iam::123456789012:role/{GRANT}"
    sts.assume_role(RoleArn=role, RoleSessionName="warm")
    direct = []
    for n in range(count):
        started = time.perf_counter()
        sts.assume_role(RoleArn=role, RoleSessionName=f"bench-{n}")
        direct.append(time.perf_counter() - started)
    return {
        "broker_refresh_p50_ms": statistics.median(mints["httpx"]) * 1000,
        "broker_refresh_http_client_p50_ms": statistics.median(mints["http.client"]) * 1000,
        "client_cpu_per_mint_ms": {k: statistics.median(v) * 1000 for k, v in cpu.items()},
        "assume_role_p50_ms": statistics.median(direct) * 1000,
    }


def _per_call(fn: Callable[[], object], calls: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def cached_access(calls: int) -> dict[str, float]:
    """µs per call of reading a credential a task already holds, each path as a task meets it.

    A real agent (in this process, a fake mint behind it) serves the zero-code paths, with a
    15-minute credential: botocore's container provider then asks the agent again on every
    call (its refresh windows are 15/10 minutes), which is why TaskCredentials gives boto3's
    default session a provider with windows scaled to the lifetime.
    """
    import boto3
    import botocore.session

    from luigi_creds.aws import aws_session
    from luigi_creds.credentials import AwsCredentials
    from luigi_creds.serve import AgentClient, CredentialAgent, container_env

    def fake_mint(grant: str, task: str | None, duration: int | None) -> AwsCredentials:
        expires = datetime.now(UTC) + timedelta(minutes=15)
        return AwsCredentials(grant, "r", "AKIABENCH", "secret", "token", expires)

    agent = CredentialAgent(fake_mint, clock=lambda: datetime.now(UTC))
    root = AgentClient(agent.start())
    task = AgentClient(root.scoped([GRANT], "Bench(n=1)"))
    saved = dict(os.environ)
    try:
        os.environ.update(container_env(task.endpoint, GRANT, "Bench(n=1)"))
        container = botocore.session.Session().get_credentials()
        default = aws_session(lambda: task.aws(GRANT, "Bench(n=1)")).get_credentials()
        mixin = aws_session(lambda: fake_mint(GRANT, None, None)).get_credentials()
        vault_user = _vault_mixin_task()
        os.environ["VAULT_TOKEN"] = "hvs.bench"
        figures = {
            "aws_mixin_session_us": _per_call(mixin.get_frozen_credentials, calls),
            "aws_zero_code_default_session_us": _per_call(default.get_frozen_credentials, calls),
            "aws_zero_code_container_provider_us": _per_call(
                container.get_frozen_credentials, max(calls // 100, 100)
            ),
            "vault_mixin_credential_us": _per_call(
                lambda: vault_user.credential("etl-vault"), calls
            ),
            "vault_zero_code_env_token_us": _per_call(lambda: os.environ["VAULT_TOKEN"], calls),
        }
        del boto3  # imported so the default-session path is what a task with boto3 loaded gets
        return figures
    finally:
        os.environ.clear()
        os.environ.update(saved)
        task.close()
        root.close()
        agent.stop()


def _vault_mixin_task() -> Any:
    """A CredentialsMixin task holding a start-minted Vault token, as inside run()."""
    import luigi

    from luigi_creds.credentials import VaultToken
    from luigi_creds.luigi import CredentialsMixin, _states, _TaskState

    class VaultUser(CredentialsMixin, luigi.Task):
        grants = ("etl-vault",)

    user = VaultUser()
    expires = datetime.now(UTC) + timedelta(minutes=15)
    vault = VaultToken("etl-vault", "r", "hvs.bench", "acc", ("p",), True, 900, expires)
    _states[user.task_id] = _TaskState(agent=None, minted={"etl-vault": vault})
    return user


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


# The process groups a run's CPU is split into (each run's `cpu_s`, less the tree's total).
CPU_GROUPS = (
    "scheduling process",
    "task processes",
    "agent (exec, while the job ran)",
    "exec start-up/exit, job exit",
    "broker",
    "moto",
)


def _cpu_per_task(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per variant, ms of CPU per task of each process group and of them all (median of runs)."""
    figures: dict[str, dict[str, float]] = {}
    for variant, rs in runs.items():
        if not rs:
            continue
        per_run = [{g: r["cpu_s"][g] * 1000 / len(r["markers"]) for g in CPU_GROUPS} for r in rs]
        for groups in per_run:
            groups["total"] = sum(groups.values())
        figures[variant] = {
            g: statistics.median(groups[g] for groups in per_run) for g in (*CPU_GROUPS, "total")
        }
    return figures


def summarize(runs: dict[str, list[dict[str, Any]]], exchange: dict[str, Any]) -> dict[str, Any]:
    walls = {v: [r["wall"] for r in rs] for v, rs in runs.items()}
    medians = {v: statistics.median(w) for v, w in walls.items()}
    static = medians.get("static")
    overhead = {v: (m / static - 1) * 100 for v, m in medians.items() if static and v != "static"}
    first: dict[str, Any] = {}
    zero = [m for r in runs.get("zero", []) for m in r["markers"] if "entered" in m]
    if zero:
        # Usable: when the probe that asked as the task started had the minted keys in hand.
        total = [m["usable"] - m["entered"] for m in zero]
        phases = {
            "settings": [m["settings"] for m in zero],
            "task bearer (the mint starts)": [m["agent"] for m in zero],
            "set-up while the mint runs": [
                m["context"] - m["settings"] - m["agent"] - m["aws_wait"] for m in zero
            ],
            "left to wait for the mint": [m["aws_wait"] for m in zero],
            "Luigi and the SDK until the keys are in hand": [
                m["usable"] - m["entered"] - m["context"] for m in zero
            ],
        }
        # The whole context (settings, bearer, environment, default session), and Luigi's own
        # work between the context and run().
        context = [m["context"] for m in zero]
        luigi_gap = [m["run_started"] - m["entered"] - m["context"] for m in zero]
        clients = {
            v: statistics.median([m["client"] for r in runs[v] for m in r["markers"]]) * 1000
            for v in ("static", "zero")
            if runs.get(v)
        }
        # From Luigi's start of the task (TaskProcess.start, before the fork): what the task
        # sees in all. The static peer's figure is Luigi's own fork and start-up.
        from_start = {
            v: [m["usable"] - m["forked"] for r in runs[v] for m in r["markers"] if m.get("forked")]
            for v in runs
        }
        to_context = [m["entered"] - m["forked"] for m in zero if m.get("forked")]
        broker_ms = exchange["broker_refresh_p50_ms"]
        upstream_ms = exchange["assume_role_p50_ms"]
        first = {
            # The mint the task waits for, split with figures measured beside it: the broker's
            # own refresh mint and a direct AssumeRole on the same moto.
            "split_p50_ms": {
                "broker (its mint minus AssumeRole)": broker_ms - upstream_ms,
                "upstream (AssumeRole on moto)": upstream_ms,
            },
            "p50_ms": statistics.median(total) * 1000,
            "p95_ms": _pct(total, 95) * 1000,
            "phases_p50_ms": {k: statistics.median(v) * 1000 for k, v in phases.items()},
            "ratio_to_broker_exchange": statistics.median(total) * 1000 / broker_ms,
            "context_p50_ms": statistics.median(context) * 1000,
            "from_luigi_start_p50_ms": {
                v: statistics.median(t) * 1000 for v, t in from_start.items() if t
            },
            "luigi_start_to_context_p50_ms": statistics.median(to_context) * 1000
            if to_context
            else None,
            "luigi_before_run_p50_ms": statistics.median(luigi_gap) * 1000,
            # boto3 client construction; with TaskCredentials it runs while the mint does.
            "client_construction_p50_ms": clients,
        }
    cpu = {
        v: {k: statistics.median(r["cpu_s"][k] for r in rs) for k in rs[0]["cpu_s"]}
        for v, rs in runs.items()
        if rs
    }
    per_task = _cpu_per_task(runs)
    static_cpu = per_task.get("static")
    return {
        # Whether every run's scheduling process had the task-process modules before it forked.
        "preloaded": {v: all(r["preloaded"] for r in rs) for v, rs in runs.items() if rs},
        "cpu_s_median": cpu,
        # ms of CPU per task by process group (median over the runs), and over static's.
        "cpu_ms_per_task": per_task,
        "cpu_ms_per_task_over_static": {
            v: {k: ms - static_cpu[k] for k, ms in groups.items()}
            for v, groups in per_task.items()
            if static_cpu is not None and v != "static"
        },
        "wall_s": walls,
        "median_s": medians,
        "overhead_pct": overhead,
        "first_credential": first,
        # Every zero-code variant's start to first usable credential (p50 ms), side by side.
        "first_credential_p50_ms": {
            v: statistics.median(
                m["usable"] - m["entered"] for r in rs for m in r["markers"] if "entered" in m
            )
            * 1000
            for v, rs in runs.items()
            if _kind(v) == "zero" and rs
        },
    }


def _render_cpu_per_task(
    per_task: dict[str, dict[str, float]], over: dict[str, dict[str, float]]
) -> list[str]:
    """ms of CPU per task by process group, each variant, and (in brackets) over static."""
    variants = list(per_task)
    lines = [
        "CPU ms per task by process group (median of runs; [over static]):",
        f"  {'group':<34}" + "".join(f"{v:>22}" for v in variants),
    ]
    for group in (*CPU_GROUPS, "total"):
        cells = []
        for v in variants:
            diff = over.get(v, {}).get(group)
            extra = "" if diff is None else f" [{diff:+.1f}]"
            cells.append(f"{per_task[v][group]:.1f}{extra}".rjust(22))
        lines.append(f"  {group:<34}" + "".join(cells))
    return lines


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    pinned = "on one CPU (single_cpu)" if report.get("broker_single_cpu") else "kernel-placed"
    lines = [
        f"pipeline: {report['tasks']} tasks, --workers {report['workers']}, "
        f"force_multiprocessing, {report['rounds']} alternated rounds; broker {pinned}",
        f"{'variant':<14}{'median s':>10}{'overhead':>10}   runs (s)",
    ]
    for variant, median in s["median_s"].items():
        over = s["overhead_pct"].get(variant)
        runs = " ".join(f"{w:.2f}" for w in s["wall_s"][variant])
        over_text = "peer" if over is None else f"{over:+.1f}%"
        lines.append(f"{variant:<14}{median:>10.2f}{over_text:>10}   {runs}")
    lines.append(
        "CPU seconds per run (median): "
        + "; ".join(
            f"{v}: " + ", ".join(f"{k} {c:.1f}" for k, c in parts.items())
            for v, parts in s["cpu_s_median"].items()
        )
    )
    lines.extend(_render_cpu_per_task(s["cpu_ms_per_task"], s["cpu_ms_per_task_over_static"]))
    ex = report["exchange"]
    lines.append(
        f"broker refresh mint p50 {ex['broker_refresh_p50_ms']:.1f} ms; direct AssumeRole on "
        f"moto p50 {ex['assume_role_p50_ms']:.1f} ms"
    )
    lines.append(
        "the same mint through the agent's http.client poster: p50 "
        f"{ex['broker_refresh_http_client_p50_ms']:.1f} ms; client CPU per mint (p50): "
        + ", ".join(f"{k} {ms:.2f} ms" for k, ms in ex["client_cpu_per_mint_ms"].items())
    )
    first = s["first_credential"]
    if first:
        lines.append(
            f"zero-code task start -> first usable credential: p50 {first['p50_ms']:.1f} ms, "
            f"p95 {first['p95_ms']:.1f} ms ({first['ratio_to_broker_exchange']:.2f}x the broker "
            "exchange)"
        )
        for phase, ms in first["phases_p50_ms"].items():
            lines.append(f"  {phase:<44}{ms:8.1f} ms (p50)")
        lines.append(
            f"  (the whole context {first['context_p50_ms']:.1f} ms; Luigi's own work before "
            f"run() {first['luigi_before_run_p50_ms']:.1f} ms, p50)"
        )
        from_start = first.get("from_luigi_start_p50_ms") or {}
        if "zero" in from_start:
            lines.append(
                "from Luigi's start of the task (before its fork) -> first usable credential: "
                f"p50 zero {from_start['zero']:.1f} ms "
                f"({from_start['zero'] / ex['broker_refresh_p50_ms']:.2f}x the broker exchange), "
                f"static {from_start.get('static', float('nan')):.1f} ms; Luigi's start to the "
                f"context {first['luigi_start_to_context_p50_ms']:.1f} ms"
            )
            lines.append(
                "  from Luigi's start, p50 by variant: "
                + ", ".join(f"{v} {ms:.1f} ms" for v, ms in from_start.items())
            )
        for phase, ms in first["split_p50_ms"].items():
            lines.append(f"    {phase:<42}{ms:8.1f} ms (derived)")
        built = ", ".join(
            f"{v} {ms:.1f} ms" for v, ms in first["client_construction_p50_ms"].items()
        )
        lines.append(f"then the S3 client's construction (p50, not a credential cost): {built}")
    by_variant = s["first_credential_p50_ms"]
    if len(by_variant) > 1:
        lines.append(
            "start -> first usable credential p50 by variant: "
            + ", ".join(f"{v} {ms:.1f} ms" for v, ms in by_variant.items())
        )
    lines.append("cached credential access (µs per call):")
    for name, us in report["cached_us"].items():
        lines.append(f"  {name:<36}{us:8.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["job"]:
        variant, tasks, workers, result = args[1], int(args[2]), int(args[3]), Path(args[4])
        # Under `luigi-creds exec` our parent is exec, which runs the job's agent: its CPU
        # from here on is the agent's work for this job (exec's own start-up is before).
        under_exec = _kind(variant) != "static"
        parent_at_start = _proc_cpu_seconds(os.getppid()) if under_exec else None
        before = os.environ.get("BENCH_BEFORE")
        if before:
            # The older package must win over this checkout's editable install, whose finder
            # comes before sys.path.
            sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in str(f)]
            sys.path.insert(0, before)
        report = job(variant, tasks, workers)
        report["cpu"] = job_cpu(parent_at_start)
        result.write_text(json.dumps(report))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.client", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exchanges", type=int, default=50)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    # 15m keeps the figures comparable with earlier runs. Up to 15 minutes botocore's
    # container provider (the scheduling process's S3 checks under `luigi-creds exec`) asks
    # the agent again at every call; the broker's default grant ttl is 1h.
    parser.add_argument(
        "--grant-ttl", default="15m", help="the grant's ttl (a policy duration, e.g. 1h)"
    )
    parser.add_argument("--before", type=Path, help="an older luigi_creds to compare the mixin")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--pinned-broker",
        action="store_true",
        help="run the broker with its default [broker] single_cpu = true; by default the "
        "benchmark's broker, which shares the pipeline's cores, leaves placement to the kernel "
        "(as the README advises for a host whose CPUs busy processes share)",
    )
    parser.add_argument("--workdir", type=Path)
    opts = parser.parse_args(args)
    variants = [v for v in opts.variants.split(",") if v]
    if opts.before is not None and not any(v.endswith("-before") for v in variants):
        variants.append("mixin-before")
    load = os.getloadavg()
    # An installed package ships compiled bytecode; this checkout's editable install, under
    # PYTHONDONTWRITEBYTECODE, would compile luigi_creds again in every task process.
    for package in (REPO_ROOT / "luigi_creds", opts.before):
        if package is not None:
            compileall.compile_dir(str(package), quiet=1)
    with ExitStack() as stop:
        workdir = opts.workdir or Path(
            stop.enter_context(tempfile.TemporaryDirectory(prefix="bench-client-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        stack = stop.enter_context(
            running_stack(workdir, opts.grant_ttl, broker_single_cpu=opts.pinned_broker)
        )
        exchange = broker_exchange(stack, opts.exchanges)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for variant in variants:  # warm-up: caches, .pyc files, moto's first requests
            run_variant(stack, variant, min(opts.tasks, 8), opts.workers, opts.before)
        for round_ in range(opts.rounds):
            order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
            for variant in order:
                report = run_variant(stack, variant, opts.tasks, opts.workers, opts.before)
                runs[variant].append(report)
                print(f"round {round_ + 1} {variant}: {report['wall']:.2f} s", file=sys.stderr)
    full = {
        "tasks": opts.tasks,
        "workers": opts.workers,
        "rounds": opts.rounds,
        "broker_single_cpu": opts.pinned_broker,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load,
            "loadavg_after": os.getloadavg(),
        },
        "exchange": exchange,
        "cached_us": cached_access(opts.calls),
        "summary": summarize(runs, exchange),
    }
    print(render(full))
    if opts.json:
        # Each task's marker too (its key id only: nothing secret), for reading phases apart.
        full["markers"] = {v: [r["markers"] for r in rs] for v, rs in runs.items()}
        opts.json.write_text(json.dumps(full, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
