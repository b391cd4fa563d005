"""Benchmark: what binding a session to a DPoP key costs per request, side by side in one run.

Starts, on loopback, the dev OIDC issuer, moto and one broker (`luigi-creds-broker serve`, SQLite
store), opens two sessions on it for the same identity and grant, one unbound (exchange without a
proof) and one bound to an ES256 key (exchange with a proof), and drives both over one kept-alive
HTTP connection each, alternating in batches so that both see the same machine load:

  explain   POST /v1/explain on the session: handle lookup, policy; nothing upstream. Isolates the
            DPoP work (client signing, broker verification, the proof's jti in the replay ledger).
  refresh   POST /v1/token refresh_token for an AWS grant against moto: the whole request.

Bound requests include the client's proof signing in their time. Reports per scenario the median
and mean latency of each side and the ratio bound/unbound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.exchange import FORM, Connection
from broker.dev.harness import (
    exchange_form,
    policy_toml,
    refresh_form,
    start_broker,
    start_dev_issuer,
    start_moto,
)
from broker.dev.processes import free_port
from luigi_creds.dpop import DpopKey


class Session:
    """One refresh session over one kept-alive connection; bound when it has a key."""

    def __init__(self, url: str, token: str, key: DpopKey | None) -> None:
        self.url = url
        self.conn = Connection(url)
        self.key = key
        self.nonce: str | None = None
        self.handle = str(self.post("/v1/token", exchange_form(token))["refresh_token"])

    def post(self, path: str, form: dict[str, str]) -> dict[str, Any]:
        headers: dict[str, str] = {}
        if self.key is not None:
            now = datetime.now(UTC)
            headers["DPoP"] = self.key.proof("POST", self.url + path, now=now, nonce=self.nonce)
        body = urllib.parse.urlencode(form).encode("ascii")
        status, raw = self.conn.post(path, body, FORM, headers)
        self.nonce = self.conn.last_headers.get("dpop-nonce") or self.nonce
        if status != 200:
            raise RuntimeError(f"{path}: HTTP {status} {raw[:200]!r}")
        return json.loads(raw) if raw else {}

    def explain(self) -> None:
        self.post("/v1/explain", {"refresh_token": self.handle})

    def refresh(self) -> None:
        self.handle = str(self.post("/v1/token", refresh_form(self.handle))["refresh_token"])


def timed(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    step()
    return (time.perf_counter() - started) * 1000


def compare(
    unbound: Callable[[], None], bound: Callable[[], None], requests: int, batch: int
) -> dict[str, Any]:
    for _ in range(5):  # warm-up, not counted
        unbound()
        bound()
    times: dict[str, list[float]] = {"unbound": [], "bound": []}
    while len(times["bound"]) < requests:
        for name, step in (("unbound", unbound), ("bound", bound)):
            times[name] += [timed(step) for _ in range(batch)]
    row: dict[str, Any] = {}
    for name, values in times.items():
        row[f"{name}_p50_ms"] = round(statistics.median(values), 2)
        row[f"{name}_mean_ms"] = round(statistics.fmean(values), 2)
    row["ratio_p50"] = round(row["bound_p50_ms"] / row["unbound_p50_ms"], 2)
    row["ratio_mean"] = round(row["bound_mean_ms"] / row["unbound_mean_ms"], 2)
    return row


def run(requests: int, refreshes: int, batch: int, workdir: Path) -> dict[str, Any]:
    issuer = start_dev_issuer(workdir)
    moto = start_moto(workdir)
    try:
        config = policy_toml(
            issuer_url=issuer.url,
            audit_db=workdir / "audit.db",
            listen=f"127.0.0.1:{free_port()}",
            moto_url=moto.url,
            role_arn=moto.create_role("etl-writer"),
            broker_extra=(
                "rate_limit_identity = { per_second = 100000, burst = 100000 }\n"
                "rate_limit_grant = { per_second = 100000, burst = 100000 }"
            ),
        )
        broker = start_broker(workdir / "broker", config, env=moto.broker_env)
        try:
            plain = Session(broker.url, issuer.mint("gitlab", ttl=3600), None)
            keyed = Session(broker.url, issuer.mint("gitlab", ttl=3600), DpopKey())
            return {
                "explain": compare(plain.explain, keyed.explain, requests, batch),
                "refresh": compare(plain.refresh, keyed.refresh, refreshes, batch),
                "requests": {"explain": requests, "refresh": refreshes, "batch": batch},
            }
        finally:
            broker.stop()
    finally:
        moto.stop()
        issuer.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="explain requests per side")
    parser.add_argument("--refreshes", type=int, default=100, help="refreshes per side")
    parser.add_argument("--batch", type=int, default=10, help="requests per side per turn")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-dpop-") as tmp:
        report = run(args.requests, args.refreshes, args.batch, Path(tmp))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
