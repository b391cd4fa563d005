"""The tally of unauthenticated refusals (broker/denials.py) and how verify checks it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker.audit.events import Outcome
from broker.audit.verify import tally_well_formed
from broker.denials import MAX_CLIENTS, OTHER_CLIENTS, DenialTally

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def add(tally: DenialTally, client: str, now: datetime, reason: str = "malformed") -> None:
    tally.add(kind="exchange", outcome="denied", reason=reason, issuer="", client=client, now=now)


def test_counts_per_reason_and_client_in_one_record() -> None:
    tally = DenialTally(window_seconds=60)
    for i in range(5):
        add(tally, "10.0.0.1", T0 + timedelta(seconds=i), reason="bad_signature")
    tally.add(
        kind="revoke",
        outcome="revoked",
        reason="unknown_handle",
        issuer="",
        client="10.0.0.2",
        now=T0 + timedelta(seconds=10),
    )
    assert not tally.due(T0 + timedelta(seconds=59))
    assert tally.due(T0 + timedelta(seconds=60))
    window = tally.take()
    assert window is not None and tally.take() is None
    event = window.event(T0 + timedelta(seconds=60))
    assert (event.outcome, event.kind, event.reason) == (
        Outcome.TALLIED,
        "denials",
        "unauthenticated",
    )
    assert event.detail["total"] == 6
    assert event.detail["clients"] == [
        {"client_addr": "10.0.0.1", "count": 5},
        {"client_addr": "10.0.0.2", "count": 1},
    ]
    assert tally_well_formed(event.detail)


def test_clients_are_bounded_and_a_failed_write_keeps_the_counts() -> None:
    tally = DenialTally()
    for i in range(MAX_CLIENTS + 50):
        add(tally, f"10.0.{i // 256}.{i % 256}", T0)
    window = tally.take()
    assert window is not None
    assert len(window.clients) == MAX_CLIENTS + 1 and window.clients[OTHER_CLIENTS] == 50
    add(tally, "x", T0 + timedelta(seconds=5))
    tally.put_back(window)
    merged = tally.take()
    assert merged is not None and merged.total() == MAX_CLIENTS + 51
    assert merged.start == T0
    assert tally_well_formed(merged.event(T0 + timedelta(seconds=9)).detail)


def test_verify_refuses_a_tally_that_does_not_add_up() -> None:
    tally = DenialTally()
    tally.add(kind="exchange", outcome="denied", reason="malformed", issuer="", client="a", now=T0)
    window = tally.take()
    assert window is not None
    detail = dict(window.event(T0).detail)
    assert tally_well_formed(detail)
    assert not tally_well_formed({**detail, "total": 2})
    assert not tally_well_formed({**detail, "window_end": (T0 - timedelta(1)).isoformat()})
    assert not tally_well_formed({**detail, "counts": [{"count": True}]})
    assert not tally_well_formed({})
