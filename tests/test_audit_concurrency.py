"""Concurrent writers on one ledger: 2 processes x 4 threads append 10,000 events in total to
SQLite and to PostgreSQL. Both processes start on an empty database, so they also race
the schema migration and the creation of the key and salt files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_audit_ledger import pg_url  # noqa: F401 - the fixture, shared

from broker.audit import open_store
from broker.audit.key_files import load_public_keys
from broker.audit.verify import verify_ledger

PROCESSES = 2
THREADS = 4
TOTAL = 10_000
REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import sys, threading
    from datetime import UTC, datetime
    from pathlib import Path
    from broker.audit import open_store
    from broker.audit.events import AuditEvent, Outcome

    url, key, salt, proc, threads, per_thread = sys.argv[1:7]
    store = open_store(url, signing_key_path=Path(key), salt_path=Path(salt), checkpoint_every=500)
    errors = []

    def write(t):
        try:
            for i in range(int(per_thread)):
                rid = f"p{proc}-t{t}-{i}"
                store.append(AuditEvent(time=datetime.now(UTC), request_id=rid,
                                        outcome=Outcome.INTENT, attempt=1))
                store.append(AuditEvent(time=datetime.now(UTC), request_id=rid,
                                        outcome=Outcome.ISSUED, credential_ref="ASIA" + rid))
        except Exception as exc:
            errors.append(repr(exc))

    workers = [threading.Thread(target=write, args=(t,)) for t in range(int(threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    store.close()
    print("errors", errors)
    sys.exit(1 if errors else 0)
    """
)


def _run_writers(url: str, tmp_path: Path) -> None:
    per_thread = TOTAL // (PROCESSES * THREADS * 2)  # two records (intent + issued) per request
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                url,
                str(tmp_path / "key.pem"),
                str(tmp_path / "salt"),
                str(p),
                str(THREADS),
                str(per_thread),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(PROCESSES)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out


def _check(url: str, tmp_path: Path) -> None:
    store = open_store(url)
    try:
        events = list(store.events())
        assert len(events) == TOTAL
        counts = Counter((e.request_id, str(e.outcome)) for e in events)
        assert len(counts) == TOTAL and set(counts.values()) == {1}
        assert store.dangling_intents() == []
        report = verify_ledger(
            store, public_keys=load_public_keys(tmp_path / "key.pem"), now=datetime.now(UTC)
        )
        assert report.ok, report.findings[:5]
        assert report.size == TOTAL and report.checkpoints_verified == TOTAL // 500
        assert [cp.size for cp in store.checkpoints()] == list(range(500, TOTAL + 1, 500))
    finally:
        store.close()


def test_concurrent_writers_on_sqlite(tmp_path: Path) -> None:
    """2 processes x 4 threads write 10,000 records to an SQLite file; none lost, chain verifies."""
    url = f"sqlite:///{tmp_path}/audit.db"
    _run_writers(url, tmp_path)
    _check(url, tmp_path)


@pytest.mark.integration
def test_concurrent_writers_on_postgresql(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """2 processes x 4 threads write 10,000 records to PostgreSQL; none lost, chain verifies."""
    _run_writers(pg_url, tmp_path)
    _check(pg_url, tmp_path)
