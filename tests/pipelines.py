"""Luigi pipelines for the end-to-end tests, run as real `luigi.build` jobs in a child process.

Owns the task classes of tests/test_luigi_e2e.py and the job runner they start with
`python -c "import pipelines; pipelines.main()"`: a module of its own, so forked Luigi workers and
`force_multiprocessing` task processes import the same classes, and so each job has its own
process (Luigi's config, the luigi-creds agent and the log are per job, as in production).
Talks to moto's S3 and to OpenBao through the credentials luigi_creds gives each task; the runner
reads `[core]`/`[worker]`/`[luigi_creds]` from the luigi.cfg named by LUIGI_CONFIG_PATH.

Each task writes a small JSON marker (its task id, its process id, the credential references it
used; never a secret) into the job's output directory, which is what the tests assert on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

with warnings.catch_warnings():
    # Luigi 3.8 warns at import unless [core] autoload_range is set; the job's luigi.cfg sets it.
    warnings.simplefilter("ignore", DeprecationWarning)
    import luigi

from luigi_creds import CredentialsMixin

# Where the tasks find moto's S3; set by the test for the child job.
S3_URL_VARIABLE = "PIPELINE_S3_URL"
BUCKET = "e2e-pipeline"
# How long Hold waits for the test to say the broker is gone.
GO_TIMEOUT = 60.0


def _s3(task: CredentialsMixin) -> tuple[Any, str]:
    """The task's S3 client and the AccessKeyId it signs with (not a secret)."""
    session = task.aws_session("etl-writer", region_name="us-east-1")
    key_id = session.get_credentials().get_frozen_credentials().access_key
    return session.client("s3", endpoint_url=os.environ[S3_URL_VARIABLE]), key_id


def _write_marker(target: luigi.LocalTarget, body: dict[str, Any]) -> None:
    with target.open("w") as f:
        json.dump(body, f)


class WriteObject(CredentialsMixin, luigi.Task):
    """Puts one object into moto's S3 with the task's own STS credentials."""

    grants = ("etl-writer",)
    n = luigi.IntParameter()
    out = luigi.Parameter()

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(f"{self.out}/write-{self.n}.json")

    def run(self) -> None:
        s3, key_id = _s3(self)
        # Long enough that three workers overlap.
        time.sleep(0.3)
        s3.put_object(
            Bucket=BUCKET,
            Key=f"objects/{self.n}.json",
            Body=json.dumps({"task": self.task_id, "access_key_id": key_id}).encode(),
        )
        _write_marker(
            self.output(),
            {
                "task": self.task_id,
                "pid": os.getpid(),
                "access_key_id": key_id,
                # Whether the job's process set this task's mint going before it forked it.
                "launched": _launched(self.task_id),
            },
        )


def _launched(task_id: str) -> bool:
    from luigi_creds.luigi import _state

    state = _state(task_id)
    return state is not None and state.launched


class Hold(CredentialsMixin, luigi.Task):
    """Starts (minting), waits until the test has stopped the broker, then writes to S3."""

    grants = ("etl-writer",)
    n = luigi.IntParameter()
    out = luigi.Parameter()

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(f"{self.out}/hold-{self.n}.json")

    def run(self) -> None:
        s3, _ = _s3(self)
        Path(f"{self.out}/started-{self.n}").touch()
        go = Path(f"{self.out}/go")
        deadline = time.monotonic() + GO_TIMEOUT
        while not go.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never said go")
            time.sleep(0.05)
        s3.put_object(Bucket=BUCKET, Key=f"held/{self.n}", Body=b"written on cached credentials")
        _write_marker(self.output(), {"task": self.task_id, "pid": os.getpid()})


class Late(CredentialsMixin, luigi.Task):
    """Runs after the Holds, when the broker is gone: it needs a credential nobody has yet."""

    grants = ("etl-writer",)
    out = luigi.Parameter()

    def requires(self) -> list[Hold]:
        return [Hold(n=n, out=self.out) for n in (1, 2)]

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(f"{self.out}/late.json")

    def run(self) -> None:
        _s3(self)[0].put_object(Bucket=BUCKET, Key="late", Body=b"never")
        _write_marker(self.output(), {"task": self.task_id})


class LongVault(CredentialsMixin, luigi.Task):
    """Reads a KV secret with its Vault token for longer than the token lives."""

    grants = ("etl-vault",)
    durations: ClassVar[Mapping[str, int]] = {
        "etl-vault": 12
    }  # seconds; the test's token role caps the max TTL too
    seconds = luigi.FloatParameter()
    out = luigi.Parameter()

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(f"{self.out}/long-vault.json")

    def run(self) -> None:
        client = self.vault_client("etl-vault")
        seen: list[tuple[str, int]] = []
        reads = 0
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            secret = client.secrets.kv.v2.read_secret_version(
                path="etl/db", mount_point="secret", raise_on_deleted_version=True
            )
            assert secret["data"]["data"]["password"] == "etl-kv-value"
            reads += 1
            me = client.auth.token.lookup_self()["data"]
            seen.append((me["accessor"], int(me["ttl"])))
            time.sleep(0.5)
        _write_marker(
            self.output(),
            {"task": self.task_id, "pid": os.getpid(), "reads": reads, "seen": seen},
        )


class UseSecret(CredentialsMixin, luigi.Task):
    """Holds a dynamic database secret while it runs; the lease should end with the task."""

    grants = ("warehouse",)
    out = luigi.Parameter()

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(f"{self.out}/use-secret.json")

    def run(self) -> None:
        data = self.vault_secret("warehouse")
        cred = self.credential("warehouse")
        _write_marker(
            self.output(),
            {
                "task": self.task_id,
                "pid": os.getpid(),
                "username": data["username"],
                "lease_id": getattr(cred, "lease_id", ""),
            },
        )


def build_job(scenario: str, out: str) -> list[luigi.Task]:
    if scenario == "twelve":
        return [WriteObject(n=n, out=out) for n in range(12)]
    if scenario == "broker-down":
        return [Late(out=out)]
    if scenario == "vault":
        return [LongVault(seconds=18.0, out=out), UseSecret(out=out)]
    raise SystemExit(f"unknown scenario {scenario!r}")


def main(argv: list[str] | None = None) -> int:
    """Run one scenario's job; write {"ok", "tasks": {family: [task ids]}} to --result."""
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tasks = build_job(args.scenario, args.out)
    # Workers and force_multiprocessing come from the job's luigi.cfg ([core] / [worker]).
    ok = luigi.build(tasks, local_scheduler=True, log_level="INFO")
    everything: dict[str, list[str]] = {}
    pending = list(tasks)
    while pending:
        task = pending.pop()
        everything.setdefault(task.task_family, [])
        if task.task_id not in everything[task.task_family]:
            everything[task.task_family].append(task.task_id)
        pending.extend(luigi.task.flatten(task.requires()))
    Path(args.result).write_text(json.dumps({"ok": ok, "tasks": everything}))
    return 0 if ok else 1
