"""A stock Luigi pipeline that knows nothing of luigi-creds, for the zero-code end-to-end test.

Never imports `luigi_creds`: its credentials come only from what `[worker] task_process_context =
luigi_creds.TaskCredentials` puts in each task's process. Outputs are `luigi.contrib.s3`
S3Targets (checked with `exists()` by the scheduling process), the body uses plain
`boto3.client` and runs `aws sts get-caller-identity` in a subprocess, and a second subprocess
tries what a hostile child could do with the agent bearer it inherited. Each task also writes a
local JSON marker (no secret) for the test to read. Run as `luigi --module plain_pipeline`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import luigi
from luigi.contrib.s3 import S3Target

BUCKET = "e2e-pipeline"
MARKERS_VARIABLE = "PIPELINE_MARKERS"

# What the hostile child tries: GET the agent's container endpoint for `grant` and `task`
# with the bearer the task's process was given. Prints the HTTP status.
PROBE = """
import os, sys, urllib.error, urllib.parse, urllib.request
grant, task = sys.argv[1], sys.argv[2]
url = os.environ["LUIGI_CREDS_AGENT_URL"] + "/v1/aws?" + urllib.parse.urlencode(
    {"grant": grant, "task": task})
request = urllib.request.Request(
    url, headers={"Authorization": os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})
try:
    print(urllib.request.urlopen(request, timeout=30).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


# What the scheduling process (the one importing this module, before Luigi forks the task
# processes) holds: under `luigi-creds exec`, the task-process modules preloaded. Written next to
# the markers directory, which holds the tasks' markers only.
if os.environ.get(MARKERS_VARIABLE):
    (Path(os.environ[MARKERS_VARIABLE]).parent / f"scheduling-{os.getpid()}.json").write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "preloaded": "luigi_creds.task_process" in sys.modules,
                "boto3_bridge": "luigi_creds.aws" in sys.modules,
            }
        )
    )


def _start_timings() -> object:
    """TaskCredentials' record of this process's task start (never imported here: Luigi did)."""
    return getattr(sys.modules.get("luigi_creds.task_process"), "last_timings", None)


class PlainWrite(luigi.Task):
    n = luigi.IntParameter()

    def output(self) -> S3Target:
        return S3Target(f"s3://{BUCKET}/{os.environ['PIPELINE_PREFIX']}/{self.n}.json")

    def run(self) -> None:
        endpoint = os.environ["PIPELINE_S3_URL"]
        key_id = boto3.Session().get_credentials().get_frozen_credentials().access_key
        arn = boto3.client("sts", endpoint_url=endpoint).get_caller_identity()["Arn"]
        cli = subprocess.run(
            ["aws", "sts", "get-caller-identity", "--endpoint-url", endpoint, "--output", "json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        probes = {
            f"{grant} {task}": subprocess.run(
                [sys.executable, "-c", PROBE, grant, task],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout.strip()
            for grant, task in (
                ("etl-writer", self.task_id),  # its own: allowed
                ("etl-vault", self.task_id),  # another grant of the job
                ("etl-writer", "PlainWrite(n=99)"),  # another task
            )
        }
        with self.output().open("w") as f:
            json.dump({"task": self.task_id, "access_key_id": key_id}, f)
        marker = {
            "task": self.task_id,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "access_key_id": key_id,
            "boto3_arn": arn,
            "cli_arn": json.loads(cli.stdout)["Arn"],
            "probes": probes,
            "stray": os.environ.get("AWS_ACCESS_KEY_ID"),
            # Whether the scheduling process started this task's credentials before it forked
            # this process (luigi_creds/launch.py), as TaskCredentials noted.
            "launched": bool(getattr(_start_timings(), "launched", 0.0)),
        }
        out = Path(os.environ[MARKERS_VARIABLE]) / f"plain-{self.n}.json"
        out.write_text(json.dumps(marker))


class PlainAll(luigi.WrapperTask):
    count = luigi.IntParameter(default=6)

    def requires(self) -> list[PlainWrite]:
        return [PlainWrite(n=n) for n in range(self.count)]


class PlainVault(luigi.Task):
    """Reads a KV secret with whatever `hvac.Client()` finds in VAULT_ADDR/VAULT_TOKEN; with
    `die`, then kills its own process, as a timeout or the OOM killer would."""

    n = luigi.IntParameter()
    die = luigi.BoolParameter(default=False)

    def complete(self) -> bool:
        return (Path(os.environ[MARKERS_VARIABLE]) / f"vault-{self.n}.json").exists()

    def run(self) -> None:
        import signal

        import hvac

        client = hvac.Client()
        secret = client.secrets.kv.v2.read_secret_version(
            path="etl/db", mount_point="secret", raise_on_deleted_version=True
        )
        me = client.auth.token.lookup_self()["data"]
        marker = {
            "task": self.task_id,
            "accessor": me["accessor"],
            "read": secret["data"]["data"]["password"] == "etl-kv-value",
            "aws": os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        }
        out = Path(os.environ[MARKERS_VARIABLE]) / f"vault-{self.n}.json"
        out.write_text(json.dumps(marker))
        if self.die:
            os.kill(os.getpid(), signal.SIGKILL)


class Linger(luigi.Task):
    """Keeps the job (and its session) alive until the test says go."""

    def complete(self) -> bool:
        return (Path(os.environ[MARKERS_VARIABLE]) / "lingered").exists()

    def run(self) -> None:
        import time

        go = Path(os.environ[MARKERS_VARIABLE]) / "go"
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (Path(os.environ[MARKERS_VARIABLE]) / "lingered").touch()


class VaultJob(luigi.WrapperTask):
    def requires(self) -> list[luigi.Task]:
        return [PlainVault(n=0), PlainVault(n=1, die=True), Linger()]
