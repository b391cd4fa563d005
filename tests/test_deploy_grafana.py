"""deploy/grafana: every query of the dashboard names a series a running broker exports, and
every series the broker exports is charted. Checked against the /metrics of a real broker
(local OIDC issuer, moto with IAM enforced) after it issued, refused and failed requests, which
also shows the incident series carry what they claim: upstream latency per upstream and grant,
errors by reason, store write latency and group-commit sizes, active sessions, key age."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_files import DEPLOY
from stack import start_upstreams

from broker.dev.harness import Broker, DevIssuer, Moto
from broker.dev.policy_file import etl_project_grant

DASHBOARD = DEPLOY / "grafana" / "luigi-creds.json"
_SERIES = re.compile(r"\bluigi_creds_[a-z0-9_]+")
# The text format's sample names per family type (a counter's TYPE line already ends in _total).
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count")}


def dashboard_series() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs and all(e.strip() for e in exprs)
    return {name for expr in exprs for name in _SERIES.findall(expr)}


def exported_series(exposition: str) -> dict[str, str]:
    """Sample name -> its family's name, from the exposition's # TYPE lines."""
    names: dict[str, str] = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE luigi_creds_"):
            _, _, family, kind = line.split()
            if family.endswith("_created"):
                continue  # the client library's creation timestamps, not a series of ours
            for suffix in _SUFFIXES.get(kind, ("",)):
                names[family + suffix] = family
    return names


def samples(exposition: str, name: str) -> dict[str, float]:
    """Label text -> value for the samples of `name`."""
    out = {}
    for line in exposition.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


def test_the_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["type"] == "prometheus"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert all(t["refId"] for t in panel["targets"])


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, DevIssuer, Moto]]:
    workdir = tmp_path_factory.mktemp("grafana")
    with start_upstreams(workdir) as up:
        untrusting = up.moto.create_role("untrusting", trusted="arn:aws:iam::123456789012:root")
        refused_upstream = etl_project_grant(
            "refused-upstream", ttl="15m", aws={"role_arn": untrusting}
        )
        stack = up.serve(workdir, extra=refused_upstream)
        try:
            yield stack.broker, up.issuer, up.moto
        finally:
            stack.broker.stop()


@pytest.mark.integration
def test_every_dashboard_query_names_an_exported_series(
    broker: tuple[Broker, DevIssuer, Moto], tmp_path: Path
) -> None:
    b, issuer, _ = broker
    assert b.exchange(issuer.mint("gitlab"))[0] == 200
    assert b.exchange(issuer.mint("gitlab"), "refused-upstream")[0] == 503
    assert b.exchange("not.a.token", "etl-writer")[0] == 400
    assert b.exchange(issuer.mint("gitlab", project_id="1"))[0] == 400
    status, text = b.get("/metrics")
    assert status == 200
    exported = exported_series(text)
    charted = dashboard_series()
    assert charted - set(exported) == set(), "dashboard queries series the broker does not export"
    # ... and every family the broker exports is on the dashboard.
    assert set(exported.values()) - {exported.get(n, n) for n in charted} == set()

    # The series answer what they claim: each of the four exchanges above counted once.
    assert samples(text, "luigi_creds_upstream_seconds_count") == {
        '{grant="etl-writer",upstream="sts"}': 1.0,
        '{grant="refused-upstream",upstream="sts"}': 1.0,
    }
    errors = samples(text, "luigi_creds_upstream_errors_total")
    assert errors == {'{grant="refused-upstream",reason="upstream_denied",upstream="sts"}': 1.0}
    assert samples(text, "luigi_creds_denials_total") == {
        '{endpoint="token",reason="upstream_denied"}': 1.0,
        '{endpoint="token",reason="bad_encoding"}': 1.0,
        '{endpoint="token",reason="claim_mismatch"}': 1.0,
    }
    # A junk token names no grant anywhere: grant labels come only after authentication.
    assert samples(text, "luigi_creds_requests_total") == {
        '{endpoint="token",grant="etl-writer",outcome="issued"}': 1.0,
        '{endpoint="token",grant="refused-upstream",outcome="temporarily_unavailable"}': 1.0,
        '{endpoint="token",grant="-",outcome="invalid_request"}': 1.0,
        '{endpoint="token",grant="etl-writer",outcome="invalid_target"}': 1.0,
    }
    # How many store batches the writes took depends on timing (writes queue together).
    assert samples(text, "luigi_creds_store_batch_size_count")[""] >= 4
    assert samples(text, "luigi_creds_store_write_seconds_count")[""] >= 4
    assert samples(text, "luigi_creds_active_sessions")[""] == 1  # the one issued exchange
    ages = samples(text, "luigi_creds_issuer_key_age_seconds")
    assert list(ages) == ['{issuer="gitlab"}'] and 0 <= ages['{issuer="gitlab"}'] < 600
    assert samples(text, "luigi_creds_policy_refused")[""] == 0
