"""Shared pytest fixtures: real servers started as child processes on free loopback ports.

Each fixture starts its server through `broker.dev.harness`, logs to the test's tmp dir and stops
the process when the test ends, so no test leaves a child behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.dev.harness import DevIssuer, start_dev_issuer


@pytest.fixture
def oidc_issuer(tmp_path: Path) -> Iterator[DevIssuer]:
    """A fresh local OIDC issuer process (RS256 and ES256 keys) for one test."""
    issuer = start_dev_issuer(tmp_path)
    try:
        yield issuer
    finally:
        issuer.stop()


@pytest.fixture
def socket_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every `socket.sendall` this process makes from now on, one entry per call (the data as
    written): how a test sees whether a request left in one write."""
    import socket

    writes: list[bytes] = []
    real = socket.socket.sendall

    def counted(self: socket.socket, data: bytes, *args: object) -> None:
        writes.append(bytes(data))
        real(self, data, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "sendall", counted)
    return writes
