"""A stolen refresh handle is worthless without the job's DPoP key (RFC 9449), over real HTTP.

A real `luigi-creds-broker serve` (grant `bound-writer` requires DPoP), a local OIDC issuer and
moto. The real client exchanges once (no nonce needed; the answer carries one) and its session is
bound to its key; with a stale nonce it is answered use_dpop_nonce and retries once. A thief
holding the current refresh handle then tries it without a proof, with its own key, with proofs
for another URL or method, with an old iat, and by replaying a proof the client sent: each is
refused with RFC 9449's `invalid_dpop_proof` and audited with its reason, none of them ends the
session, and the client keeps minting on it. An old handle (which would otherwise end the session
as reuse) and revoke/explain without the key are refused the same way.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from stack import READ_ONLY_SEALER, Stack, start_upstreams

from broker.audit import open_store
from broker.audit.events import Outcome
from broker.dev.harness import (
    Broker,
    exchange_form,
    fresh_pg_database,
    policy_toml,
    refresh_form,
    start_broker,
)
from broker.dev.policy_file import etl_project_grant
from broker.dev.processes import free_port
from broker.sessions import open_state
from luigi_creds.client import AwsCredentials, BrokerClient, BrokerError
from luigi_creds.dpop import DpopKey, ForkedKeyError
from luigi_creds.identity import parse_token_source

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dpop_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The default policy and `bound-writer`, the same grant but requiring DPoP."""
    workdir = tmp_path_factory.mktemp("dpop")
    with start_upstreams(workdir) as up:
        bound_writer = etl_project_grant(
            "bound-writer", ttl="15m", require_dpop=True, aws={"role_arn": up.role_arn}
        )
        stack = up.serve(workdir, extra=bound_writer)
        try:
            yield stack
        finally:
            stack.broker.stop()


@dataclass
class Sent:
    """Every request the real client sent: its URL and its DPoP proof."""

    proofs: list[tuple[str, str]] = field(default_factory=list)

    def record(self, request: httpx.Request) -> None:
        self.proofs.append((str(request.url), request.headers.get("dpop", "")))


@pytest.fixture
def owner(dpop_stack: Stack) -> Iterator[tuple[BrokerClient, Sent]]:
    """The job's real client, its token from the environment (not renewable: if its session
    ended, it could not mint again)."""
    sent = Sent()

    def clock() -> datetime:
        return datetime.now(UTC)

    with httpx.Client(timeout=30, event_hooks={"request": [sent.record]}) as http:
        source = parse_token_source(
            "env:CI_ID_TOKEN",
            environ={"CI_ID_TOKEN": dpop_stack.issuer.mint("gitlab")},
            http=http,
            audience=dpop_stack.broker.url,
            clock=clock,
        )
        client = BrokerClient(dpop_stack.broker.url, source, http=http, clock=clock)
        yield client, sent
        client.revoke(retry=False)


def _handle(client: BrokerClient) -> str:
    session = client._session
    assert session is not None and session.idle
    return session.idle[-1]  # the handle the client spends next


def _nonce(broker: Broker) -> str:
    """A current server nonce, as any caller can get one (every answer carries it)."""
    _status, _body, headers = broker.token({"grant_type": "refresh_token"})
    nonce = headers["DPoP-Nonce"]
    assert nonce
    return nonce


def _post(broker: Broker, path: str, form: dict[str, str], proof: str | None) -> Any:
    data = urllib.parse.urlencode(form).encode("ascii")
    return broker.post_raw(path, data, headers={"DPoP": proof} if proof else None)


def test_the_client_binds_its_session_and_a_thief_with_the_handle_mints_nothing(
    dpop_stack: Stack, owner: tuple[BrokerClient, Sent]
) -> None:
    client, sent = owner
    broker = dpop_stack.broker
    first = client.mint("bound-writer", task="Extract_1")
    assert isinstance(first, AwsCredentials)
    key = client._dpop
    session = client._session
    assert session is not None and session.key_thumbprint == key.thumbprint

    # One request: the exchange needs no nonce; its answer gave the client one.
    token_url = broker.url + "/v1/token"
    assert [url for url, _ in sent.proofs] == [token_url]
    assert client._dpop_nonce
    (issued,) = [
        e for e in dpop_stack.events() if e.outcome == Outcome.ISSUED and e.task == "Extract_1"
    ]
    assert issued.detail["dpop_jkt"] == key.thumbprint
    _replay, sessions = open_state(dpop_stack.store_url, sealer=READ_ONLY_SEALER)
    try:
        stored = sessions.get(issued.session_id)
    finally:
        sessions.close()
    assert stored is not None and stored.key_thumbprint == key.thumbprint

    # A nonce the broker no longer accepts: use_dpop_nonce (audited), one retry, minted.
    client._dpop_nonce = "1.stale"
    second = client.mint("bound-writer", task="Extract_2")
    assert isinstance(second, AwsCredentials)
    assert len(sent.proofs) == 3
    stale = [e for e in dpop_stack.events() if e.reason == "dpop_nonce_stale"]
    assert len(stale) == 1 and stale[0].outcome == Outcome.DENIED
    assert stale[0].detail["dpop_jkt"] == key.thumbprint
    # The proof of that successful refresh, as a thief on the wire would capture it.
    captured = sent.proofs[-1][1]
    old_handle = _handle(client)  # about to become an old generation
    client.mint("bound-writer", task="Extract_3")
    stolen = _handle(client)

    now = datetime.now(UTC)
    thief = DpopKey()
    nonce = _nonce(broker)
    attempts = {
        "dpop_missing_for_bound_session": None,
        "dpop_wrong_key": thief.proof("POST", token_url, now=now, nonce=nonce),
        "dpop_htu_mismatch": key.proof("POST", broker.url + "/v1/revoke", now=now, nonce=nonce),
        "dpop_htm_mismatch": key.proof("GET", token_url, now=now, nonce=nonce),
        "dpop_iat_too_old": key.proof(
            "POST", token_url, now=now - timedelta(minutes=10), nonce=nonce
        ),
    }
    # (The key's proofs above stand for proofs the thief found; the key itself never leaves
    # the client's memory.)
    for reason, proof in attempts.items():
        status, body, headers = _post(
            broker, "/v1/token", refresh_form(stolen, "bound-writer", task="Steal"), proof
        )
        assert (status, body["error"]) == (400, "invalid_dpop_proof"), (reason, body)
        assert "DPoP-Nonce" in headers
        (denied,) = dpop_stack.events_for(body["request_id"])
        assert (denied.outcome, denied.reason) == (Outcome.DENIED, reason)
        # Recorded one by one against the session whose handle came without its key (not
        # folded into the tally of requests that proved nothing); the session itself lives on.
        assert denied.session_id == stored.id
        if proof is not None and reason != "dpop_wrong_key":
            assert denied.detail["dpop_jkt"] == key.thumbprint
    wrong = [e for e in dpop_stack.events() if e.reason == "dpop_wrong_key"]
    assert wrong[-1].detail["dpop_jkt"] == thief.thumbprint

    # A proof the client sent, replayed (its jti is remembered; its htu is the token endpoint).
    status, body, _ = _post(
        broker, "/v1/token", refresh_form(stolen, "bound-writer", task="Steal"), captured
    )
    assert (status, body["error"]) == (400, "invalid_dpop_proof")
    assert [e.reason for e in dpop_stack.events_for(body["request_id"])] == ["dpop_replayed"]

    # An old handle would end the session as reuse; without the key it ends nothing.
    status, body, _ = _post(broker, "/v1/token", refresh_form(old_handle, "bound-writer"), None)
    assert (status, body["error"]) == (400, "invalid_dpop_proof")
    assert [e.reason for e in dpop_stack.events_for(body["request_id"])] == [
        "dpop_missing_for_bound_session"
    ]
    # Nor can the thief revoke the session, or ask about it.
    revoke_form = {"token": stolen, "token_type_hint": "refresh_token"}
    status, body, _ = _post(broker, "/v1/revoke", revoke_form, None)
    assert (status, body["error"]) == (400, "invalid_dpop_proof")
    revoke_proof = thief.proof("POST", broker.url + "/v1/revoke", now=now, nonce=nonce)
    status, body, _ = _post(broker, "/v1/revoke", revoke_form, revoke_proof)
    assert (status, body["error"]) == (400, "invalid_dpop_proof")
    assert [e.reason for e in dpop_stack.events_for(body["request_id"])] == ["dpop_wrong_key"]
    status, body, _ = _post(broker, "/v1/explain", {"refresh_token": stolen}, None)
    assert (status, body["error"]) == (400, "invalid_dpop_proof")

    # The session lives on: the client mints on it (its token source cannot renew).
    assert not any(e.outcome == Outcome.REVOKED for e in dpop_stack.events())
    after = client.mint("bound-writer", task="Load_1")
    assert isinstance(after, AwsCredentials)
    assert after.access_key_id not in (first.access_key_id, second.access_key_id)
    explained = client.explain()
    assert explained["session"]["cnf"] == {"jkt": key.thumbprint}


def test_an_exchange_without_a_proof_is_refused_where_dpop_is_required(
    dpop_stack: Stack, tmp_path: Path
) -> None:
    """Refused before the token is consumed: the same token then exchanges with a proof. A
    grant that does not require DPoP still serves a client without one (unbound, N_A)."""
    broker = dpop_stack.broker
    token = dpop_stack.issuer.mint("gitlab")
    status, body, _ = broker.exchange(token, "bound-writer")
    assert (status, body["error"]) == (400, "invalid_dpop_proof")
    assert [e.reason for e in dpop_stack.events_for(body["request_id"])] == ["dpop_required"]

    key = DpopKey()
    proof = key.proof("POST", broker.url + "/v1/token", now=datetime.now(UTC), nonce=_nonce(broker))
    status, body, _ = _post(broker, "/v1/token", exchange_form(token, "bound-writer"), proof)
    assert status == 200, body
    assert body["token_type"] == "DPoP"
    bound_handle = body["refresh_token"]
    # The operator sees the binding: `sessions list --json` names the key's thumbprint.
    listed = broker.cli("sessions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert key.thumbprint in {s["key_thumbprint"] for s in json.loads(listed.stdout)}

    status, body, _ = broker.exchange(dpop_stack.issuer.mint("gitlab"), "etl-writer")
    assert status == 200 and body["token_type"] == "N_A"
    # An unbound session cannot mint a grant that requires DPoP.
    status, body, _ = broker.refresh(body["refresh_token"], "bound-writer")
    assert (status, body["error"]) == (400, "invalid_dpop_proof")
    assert [e.reason for e in dpop_stack.events_for(body["request_id"])] == ["dpop_required"]

    # The bound session ends with a proof by its key.
    revoke = key.proof(
        "POST", broker.url + "/v1/revoke", now=datetime.now(UTC), nonce=_nonce(broker)
    )
    form = {"token": bound_handle, "token_type_hint": "refresh_token"}
    assert _post(broker, "/v1/revoke", form, revoke)[0] == 200


def test_two_brokers_on_one_postgresql_share_nonces_and_spent_proofs(
    dpop_stack: Stack, tmp_path: Path
) -> None:
    """Two replicas behind one address (the load balancer passes the Host): a nonce one issued
    is accepted by the other, and a proof spent at one is refused as a replay at the other."""
    with fresh_pg_database("luigi_creds_dpop") as url:
        role_arn = dpop_stack.moto.create_role("dpop-replicas")
        replicas = []
        for name in ("one", "two"):
            config = policy_toml(
                issuer_url=dpop_stack.issuer.url,
                audit_db=url,
                listen=f"127.0.0.1:{free_port()}",
                moto_url=dpop_stack.moto.url,
                role_arn=role_arn,
                issuer_extra="require_dpop = true",
            )
            replicas.append(start_broker(tmp_path / name, config, env=dpop_stack.moto.broker_env))
        one, two = replicas
        try:
            key = DpopKey()
            token_url = one.url + "/v1/token"
            as_one = {"Host": one.url.removeprefix("http://")}
            now = datetime.now(UTC)
            form = exchange_form(dpop_stack.issuer.mint("gitlab"))
            status, body, headers = _post(
                one, "/v1/token", form, key.proof("POST", token_url, now=now)
            )
            assert status == 200 and body["token_type"] == "DPoP", body
            nonce_from_one = headers["DPoP-Nonce"]

            proof = key.proof("POST", token_url, now=now, nonce=nonce_from_one)
            data = urllib.parse.urlencode(refresh_form(body["refresh_token"], task="t1"))
            status, at_two, _ = two.post_raw(
                "/v1/token", data.encode("ascii"), headers={"DPoP": proof, **as_one}
            )
            assert status == 200, at_two
            handle = at_two["refresh_token"]

            status, replay, _ = _post(one, "/v1/token", refresh_form(handle, task="t2"), proof)
            assert (status, replay["error"]) == (400, "invalid_dpop_proof")
            store = open_store(url)
            try:
                reasons = [e.reason for e in store.events() if e.request_id == replay["request_id"]]
            finally:
                store.close()
            assert reasons == ["dpop_replayed"]
            fresh = key.proof("POST", token_url, now=datetime.now(UTC), nonce=nonce_from_one)
            status, body, _ = _post(one, "/v1/token", refresh_form(handle, task="t3"), fresh)
            assert status == 200, body
        finally:
            one.stop()
            two.stop()


def _in_forked_child(work: Callable[[], str]) -> str:
    """Run `work` in a real os.fork() child; its answer, read back through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, then leave without running the parent's exit hooks
        try:
            os.close(read)
            os.write(write, work().encode("utf-8"))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read().decode("utf-8")
    os.waitpid(pid, 0)
    return answer


def test_a_forked_child_cannot_use_the_parents_session_or_its_dpop_key(
    dpop_stack: Stack, owner: tuple[BrokerClient, Sent]
) -> None:
    """After a real fork, every call of the parent's client in the child (mint, explain,
    revoke) and a proof by the parent's key are refused with an error that says why and what
    to do, and nothing reaches the broker; the parent's bound session is untouched and goes on
    minting. (Unguarded, the child signed as the holder and rotated the handle under the
    parent, whose next refresh then read as theft and ended the job's session.)"""
    client, _sent = owner
    assert isinstance(client.mint("bound-writer", task="Parent_1"), AwsCredentials)
    (session,) = {e.session_id for e in dpop_stack.events() if e.task == "Parent_1"}
    recorded = len(dpop_stack.events())
    token_url = dpop_stack.broker.url + "/v1/token"

    def child() -> str:
        calls: list[Callable[[], object]] = [
            lambda: client.mint("bound-writer", task="Child_1"),
            client.explain,
            lambda: client.revoke(retry=False),
            lambda: client._dpop.proof("POST", token_url, now=datetime.now(UTC)),
        ]
        answers = []
        for call in calls:
            try:
                call()
                answers.append("allowed")
            except (BrokerError, ForkedKeyError) as exc:
                answers.append(f"{type(exc).__name__} {getattr(exc, 'error', '-')}: {exc}")
        return json.dumps(answers)

    answers = json.loads(_in_forked_child(child))
    parent = os.getpid()
    assert len(answers) == 4
    whats = ["mint grant 'bound-writer'", "explain", "end the session"]
    for answer, what in zip(answers[:3], whats, strict=True):
        assert answer.startswith(f"BrokerError forked_process: cannot {what}: "), answer
        assert f"belongs to process {parent}" in answer and "ensure_agent()" in answer
    assert answers[3].startswith("ForkedKeyError -: DPoP key "), answers[3]
    assert f"belongs to process {parent}" in answers[3]
    assert len(dpop_stack.events()) == recorded  # nothing reached the broker

    assert isinstance(client.mint("bound-writer", task="Parent_2"), AwsCredentials)
    in_session = [e for e in dpop_stack.events() if e.session_id == session]
    issued = [e.task for e in in_session if e.outcome == Outcome.ISSUED]
    assert issued == ["Parent_1", "Parent_2"]
    # Nothing denied, revoked or ended on the session: only the two mints and their intents.
    assert {e.outcome for e in in_session} == {Outcome.INTENT, Outcome.ISSUED}
