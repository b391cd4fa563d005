"""OpenBao for integration tests: the dev server and the broker's Vault-side setup.

The code lives in `broker.dev.vault`, shared with `luigi-creds-broker dev` and `make demo`; this
module re-exports it under the names tests import, and says where the test PostgreSQL is.
"""

from __future__ import annotations

import os

from broker.dev.vault import (
    BAO,
    BROKER_POLICY,
    BROKER_POLICY_HCL,
    BROKER_ROLE,
    DB_CREATION,
    DB_ROLE,
    ETL_POLICY,
    ETL_POLICY_HCL,
    BrokerVault,
    OpenBao,
    enable_database,
    setup_broker,
    start_openbao,
    write_approle_files,
)

__all__ = [
    "BAO",
    "BROKER_POLICY",
    "BROKER_POLICY_HCL",
    "BROKER_ROLE",
    "DB_CREATION",
    "DB_ROLE",
    "DEFAULT_PG",
    "ETL_POLICY",
    "ETL_POLICY_HCL",
    "BrokerVault",
    "OpenBao",
    "enable_database",
    "pg_url",
    "setup_broker",
    "start_openbao",
    "write_approle_files",
]

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def pg_url() -> str:
    return os.environ.get("LUIGI_CREDS_TEST_PG", DEFAULT_PG)
