"""The job summary: which credentials a CI job was given, as Markdown for the job's page.

Owns the record of what the job's agent minted (`MintLog`, filled by wrapping the agent's mint
function, so refreshes served to SDKs are recorded too) and its Markdown rendering. The record
holds only what identifies a credential, never the credential: task, grant, AWS AccessKeyId,
Vault token accessor or lease id, times and the broker's request id (the join key into the
broker's audit). Writing it out is `publish`: appended to `$GITHUB_STEP_SUMMARY` when that
variable is set (GitHub Actions renders it on the run's page) and written to a file (GitLab and
Bitbucket keep it as a job artifact) when one is named.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from luigi_creds.credentials import AwsCredentials, Credential, VaultToken

log = logging.getLogger("luigi_creds.summary")

# Where exec and a Luigi job's agent also write the summary (besides $GITHUB_STEP_SUMMARY).
SUMMARY_FILE_ENV = "LUIGI_CREDS_SUMMARY_FILE"
GITHUB_STEP_SUMMARY = "GITHUB_STEP_SUMMARY"

Mint = Callable[[str, str | None, int | None], Credential]


@dataclass(frozen=True)
class Minted:
    """One credential the job was given, by what identifies it (nothing secret)."""

    task: str
    grant: str
    kind: str  # aws | vault-token | vault-secret
    ref: str  # AccessKeyId, Vault token accessor, or lease id
    request_id: str
    minted_at: str  # RFC 3339 UTC
    expires_at: str

    @property
    def lifetime_seconds(self) -> int:
        return int(
            (
                datetime.fromisoformat(self.expires_at) - datetime.fromisoformat(self.minted_at)
            ).total_seconds()
        )


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds")


def minted(cred: Credential, task: str | None, at: datetime) -> Minted:
    if isinstance(cred, AwsCredentials):
        kind, ref = "aws", cred.access_key_id
    elif isinstance(cred, VaultToken):
        kind, ref = "vault-token", cred.accessor
    else:
        kind, ref = "vault-secret", cred.lease_id
    return Minted(
        task=task or "",
        grant=cred.grant,
        kind=kind,
        ref=ref,
        request_id=cred.request_id,
        minted_at=_iso(at),
        expires_at=_iso(cred.expires_at),
    )


class MintLog:
    """Every credential minted through one agent, in order; thread-safe."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: list[Minted] = []

    def wrap(self, mint: Mint) -> Mint:
        def recording(grant: str, task: str | None, duration: int | None) -> Credential:
            cred = mint(grant, task, duration)
            self.add(minted(cred, task, self._clock()))
            return cred

        return recording

    def add(self, entry: Minted) -> None:
        with self._lock:
            self._entries.append(entry)

    def entries(self) -> list[Minted]:
        with self._lock:
            return list(self._entries)

    def as_json(self) -> dict[str, Any]:
        return {"credentials": [asdict(e) for e in self.entries()]}


def from_json(body: Mapping[str, Any]) -> list[Minted]:
    """Entries from `MintLog.as_json()` (as the agent serves it); ValueError if malformed."""
    items = body.get("credentials")
    if not isinstance(items, list):
        raise ValueError("no credentials list")
    fields = Minted.__dataclass_fields__
    out = []
    for item in items:
        if not isinstance(item, dict) or set(item) != set(fields):
            raise ValueError("malformed credential entry")
        if not all(isinstance(v, str) for v in item.values()):
            raise ValueError("malformed credential entry")
        out.append(Minted(**item))
    return out


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, no line breaks, backticks kept out of code spans."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "'")


def _duration(seconds: int) -> str:
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


_KIND = {"aws": "AWS key", "vault-token": "Vault token", "vault-secret": "Vault lease"}


def render_markdown(entries: Sequence[Minted], *, title: str = "luigi-creds credentials") -> str:
    """The summary as GitHub-flavoured Markdown: one row per credential."""
    lines = [f"### {title}", ""]
    if not entries:
        lines += ["No credentials were minted.", ""]
        return "\n".join(lines)
    tasks = {e.task for e in entries if e.task}
    grants = {e.grant for e in entries}
    lines += [
        f"{len(entries)} credential(s) for {len(tasks)} task(s) and the job itself, "
        f"{len(grants)} grant(s). "
        "Key ids, accessors and lease ids identify credentials; none of them is a secret. "
        "The request id finds each one in the broker's audit "
        "(`luigi-creds-broker audit rotation`).",
        "",
        "| task | grant | credential | key id / accessor / lease | issued (UTC) | lifetime "
        "| request id |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            f"| {_cell(e.task) or '(job)'} | {_cell(e.grant)} | {_KIND.get(e.kind, e.kind)} "
            f"| `{_cell(e.ref)}` | {_cell(e.minted_at)} | {_duration(e.lifetime_seconds)} "
            f"| `{_cell(e.request_id)}` |"
        )
    lines.append("")
    return "\n".join(lines)


def publish(markdown: str, environ: Mapping[str, str], output: Path | None = None) -> list[Path]:
    """Append to $GITHUB_STEP_SUMMARY when set; write `output` (or $LUIGI_CREDS_SUMMARY_FILE).
    Returns the paths written. A summary that cannot be written is logged, never raised: the
    job's own result matters more than its report."""
    written = []
    step = environ.get(GITHUB_STEP_SUMMARY)
    if step:
        try:
            with Path(step).open("a", encoding="utf-8") as fh:
                fh.write(markdown + "\n")
            written.append(Path(step))
        except OSError as exc:
            log.warning("luigi-creds: cannot append the job summary to %s: %s", step, exc)
    target = output or (Path(environ[SUMMARY_FILE_ENV]) if environ.get(SUMMARY_FILE_ENV) else None)
    if target is not None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(markdown + "\n", encoding="utf-8")
            written.append(target)
        except OSError as exc:
            log.warning("luigi-creds: cannot write the job summary to %s: %s", target, exc)
    return written


def publish_summary(
    mint_log: MintLog, environ: Mapping[str, str], output: Path | None = None
) -> list[Path]:
    """Render and publish `mint_log` where the environment (or `output`) asks for it; nothing
    when no destination is set."""
    if not (output or environ.get(GITHUB_STEP_SUMMARY) or environ.get(SUMMARY_FILE_ENV)):
        return []
    return publish(render_markdown(mint_log.entries()), environ, output)
