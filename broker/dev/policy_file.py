"""Pieces of the policy files the dev stack, the test harness and the benchmarks generate.

One GitLab ETL grant and one pair of upstream tables, written once, so `luigi-creds-broker dev`,
the integration tests and the benchmarks run the broker on the same grant. Each piece is TOML
text starting at column 0 and ending in a newline; callers put them where their file needs them.
Pure.
"""

from __future__ import annotations

from pathlib import Path

from broker.dev.aws import REGION
from broker.dev.claims import GITLAB_PROJECT_ID

ETL_WRITER = "etl-writer"


def etl_writer_grant(*, issuer: str, role_arn: str, session_name: str) -> str:
    """The GitLab ETL project's protected `main` and `release/*` branches assume `role_arn`,
    with the project and pipeline as session tags and the user as source identity."""
    return f"""\
[[grant]]
name = "{ETL_WRITER}"
issuers = ["{issuer}"]
ttl = "15m"
[grant.match]
project_id = "{GITLAB_PROJECT_ID}"
ref_protected = "true"
ref = ["main", "release/*"]
[grant.aws]
role_arn = "{role_arn}"
session_name = "{session_name}"
session_tags = {{ project = "{{project_path}}", pipeline = "{{pipeline_id}}" }}
source_identity = "{{user_login}}"
"""


def upstream_aws(endpoint_url: str) -> str:
    """STS at `endpoint_url` (moto) in the dev region."""
    return f"""\
[upstream.aws]
region = "{REGION}"
endpoint_url = "{endpoint_url}"
"""


def upstream_vault_approle(url: str, role_id_file: Path, secret_id_file: Path) -> str:
    """Vault (OpenBao) at `url`, the broker logging in with AppRole from two files."""
    return f"""\
[upstream.vault]
url = "{url}"
auth = "approle"
role_id_file = "{role_id_file}"
secret_id_file = "{secret_id_file}"
"""
