"""Benchmark: the broker's CPU per AWS refresh mint, the call every task of `bench.client` makes.

One run starts the client benchmark's stack (`bench.client.running_stack`: the dev OIDC issuer,
moto and the broker on loopback), opens one session with the luigi-creds client (DPoP-bound,
over the agent's keep-alive `http.client` poster, as a job's agent does) and then makes
sequential refresh mints of the AWS grant: an RFC 8693 refresh with the session's handle, one
STS AssumeRole on moto, the handle's rotation. Around each block of mints it reads the broker
process's user + system CPU (`/proc/<pid>/stat`) and reports ms per mint, with moto's CPU per
mint beside it and, as a floor, the broker's CPU per `GET /healthz` on one keep-alive
connection (the HTTP edge alone).

This isolates the broker row of `bench.client`'s "CPU ms per task by process group" (one such
mint per task) from the pipeline around it.

`--against DIR` compares two brokers in one run: a second broker is started from the `broker`
package of another checkout DIR (e.g. `git worktree add --detach /tmp/base <commit>`) on the
same issuer and moto, with its own store, its threads moved to the first broker's CPU; the two
take turns in blocks of `--block` mints, so whatever else loads the shared machine falls on
both alike. Separate runs of the two trees, even alternated, moved by a fifth between runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.client import GRANT, UNLIMITED_RATE, Stack, running_stack
from bench.load import cpu_seconds


@dataclass
class Side:
    """One broker under measurement, with the client whose session mints on it."""

    name: str
    url: str
    pid: int
    client: Any
    broker_ms: list[float]
    moto_ms: list[float]


def _client(url: str, token: str) -> Any:
    from luigi_creds.broker_http import BrokerHttp
    from luigi_creds.client import BrokerClient
    from luigi_creds.identity import EnvTokenSource

    return BrokerClient(
        url,
        EnvTokenSource("BENCH_TOKEN", {"BENCH_TOKEN": token}),
        http=BrokerHttp(timeout=30),
        clock=lambda: datetime.now(UTC),
    )


@contextmanager
def _broker_from(stack: Stack, tree: Path) -> Iterator[Any]:
    """A second broker, run from the `broker` package in `tree`, on `stack`'s issuer and moto."""
    from broker.dev.harness import policy_toml, start_broker
    from broker.dev.processes import free_port

    workdir = stack.workdir / "against"
    config = policy_toml(
        issuer_url=stack.issuer.url,
        audit_db=workdir / "audit.db",
        listen=f"127.0.0.1:{free_port()}",
        moto_url=stack.moto.url,
        role_arn=f"arn:aws:iam::123456789012:role/{GRANT}",
        broker_extra=f"rate_limit_identity = {UNLIMITED_RATE}\nrate_limit_grant = {UNLIMITED_RATE}",
    )
    # PYTHONSAFEPATH: `python -m broker` would otherwise import the package from the current
    # directory (this checkout, when run from it) before PYTHONPATH's.
    env = {**stack.moto.broker_env, "PYTHONPATH": str(tree.resolve()), "PYTHONSAFEPATH": "1"}
    broker = start_broker(workdir / "broker", config, env=env)
    try:
        yield broker
    finally:
        broker.stop()


def _share_cpu(pid: int, with_pid: int) -> None:
    """Move every thread of `pid` to the CPUs `with_pid`'s main thread may run on (one, for a
    broker with `single_cpu`): two brokers compared on different CPUs would compare the CPUs.
    Threads started later inherit the main thread's mask."""
    cpus = os.sched_getaffinity(with_pid)
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def _healthz_cpu_ms(url: str, pid: int, count: int) -> float:
    """The broker's CPU ms per `GET /healthz` on one keep-alive connection."""
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        before = cpu_seconds(pid)
        for _ in range(count):
            conn.request("GET", "/healthz")
            conn.getresponse().read()
        return (cpu_seconds(pid) - before) / count * 1000
    finally:
        conn.close()


def _block(side: Side, moto_pid: int, mints: int, label: str) -> None:
    broker_before, moto_before = cpu_seconds(side.pid), cpu_seconds(moto_pid)
    for n in range(mints):
        side.client.mint(GRANT, task=f"bench-{label}-{n}")
    side.broker_ms.append((cpu_seconds(side.pid) - broker_before) / mints * 1000)
    side.moto_ms.append((cpu_seconds(moto_pid) - moto_before) / mints * 1000)


def measure(
    stack: Stack, *, blocks: int, block: int, warmup: int, against: Path | None
) -> dict[str, Any]:
    """Per side: the broker's and moto's CPU ms per refresh mint in each block (the sides take
    turns, which one goes first alternating), and the broker's CPU ms per /healthz."""
    with ExitStack() as stop:
        sides = [
            Side(
                "this",
                stack.broker.url,
                stack.broker.process.pid,
                _client(stack.broker.url, stack.token()),
                [],
                [],
            )
        ]
        if against is not None:
            other = stop.enter_context(_broker_from(stack, against))
            _share_cpu(other.process.pid, stack.broker.process.pid)
            sides.append(
                Side(
                    "against",
                    other.url,
                    other.process.pid,
                    _client(other.url, stack.token()),
                    [],
                    [],
                )
            )
        moto = stack.moto.process.pid
        for side in sides:  # the session's exchange, caches, moto's first AssumeRoles
            for n in range(warmup):
                side.client.mint(GRANT, task=f"bench-warmup-{n}")
        for number in range(blocks):
            turn = sides if number % 2 == 0 else sides[::-1]
            for side in turn:
                _block(side, moto, block, str(number))
            print(
                f"block {number + 1}: "
                + ", ".join(f"{s.name} {s.broker_ms[-1]:.2f} ms/mint" for s in sides),
                file=sys.stderr,
            )
        report: dict[str, Any] = {}
        for side in sides:
            side.client.revoke()
            report[side.name] = {
                "broker_ms_per_mint": side.broker_ms,
                "broker_ms_median": statistics.median(side.broker_ms),
                "broker_ms_mean": statistics.fmean(side.broker_ms),
                "moto_ms_median": statistics.median(side.moto_ms),
                "healthz_ms": _healthz_cpu_ms(side.url, side.pid, block),
            }
        return report


def render(report: dict[str, Any], blocks: int, block: int) -> str:
    lines = [f"AWS refresh mints, {blocks} blocks x {block} per broker (broker CPU ms per mint):"]
    for name, side in report["sides"].items():
        lines.append(
            f"  {name:<8} median {side['broker_ms_median']:.2f}, mean {side['broker_ms_mean']:.2f}"
            f" (blocks {' / '.join(f'{ms:.2f}' for ms in side['broker_ms_per_mint'])}); moto "
            f"{side['moto_ms_median']:.2f}; /healthz {side['healthz_ms']:.2f}"
        )
    sides = report["sides"]
    if "against" in sides:
        ours, theirs = sides["this"]["broker_ms_mean"], sides["against"]["broker_ms_mean"]
        paired = [
            a - b
            for a, b in zip(
                sides["this"]["broker_ms_per_mint"],
                sides["against"]["broker_ms_per_mint"],
                strict=True,
            )
        ]
        lines.append(
            f"  this - against: mean {ours - theirs:+.2f} ms/mint "
            f"({(ours / theirs - 1) * 100:+.1f}%), per block pair "
            + " / ".join(f"{d:+.2f}" for d in paired)
        )
    load = report["loadavg"]
    lines.append(f"  load {load[0][0]:.1f} -> {load[1][0]:.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.refresh_cpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--blocks", type=int, default=6, help="blocks of mints per broker")
    parser.add_argument("--block", type=int, default=200, help="refresh mints per block")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--against", type=Path, help="another checkout whose broker takes turns with this one"
    )
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    load = os.getloadavg()
    with ExitStack() as stop:
        workdir = stop.enter_context(tempfile.TemporaryDirectory(prefix="bench-refresh-cpu-"))
        stack = stop.enter_context(running_stack(Path(workdir)))
        sides = measure(
            stack, blocks=opts.blocks, block=opts.block, warmup=opts.warmup, against=opts.against
        )
    report = {"sides": sides, "loadavg": [load, os.getloadavg()]}
    print(render(report, opts.blocks, opts.block))
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
