"""`audit export`: ledger records as JSON lines or CSV for a SIEM.

Owns the export row shape. Reads stored records; talks to nothing else.

Join keys:
- `aws_access_key_id` is the AccessKeyId STS returned. It is CloudTrail's
  `responseElements.credentials.accessKeyId` on the AssumeRole* event and
  `userIdentity.accessKeyId` on every call made with the credential.
- `vault_accessor_hmac` is `hmac-sha256:<hex>` of the token accessor under the deployment salt,
  the same form Vault's audit device writes; with the same salt (or after looking the accessor up
  with `sys/audit-hash`) it joins Vault's audit log. `vault_lease_id` is in clear in both logs.
- `request_id` joins our own records; `seq` and `entry_hash` let a row be checked against the
  ledger (`audit verify`) after it left it.

CSV cells are spreadsheet-safe (`broker.audit.spreadsheet`): a value such as a task id starting
with `=` gets a leading `'`. JSON lines carry every value exactly as recorded.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from broker.audit.ledger import StoredRecord
from broker.audit.spreadsheet import spreadsheet_safe

COLUMNS = (
    "seq",
    "time",
    "request_id",
    "outcome",
    "reason",
    "kind",
    "issuer",
    "subject",
    "grant",
    "target",
    "credential_ref",
    "aws_access_key_id",
    "vault_accessor_hmac",
    "vault_lease_id",
    "expires_at",
    "session_id",
    "task",
    "client_addr",
    "jti",
    "token_sha256",
    "attempt",
    "entry_hash",
)

# AWS access key IDs: AKIA (long-term) and ASIA (STS temporary), 20 characters.
_AWS_KEY_PREFIXES = ("ASIA", "AKIA")


def export_row(stored: StoredRecord) -> dict[str, Any]:
    record = json.loads(stored.record)
    ref = record.get("credential_ref", "")
    row = {name: record.get(name, "") for name in COLUMNS}
    row["seq"] = stored.seq
    row["entry_hash"] = stored.entry_hash
    row["expires_at"] = record.get("expires_at") or ""
    row["aws_access_key_id"] = ref if ref.startswith(_AWS_KEY_PREFIXES) else ""
    row["vault_accessor_hmac"] = ref if ref.startswith("hmac-sha256:") else ""
    row["vault_lease_id"] = ref if "/" in ref and not row["aws_access_key_id"] else ""
    return row


def export_jsonl(records: Iterable[StoredRecord]) -> Iterator[str]:
    for stored in records:
        yield json.dumps(export_row(stored), sort_keys=True, ensure_ascii=False) + "\n"


def export_csv(records: Iterable[StoredRecord]) -> Iterator[str]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    yield buf.getvalue()
    for stored in records:
        buf.seek(0)
        buf.truncate()
        writer.writerow({k: spreadsheet_safe(v) for k, v in export_row(stored).items()})
        yield buf.getvalue()
