"""Benchmark: the CPU a forked Luigi task process spends on luigi_creds before its task runs.

Owns the per-step CPU cost of what `TaskCredentials` does in every task process Luigi forks,
measured where it happens: a parent process that has imported Luigi and boto3 and built an S3
resource (as a scheduling process checking `S3Target`s has) forks `--forks` children; each child
times (`time.process_time`) the imports Luigi's `task_process_context` triggers, the settings
read, the boto3 bridge's import, and, for `CredentialsMixin`, a boto3 session and S3 client. The
parent's heap is shared copy-on-write, so the figures include the page copies a child pays.
Medians in ms. Nothing is sent anywhere: the settings point at an unused loopback port.

    .venv/bin/python -m bench.task_start [--forks 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta


def _import_package() -> None:
    import luigi_creds  # noqa: F401


def _import_context() -> None:
    from luigi_creds import TaskCredentials  # noqa: F401


def _read_settings() -> None:
    from luigi_creds.luigi_config import from_luigi_config

    from_luigi_config()


def _import_aws() -> None:
    import luigi_creds.aws  # noqa: F401


STEPS: tuple[tuple[str, Callable[[], None]], ...] = (
    ("import luigi_creds", _import_package),
    ("import TaskCredentials", _import_context),
    ("settings", _read_settings),
    ("import luigi_creds.aws", _import_aws),
)


def _in_children(forks: int, steps: Sequence[tuple[str, Callable[[], None]]]) -> dict:
    """Median CPU ms of each step, each child running the steps in order once."""
    figures: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _ in range(forks):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: time each step, report, leave without cleanup (as Luigi's)
            spent = {}
            for name, step in steps:
                started = time.process_time()
                step()
                spent[name] = time.process_time() - started
            os.write(write, json.dumps(spent).encode())
            os._exit(0)
        os.close(write)
        data = b""
        while chunk := os.read(read, 65536):
            data += chunk
        os.close(read)
        os.waitpid(pid, 0)
        for name, value in json.loads(data).items():
            figures[name].append(value)
    return {name: statistics.median(values) * 1000 for name, values in figures.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.task_start", description=__doc__)
    parser.add_argument("--forks", type=int, default=30)
    opts = parser.parse_args(argv)
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as cfg:
        cfg.write(
            "[luigi_creds]\nbroker_url = http://127.0.0.1:9\ntoken_source = env:BENCH_TOKEN\n"
            "aws_grant = etl-writer\n"
        )
    os.environ["LUIGI_CONFIG_PATH"] = cfg.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import boto3
        import luigi
        import luigi.contrib.s3
    luigi.configuration.get_config()
    boto3.setup_default_session(aws_access_key_id="x", aws_secret_access_key="y")
    boto3.resource("s3", region_name="us-east-1")
    zero = _in_children(opts.forks, STEPS)
    # Under `luigi-creds exec` the scheduling process has the modules already (exec's preload,
    # luigi_creds/preload.py): a forked task process only reads the settings.
    import luigi_creds.aws
    import luigi_creds.task_process

    preloaded = _in_children(opts.forks, (("settings (modules preloaded)", _read_settings),))
    # The mixin's task session, in a process forked from one that imported luigi_creds.luigi
    # (a CredentialsMixin job's scheduling process) and instantiated a task.
    import luigi_creds.luigi
    from luigi_creds.credentials import AwsCredentials

    class BenchTask(luigi_creds.luigi.CredentialsMixin, luigi.Task):  # type: ignore[misc]
        grants = ("etl-writer",)

    os.environ.setdefault("BENCH_TOKEN", "unused")
    BenchTask()
    expires = datetime.now(UTC) + timedelta(minutes=15)
    cred = AwsCredentials("etl-writer", "r", "AKIABENCH", "secret", "token", expires)

    def mixin_session() -> None:
        from luigi_creds.aws import aws_session, session_loader

        loader = session_loader(boto3.DEFAULT_SESSION)
        session = aws_session(lambda: cred, region_name="us-east-1", loader=loader)
        session.client("s3", endpoint_url="http://127.0.0.1:9")

    mixin = _in_children(opts.forks, (("mixin session + S3 client", mixin_session),))
    os.unlink(cfg.name)
    print(f"CPU ms per forked task process (median of {opts.forks}):")
    for name, ms in {**zero, **preloaded, **mixin}.items():
        print(f"  {name:<28}{ms:7.2f}")
    print(f"  {'zero-code total':<28}{sum(zero.values()):7.2f}")
    print(f"  {'zero-code total, preloaded':<28}{sum(preloaded.values()):7.2f}")
    luigi_creds.agent.stop_agent()
    return 0


if __name__ == "__main__":
    sys.exit(main())
