"""Benchmark: the broker's CPU per AWS refresh mint, the call every task of `bench.client` makes.

One run starts the client benchmark's stack (`bench.client.running_stack`: the dev OIDC issuer,
moto and the broker on loopback), opens one session with the luigi-creds client (DPoP-bound,
over the agent's keep-alive `http.client` poster, as a job's agent does) and then makes
`--mints` sequential refresh mints of the AWS grant per round: an RFC 8693 refresh with the
session's handle, one STS AssumeRole on moto, the handle's rotation. Per round it reads the
broker process's user + system CPU (`/proc/<pid>/stat`) before and after and reports ms per mint,
with moto's CPU per mint beside it and, as a floor, the broker's CPU per `GET /healthz` on one
keep-alive connection (the HTTP edge alone).

This isolates the broker row of `bench.client`'s "CPU ms per task by process group" (about one
such mint per task) from the pipeline around it: about 40 s for the defaults. The machine is
shared: compare rounds of one run, or runs alternated with the code they are compared against.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.client import GRANT, Stack, running_stack
from bench.load import cpu_seconds


def _healthz_cpu_ms(stack: Stack, count: int) -> float:
    """The broker's CPU ms per `GET /healthz` on one keep-alive connection."""
    host, _, port = stack.broker.url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        pid = stack.broker.process.pid
        before = cpu_seconds(pid)
        for _ in range(count):
            conn.request("GET", "/healthz")
            conn.getresponse().read()
        return (cpu_seconds(pid) - before) / count * 1000
    finally:
        conn.close()


def measure(stack: Stack, mints: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Per round: the broker's and moto's CPU ms per refresh mint, the wall ms per mint, and
    the broker's CPU ms per /healthz."""
    from luigi_creds.broker_http import BrokerHttp
    from luigi_creds.client import BrokerClient
    from luigi_creds.identity import EnvTokenSource

    poster = BrokerHttp(timeout=30)
    client = BrokerClient(
        stack.broker.url,
        EnvTokenSource("BENCH_TOKEN", {"BENCH_TOKEN": stack.token()}),
        http=poster,
        clock=lambda: datetime.now(UTC),
    )
    broker, moto = stack.broker.process.pid, stack.moto.process.pid
    out: dict[str, list[float]] = {"broker_ms": [], "moto_ms": [], "wall_ms": [], "healthz_ms": []}
    try:
        for n in range(warmup):  # the session's exchange, caches, moto's first AssumeRoles
            client.mint(GRANT, task=f"bench-warmup-{n}")
        for round_ in range(rounds):
            broker_before, moto_before = cpu_seconds(broker), cpu_seconds(moto)
            started = time.perf_counter()
            for n in range(mints):
                client.mint(GRANT, task=f"bench-{round_}-{n}")
            out["wall_ms"].append((time.perf_counter() - started) / mints * 1000)
            out["broker_ms"].append((cpu_seconds(broker) - broker_before) / mints * 1000)
            out["moto_ms"].append((cpu_seconds(moto) - moto_before) / mints * 1000)
            out["healthz_ms"].append(_healthz_cpu_ms(stack, mints))
            print(
                f"round {round_ + 1}: broker {out['broker_ms'][-1]:.2f} ms/mint, moto "
                f"{out['moto_ms'][-1]:.2f}, wall {out['wall_ms'][-1]:.2f}, /healthz "
                f"{out['healthz_ms'][-1]:.2f}",
                file=sys.stderr,
            )
        client.revoke()
    finally:
        poster.close()
    return {
        "rounds": out,
        "median": {name: statistics.median(values) for name, values in out.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.refresh_cpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--mints", type=int, default=400, help="refresh mints per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    load = os.getloadavg()
    with ExitStack() as stop:
        workdir = stop.enter_context(tempfile.TemporaryDirectory(prefix="bench-refresh-cpu-"))
        stack = stop.enter_context(running_stack(Path(workdir)))
        report = measure(stack, opts.mints, opts.rounds, opts.warmup)
    report["loadavg_before"], report["loadavg_after"] = load, os.getloadavg()
    median = report["median"]
    print(
        f"AWS refresh mint, {opts.rounds} rounds x {opts.mints}: broker CPU "
        f"{median['broker_ms']:.2f} ms/mint (rounds "
        + " / ".join(f"{ms:.2f}" for ms in report["rounds"]["broker_ms"])
        + f"), moto {median['moto_ms']:.2f}, wall {median['wall_ms']:.2f} ms/mint; "
        f"broker CPU per /healthz {median['healthz_ms']:.2f} ms; load "
        f"{load[0]:.1f} -> {report['loadavg_after'][0]:.1f}"
    )
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
