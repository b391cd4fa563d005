"""Benchmark of the store alone: exchange-shaped writes from two replica processes on one fresh
PostgreSQL database, without HTTP, OpenBao or a load generator competing for the CPU.

Each replica process opens the broker's store as the broker does (one Database shared by the
audit ledger, the replay ledger and the sessions) and runs `--threads` threads, each making
`--per-thread` exchanges' writes: the token's consumption, its session and the `intent` in one
write; a pause standing for the upstream call; the credential's record and `issued` in a second
write. Reported: exchanges per second, the replica processes' CPU per exchange (user+system),
PostgreSQL's CPU per exchange (every process of the local cluster, exited backends included,
as in bench/load.py) and commits (batches) per exchange.

Run it with the tree to measure first on PYTHONPATH, by path, so a before/after pair runs the
same script on two trees:

    PYTHONPATH=/path/to/tree python bench/store_writes.py

The database is $LUIGI_CREDS_TEST_PG's cluster; the script creates and drops its own database.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

_CLK_TCK = os.sysconf("SC_CLK_TCK")
UPSTREAM_PAUSE = 0.004  # seconds between an exchange's two writes
WARMUP = 10  # exchanges per replica before the clock starts


def cluster_cpu(postmaster: int) -> float:
    """CPU seconds of the PostgreSQL cluster whose postmaster is `postmaster` (its own, its
    live children's, and its waited-for children's)."""
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == postmaster:
            total += int(stat[11]) + int(stat[12])
    return total / _CLK_TCK


def replica(url: str, threads: int, per_thread: int, start: Any, out: Any, index: int) -> None:
    from broker.audit import open_store
    from broker.audit.events import AuditEvent, Outcome
    from broker.sealing import RefSealer
    from broker.sessions import open_state
    from broker.storage import Database, Tx

    db = Database.open(url)
    ledger = open_store(db)
    replay, sessions = open_state(db, sealer=RefSealer(secrets.token_bytes(32)))

    def exchange(name: str) -> None:
        now = datetime.now(UTC)
        subject = f"project_path:data/etl:ref:{name}"
        claims = {"sub": subject, "project_path": "data/etl", "ref": "main"}
        session, _, open_session = sessions.opening(
            issuer="dev",
            subject=subject,
            claims=claims,
            now=now,
            expires_at=now + timedelta(hours=1),
        )
        consume = replay.consumer(
            "dev",
            f"jti-{name}-{secrets.token_hex(4)}",
            expires_at=now + timedelta(minutes=10),
            now=now,
        )
        intent = ledger.appender(
            AuditEvent(
                time=now,
                request_id=name,
                outcome=Outcome.INTENT,
                subject=subject,
                grant="etl",
                claims={"project_path": "data/etl"},
                session_id=session.id,
            )
        )

        def opened(tx: Tx) -> bool:
            if not consume(tx):
                return False
            open_session(tx)
            intent(tx)
            return True

        assert db.write(opened)
        time.sleep(UPSTREAM_PAUSE)
        remember = sessions.credential_recorder(
            session.id,
            kind="vault_accessor",
            ref="accessor-" + secrets.token_hex(12),
            expires_at=now + timedelta(minutes=15),
        )
        issued = ledger.appender(
            AuditEvent(
                time=now,
                request_id=name,
                outcome=Outcome.ISSUED,
                reason="issued",
                subject=subject,
                grant="etl",
                session_id=session.id,
                credential_ref=secrets.token_hex(32),
            )
        )

        def delivered(tx: Tx) -> None:
            remember(tx)
            issued(tx)

        db.write(delivered)

    for i in range(WARMUP):
        exchange(f"warm-{index}-{i}")
    start.wait()
    cpu, wall, commits = time.process_time(), time.perf_counter(), db.commits
    workers = [
        threading.Thread(
            target=lambda t=t: [exchange(f"r{index}-t{t}-{i}") for i in range(per_thread)]
        )
        for t in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((time.process_time() - cpu, time.perf_counter() - wall, db.commits - commits))
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8, help="threads per replica")
    parser.add_argument("--per-thread", type=int, default=150, help="exchanges per thread")
    args = parser.parse_args()
    admin = os.environ.get("LUIGI_CREDS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"store_writes_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert backend is not None
    status = Path(f"/proc/{backend[0]}/status").read_text()
    postmaster = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("PPid:"))
    url = admin.rsplit("/", 1)[0] + "/" + name
    try:
        from broker.audit import open_store
        from broker.sealing import RefSealer
        from broker.sessions import open_state
        from broker.storage import Database

        schema = Database.open(url)  # migrated once, before the replicas start
        open_store(schema)
        open_state(schema, sealer=RefSealer(secrets.token_bytes(32)))
        schema.close()
        spawn = multiprocessing.get_context("spawn")
        start, out = spawn.Event(), spawn.Queue()
        processes = [
            spawn.Process(target=replica, args=(url, args.threads, args.per_thread, start, out, i))
            for i in range(args.replicas)
        ]
        for process in processes:
            process.start()
        time.sleep(3)  # the replicas warm up, then wait for `start`
        pg_before = cluster_cpu(postmaster)
        start.set()
        results = [out.get() for _ in processes]
        pg_cpu = cluster_cpu(postmaster) - pg_before
        for process in processes:
            process.join()
        exchanges = args.replicas * args.threads * args.per_thread
        wall = max(r[1] for r in results)
        print(
            f"exchanges {exchanges} in {wall:.2f} s ({exchanges / wall:.0f}/s);"
            f" replicas' CPU {sum(r[0] for r in results) / exchanges * 1000:.3f} ms/exchange;"
            f" PostgreSQL's CPU {pg_cpu / exchanges * 1000:.3f} ms/exchange;"
            f" commits {sum(r[2] for r in results) / exchanges:.2f}/exchange"
        )
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
