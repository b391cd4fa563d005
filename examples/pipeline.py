"""The demo ETL pipeline: Luigi tasks that each get their own short-lived credentials.

Owns the example a data engineer reads first: `Extract` writes CSV parts to S3 with per-task AWS
credentials (`aws_session`), `ReadEtlSecret` reads a KV secret with a per-task Vault token
(`vault_client`), `ListBucket` runs the AWS CLI as an external program whose credentials come from
`credential_env` (no AWS secret in its environment), and `WarehouseLogin` logs in to PostgreSQL with
dynamic Vault database credentials (`vault_secret`) when the stack has them. Talks to S3 (moto),
OpenBao and PostgreSQL with the credentials the broker mints; nothing here holds a secret, and
outputs record credential *references* (AWS key ids, Vault accessors), never credentials.

Settings come from the `[demo]` section of the luigi config that `examples.demo` writes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import luigi
from luigi.contrib.external_program import ExternalProgramTask

from luigi_creds import CredentialsMixin

SECRET_PATH = "etl/db"  # in the dev server's KV v2 mount `secret/`


class demo(luigi.Config):  # Luigi names a config class after its section
    """`[demo]`: where outputs go and where the stand-ins for AWS and PostgreSQL listen."""

    workdir = luigi.Parameter()
    bucket = luigi.Parameter()
    aws_endpoint_url = luigi.Parameter()
    pg_url = luigi.Parameter(default="")


def say(line: str) -> None:
    """One progress line, tagged with the worker process it comes from."""
    print(f"  [pid {os.getpid()}] {line}", flush=True)


def _target(name: str) -> luigi.LocalTarget:
    return luigi.LocalTarget(str(Path(demo().workdir) / name))


def _write_json(target: luigi.LocalTarget, value: dict[str, Any]) -> None:
    with target.open("w") as handle:
        json.dump(value, handle, indent=2)


class Extract(CredentialsMixin, luigi.Task):
    """Write one CSV part of the extract to s3://<bucket>/raw/ with this task's credentials."""

    part = luigi.IntParameter()
    grants = ("etl-writer",)

    def output(self) -> luigi.LocalTarget:
        return _target(f"extract-{self.part}.json")

    def run(self) -> None:
        session = self.aws_session("etl-writer")
        s3 = session.client("s3", endpoint_url=demo().aws_endpoint_url)
        rows = [("order_id", "amount")] + [
            (f"{self.part}-{i}", f"{(self.part * 7 + i) % 50 + 0.99:.2f}") for i in range(100)
        ]
        body = io.StringIO()
        csv.writer(body).writerows(rows)
        key = f"raw/part-{self.part}.csv"
        s3.put_object(Bucket=demo().bucket, Key=key, Body=body.getvalue().encode("utf-8"))
        # The access key id is a credential reference (it appears in the audit), not a secret.
        key_id = session.get_credentials().get_frozen_credentials().access_key
        say(f"extract part {self.part}: wrote s3://{demo().bucket}/{key} as AWS key {key_id}")
        _write_json(self.output(), {"key": key, "rows": len(rows) - 1, "aws_access_key_id": key_id})


class ReadEtlSecret(CredentialsMixin, luigi.Task):
    """Read the ETL database password from Vault's KV store with this task's Vault token."""

    grants = ("etl-vault",)

    def output(self) -> luigi.LocalTarget:
        return _target("etl-secret.json")

    def run(self) -> None:
        client = self.vault_client("etl-vault")
        token = client.auth.token.lookup_self()["data"]
        secret = client.secrets.kv.v2.read_secret_version(
            path=SECRET_PATH, mount_point="secret", raise_on_deleted_version=True
        )["data"]["data"]
        password = str(secret["password"])
        # Proof of reading without keeping the value: a short digest, never the password.
        digest = hashlib.sha256(password.encode("utf-8")).hexdigest()[:12]
        policies = ", ".join(p for p in token["policies"] if p != "default")
        say(
            f"vault: read secret/{SECRET_PATH} (fields: {', '.join(sorted(secret))}; "
            f"password sha256 {digest}...) with a token of policies [{policies}], "
            f"ttl {token['ttl']} s"
        )
        _write_json(
            self.output(),
            {"fields": sorted(secret), "sha256_prefix": digest, "accessor": token["accessor"]},
        )


class ListBucket(CredentialsMixin, ExternalProgramTask):
    """Run `aws s3 ls` on the bucket; the CLI fetches its credentials from the job's agent."""

    parts = luigi.IntParameter()
    grants = ("etl-writer",)

    def requires(self) -> list[Extract]:
        return [Extract(part=n) for n in range(self.parts)]

    def output(self) -> luigi.LocalTarget:
        return _target("listing.txt")

    def program_args(self) -> list[str]:
        # The AWS CLI is installed beside this interpreter (awscli in the dev extras).
        aws = str(Path(sys.executable).parent / "aws")
        # sh only redirects the listing into the output; the arguments are passed, not quoted in.
        script = '"$0" s3 ls --recursive "s3://$1/" > "$2"'
        return ["sh", "-c", script, aws, demo().bucket, self.output().path]

    def program_environment(self) -> dict[str, str]:
        env = self.credential_env("etl-writer")
        env["AWS_ENDPOINT_URL"] = demo().aws_endpoint_url
        env["AWS_DEFAULT_REGION"] = "us-east-1"
        return env

    def run(self) -> None:
        super().run()
        with self.output().open("r") as handle:
            lines = handle.read().splitlines()
        say(f"aws s3 ls (credentials via credential_env): {len(lines)} objects")
        for line in lines:
            say(f"    {line}")


class WarehouseLogin(CredentialsMixin, luigi.Task):
    """Log in to PostgreSQL as the short-lived role Vault's database engine made for this task."""

    grants = ("warehouse",)

    def output(self) -> luigi.LocalTarget:
        return _target("warehouse.json")

    def run(self) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        creds = self.vault_secret("warehouse")
        params = conninfo_to_dict(demo().pg_url)
        params.update(user=str(creds["username"]), password=str(creds["password"]))
        with psycopg.connect(**params) as conn:
            row = conn.execute("SELECT current_user, now()").fetchone()
        assert row is not None
        say(f"warehouse: logged in to PostgreSQL as {row[0]} (a role Vault made for this task)")
        _write_json(self.output(), {"user": str(row[0])})


class DemoPipeline(luigi.WrapperTask):
    """Everything above; `WarehouseLogin` only when the stack has the database grant."""

    parts = luigi.IntParameter(default=3)
    warehouse = luigi.BoolParameter(default=False)

    def requires(self) -> list[luigi.Task]:
        tasks: list[luigi.Task] = [ListBucket(parts=self.parts), ReadEtlSecret()]
        if self.warehouse:
            tasks.append(WarehouseLogin())
        return tasks
