"""The broker's Prometheus series: what an operator reads during an incident.

Owns every metric name the broker exports (one private registry per app) and the small
callbacks the rest of the broker calls: request outcomes and latency (broker/app.py), upstream
latency and errors per upstream and grant (broker/mint/grants.py; a grant is labelled only
after the caller authenticated and was authorised, so label values are configured names),
store write latency and group-commit batch sizes (broker/storage.py: every audit append is a
store write), denials by reason, and, read at scrape time, active refresh sessions and the age
of each issuer's keys. The policy reload series live in broker/policy_reload.py on the same
registry. deploy/grafana/luigi-creds.json charts them; a test checks its queries against the
names exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("broker.metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Prometheus series on a private registry (so several apps in one process never clash)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "luigi_creds_requests",
            "Token endpoint requests by grant and outcome.",
            ["endpoint", "grant", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "luigi_creds_request_seconds",
            "Token endpoint latency.",
            ["endpoint"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.jwks_fetches = Counter(
            "luigi_creds_jwks_fetches",
            "JWKS and discovery fetches by issuer and outcome.",
            ["issuer", "outcome"],
            registry=self.registry,
        )
        self.denials = Counter(
            "luigi_creds_denials",
            "Refused requests by endpoint and stable reason code (the audit record's reason).",
            ["endpoint", "reason"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "luigi_creds_upstream_seconds",
            "STS and Vault call latency by upstream and grant.",
            ["upstream", "grant"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.upstream_errors = Counter(
            "luigi_creds_upstream_errors",
            "STS and Vault calls that failed, by upstream, grant and reason.",
            ["upstream", "grant", "reason"],
            registry=self.registry,
        )
        self.store_write = Histogram(
            "luigi_creds_store_write_seconds",
            "Store writes (audit appends with their state changes), submission to durable.",
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.store_batch = Histogram(
            "luigi_creds_store_batch_size",
            "Writes per group commit.",
            registry=self.registry,
            buckets=_BATCH_BUCKETS,
        )
        self.store_commit = Histogram(
            "luigi_creds_store_commit_seconds",
            "Time one group commit holds the write lock, from begin to commit.",
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )

    # -- callbacks ------------------------------------------------------------------------------

    def on_jwks_fetch(self, issuer: str, outcome: str) -> None:
        self.jwks_fetches.labels(issuer=issuer, outcome=outcome).inc()

    def on_upstream(self, upstream: str, grant: str, seconds: float, outcome: str) -> None:
        self.upstream_latency.labels(upstream, grant).observe(seconds)
        if outcome != "ok":
            self.upstream_errors.labels(upstream, grant, outcome).inc()

    def on_store_write(self, seconds: float) -> None:
        self.store_write.observe(seconds)

    def on_store_batch(self, size: int, seconds: float) -> None:
        self.store_batch.observe(size)
        self.store_commit.observe(seconds)

    def watch(
        self,
        *,
        active_sessions: Callable[[], int],
        key_ages: Callable[[], Mapping[str, float | None]],
    ) -> None:
        """Series read at scrape time: active sessions, issuer key age."""
        self.registry.register(_ScrapeTime(active_sessions, key_ages))


class _ScrapeTime(Collector):
    def __init__(
        self,
        active_sessions: Callable[[], int],
        key_ages: Callable[[], Mapping[str, float | None]],
    ) -> None:
        self._active = active_sessions
        self._ages = key_ages

    def describe(self) -> list[Metric]:
        return []  # values are read only at collect time (no store query at registration)

    def collect(self) -> Iterator[Metric]:
        ages = GaugeMetricFamily(
            "luigi_creds_issuer_key_age_seconds",
            "Seconds since each issuer's signing keys were last fetched (or loaded).",
            labels=["issuer"],
        )
        for issuer, age in self._ages().items():
            if age is not None:
                ages.add_metric([issuer], age)
        yield ages
        try:
            count = self._active()
        except Exception:  # the store is down: no sample rather than a failed scrape
            log.warning("active sessions not counted: the store did not answer")
            return
        yield GaugeMetricFamily(
            "luigi_creds_active_sessions", "Refresh sessions neither revoked nor expired.", count
        )


def now_active(
    count: Callable[[datetime], int], clock: Callable[[], datetime]
) -> Callable[[], int]:
    return lambda: count(clock())
