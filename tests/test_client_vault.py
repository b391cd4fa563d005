"""Tests for luigi_creds.vault: LifetimeWatcher timing, and token keeping against a real OpenBao."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from luigi_creds.client import VaultSecret, VaultToken, parse_credential
from luigi_creds.serve import credential_to_wire
from luigi_creds.vault import LeaseKeeper, TokenKeeper, error_delay, release, renew_delay

BAO = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "bao"
ROOT_TOKEN = "root-test-token"


def test_renew_delay_is_two_thirds_minus_jitter() -> None:
    """Renewal waits 2/3 of the lease, less up to 10 % of that as jitter."""
    assert renew_delay(900, rng=lambda: 0.0) == pytest.approx(600)
    assert renew_delay(900, rng=lambda: 1.0) == pytest.approx(540)
    assert renew_delay(-5, rng=lambda: 0.5) == 0


def test_error_backoff_doubles_and_is_capped_by_the_lease() -> None:
    """Failed renewals back off 1, 2, 4 s, never beyond a third of the lease."""
    assert [error_delay(n, 900) for n in (1, 2, 3)] == [1, 2, 4]
    assert error_delay(20, 30) == 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bao() -> Iterator[hvac.Client]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(BAO), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
            f"-dev-listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    root = hvac.Client(url=f"http://127.0.0.1:{port}", token=ROOT_TOKEN)
    deadline = time.monotonic() + 20
    while True:
        try:
            if root.sys.is_initialized():
                break
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    yield root
    proc.terminate()
    proc.wait(10)


def _mint(root: hvac.Client, ttl: str, max_ttl: str) -> VaultToken:
    auth = root.auth.token.create(
        policies=["default"], ttl=ttl, explicit_max_ttl=max_ttl, renewable=True
    )["auth"]
    return VaultToken(
        grant="etl-vault",
        request_id="r",
        token=auth["client_token"],
        accessor=auth["accessor"],
        policies=tuple(auth["policies"]),
        renewable=auth["renewable"],
        lease_duration=auth["lease_duration"],
        expires_at=datetime.now(UTC) + timedelta(seconds=auth["lease_duration"]),
    )


@pytest.mark.integration
def test_token_outlives_its_max_ttl_through_renewal_and_remint(bao: hvac.Client) -> None:
    """A 3 s token with a 6 s max TTL stays usable for 9 s: renewed, then re-minted."""
    remints: list[VaultToken] = []

    def remint() -> VaultToken:
        remints.append(_mint(bao, "3s", "6s"))
        return remints[-1]

    keeper = TokenKeeper(_mint(bao, "3s", "6s"), bao.url, remint=remint, rng=lambda: 0.0)
    keeper.start()
    try:
        end = time.monotonic() + 9
        while time.monotonic() < end:
            assert keeper.client.auth.token.lookup_self()["data"]["policies"] == ["default"]
            time.sleep(0.25)
    finally:
        keeper.stop()
    assert remints


@pytest.mark.integration
def test_release_revokes_the_token(bao: hvac.Client) -> None:
    """release() stops renewal and revokes the task's token in OpenBao."""
    cred = _mint(bao, "60s", "120s")
    keeper = TokenKeeper.for_task("Task(x=1)", "etl-vault", cred, bao.url)
    assert keeper.client.is_authenticated()
    release("Task(x=1)", "etl-vault", cred, bao.url)
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=bao.url, token=cred.token).auth.token.lookup_self()


def test_lease_keeper_renews_until_the_lease_stops_extending() -> None:
    """A lease is renewed at 2/3 of its duration until a renewal comes back capped."""
    grants = [0.3, 0.3, 0.1]
    asked: list[int] = []

    def renew(increment: int) -> float:
        asked.append(increment)
        return grants.pop(0)

    keeper = LeaseKeeper(renew, 0.3, rng=lambda: 0.0)
    keeper.start()
    assert keeper.done.wait(5)
    assert keeper.renewals == 3
    assert grants == []


def test_lease_keeper_backs_off_on_errors_and_stops_when_told() -> None:
    """Failed renewals are retried with back-off; stop() ends the keeper."""
    calls: list[float] = []

    def renew(increment: int) -> float:
        calls.append(time.monotonic())
        raise ConnectionError("vault down")

    keeper = LeaseKeeper(renew, 0.3, rng=lambda: 0.0)
    keeper.start()
    time.sleep(1.0)
    keeper.stop()
    assert keeper.done.wait(5)
    assert keeper.renewals == 0
    assert 1 <= len(calls) <= 4


def test_vault_secret_renew_token_round_trips_and_is_hidden() -> None:
    """The broker's renew_token is parsed, relayed by the agent and kept out of repr."""
    body = {
        "issued_token_type": "urn:luigi-creds:token-type:vault-secret",
        "request_id": "r",
        "credentials": {
            "lease_id": "database/creds/w/1",
            "lease_duration": 60,
            "renewable": True,
            "data": {"password": "pw"},
            "renew_token": "hvs.renew-only",
        },
    }
    cred = parse_credential(body, grant="db", now=datetime.now(UTC))
    assert isinstance(cred, VaultSecret) and cred.renew_token == "hvs.renew-only"
    assert "hvs.renew-only" not in repr(cred)
    again = parse_credential(credential_to_wire(cred), grant="db", now=datetime.now(UTC))
    assert isinstance(again, VaultSecret) and again.renew_token == "hvs.renew-only"
