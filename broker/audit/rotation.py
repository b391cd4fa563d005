"""`audit rotation`: the credential-rotation audit report, per task, with the ledger's trust on top.

Answers what a rotation audit asks: which task held which key, from when to when, and can the
ledger saying so be trusted. Pure: takes events, the Config and the ledger's verification
result (`LedgerTrust`, built by the CLI from `verify_ledger` and the newest checkpoint) and
returns the report and its renderings (JSON; HTML with an inline SVG chart, no script and
nothing fetched). Talks to no system.

Definitions (each the rule the figures follow):
- A credential is an `issued` record in the window. Its chain: task -> grant -> target (role ARN,
  `vault:token:<policies>` or `vault:<secret path>`) -> credential reference exactly as the ledger
  holds it (an AWS AccessKeyId; a Vault token accessor only as its HMAC under the deployment's
  salt, never the accessor; a Vault lease id) -> state at the end of the window -> lifetime.
- State: `revoked` when a `revoked` record at or before the window's end names the reference
  (a lease revoke's credential_ref, or a session end's `aws_marked_revoked`/`vault_revoked`
  lists) or ends its session after issue; else `expired` when expires_at is at or before the
  window's end; else `issued` (still valid).
- Lifetime: from the issued record to the revocation, the expiry, or (still valid) the expiry it
  will reach; STS credentials cannot be revoked early, so an AWS `revoked` is a mark, and its
  lifetime is reported to the expiry with the mark time beside it.
- Denials over time: `denied` records per reason, in hourly buckets for windows up to two days,
  else daily.
- Grants never used: grants in the Config with no `issued` record in the window.
- Unusually many grants: an identity (`issuer:subject`) whose number of distinct grants issued
  exceeds median + max(2, 1.5 * IQR) over all identities in the window (a Tukey-style fence
  with a floor, so a small team where everyone uses two grants flags nobody).
"""

from __future__ import annotations

import html
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from broker.audit.chain import format_time
from broker.audit.events import AuditEvent, Outcome
from broker.config import Config

if TYPE_CHECKING:
    from broker.audit.verify import VerifyReport

LONGEST_SHOWN = 10
_PALETTE = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass(frozen=True)
class Checkpoint:
    """The newest checkpoint in the store: what it commits to and its signature line."""

    size: int
    time: str
    root: str  # hex
    signature: str  # the signed note's signature line ("— <origin> <base64>"), "" if unsigned
    verified: bool  # the signature checked against the given public key


@dataclass(frozen=True)
class LedgerTrust:
    ok: bool
    records: int
    first_bad_seq: int | None
    checkpoints_verified: int
    unsigned_tail: int
    keys_checked: bool  # False: no public key was given, signatures were not checked
    findings: tuple[str, ...]
    checkpoint: Checkpoint | None


@dataclass(frozen=True)
class Credential:
    request_id: str
    task: str
    grant: str
    identity: str
    target: str
    credential_ref: str
    ref_kind: str
    issued_at: str
    expires_at: str | None
    state: str  # issued | expired | revoked
    ended_at: str | None  # revocation time, or expiry when expired
    revoked_reason: str
    lifetime_seconds: int | None
    session_id: str
    policy_sha256: str


@dataclass(frozen=True)
class DenialBucket:
    start: str
    counts: dict[str, int]


@dataclass(frozen=True)
class IdentityGrants:
    identity: str
    grants: tuple[str, ...]
    count: int
    threshold: float


@dataclass(frozen=True)
class RotationReport:
    since: str
    until: str
    ledger: LedgerTrust
    credentials: tuple[Credential, ...]
    denial_bucket: str  # hour | day
    denials_over_time: tuple[DenialBucket, ...]
    denial_reasons: tuple[str, ...]
    longest_lived: tuple[Credential, ...]
    grants_never_used: tuple[str, ...]
    unusual_identities: tuple[IdentityGrants, ...]
    totals: dict[str, int] = field(default_factory=dict)


def ref_kind(ref: str) -> str:
    if ref.startswith("hmac-sha256:"):
        return "vault accessor (HMAC)"
    if ref.startswith(("ASIA", "AKIA")):
        return "aws access key id"
    if "/" in ref:
        return "vault lease id"
    return "other" if ref else "none"


def _identity(event: AuditEvent) -> str:
    return f"{event.issuer}:{event.subject}"


@dataclass
class _Revocation:
    at: datetime
    reason: str


def _revocations(
    events: Sequence[AuditEvent], until: datetime
) -> tuple[dict[str, _Revocation], dict[str, _Revocation]]:
    """First revocation per credential reference, and per session id, up to `until`."""
    by_ref: dict[str, _Revocation] = {}
    by_session: dict[str, _Revocation] = {}
    for e in events:
        if e.outcome != Outcome.REVOKED or e.time > until:
            continue
        mark = _Revocation(e.time, e.reason)
        refs = [e.credential_ref] if e.credential_ref else []
        for key in ("aws_marked_revoked", "vault_revoked"):
            listed = e.detail.get(key, [])
            if isinstance(listed, list | tuple):
                refs += [str(r) for r in listed]
        for ref in refs:
            by_ref.setdefault(ref, mark)
        if e.kind == "session" and e.session_id:
            by_session.setdefault(e.session_id, mark)
    return by_ref, by_session


def _credential(
    e: AuditEvent,
    until: datetime,
    by_ref: dict[str, _Revocation],
    by_session: dict[str, _Revocation],
) -> Credential:
    revoked = by_ref.get(e.credential_ref) if e.credential_ref else None
    session_end = by_session.get(e.session_id) if e.session_id else None
    if revoked is None and session_end is not None and session_end.at >= e.time:
        revoked = session_end
    if revoked is not None and revoked.at < e.time:
        revoked = None
    ended: datetime | None
    lifetime_end: datetime | None
    aws = ref_kind(e.credential_ref) == "aws access key id"
    if revoked is not None:
        state, ended = "revoked", revoked.at
        # STS keys live to their expiry whatever the ledger marks: report the real lifetime.
        lifetime_end = e.expires_at if aws and e.expires_at is not None else revoked.at
    elif e.expires_at is not None and e.expires_at <= until:
        state, ended, lifetime_end = "expired", e.expires_at, e.expires_at
    else:
        state, ended, lifetime_end = "issued", None, e.expires_at
    lifetime = None if lifetime_end is None else round((lifetime_end - e.time).total_seconds())
    return Credential(
        request_id=e.request_id,
        task=e.task,
        grant=e.grant,
        identity=_identity(e),
        target=e.target,
        credential_ref=e.credential_ref,
        ref_kind=ref_kind(e.credential_ref),
        issued_at=format_time(e.time),
        expires_at=None if e.expires_at is None else format_time(e.expires_at),
        state=state,
        ended_at=None if ended is None else format_time(ended),
        revoked_reason=revoked.reason if revoked is not None else "",
        lifetime_seconds=lifetime,
        session_id=e.session_id,
        policy_sha256=e.policy_sha256,
    )


def _bucket_start(when: datetime, hourly: bool) -> datetime:
    if hourly:
        return when.replace(minute=0, second=0, microsecond=0)
    return when.replace(hour=0, minute=0, second=0, microsecond=0)


def _denials(
    events: Sequence[AuditEvent], since: datetime, until: datetime
) -> tuple[str, tuple[DenialBucket, ...], tuple[str, ...]]:
    hourly = until - since <= timedelta(days=2)
    step = timedelta(hours=1) if hourly else timedelta(days=1)
    counts: dict[datetime, Counter[str]] = defaultdict(Counter)
    reasons: Counter[str] = Counter()
    for e in events:
        if e.outcome == Outcome.DENIED:
            counts[_bucket_start(e.time, hourly)][e.reason or "-"] += 1
            reasons[e.reason or "-"] += 1
    buckets = []
    start = _bucket_start(since, hourly)
    while start < until:
        buckets.append(DenialBucket(format_time(start), dict(sorted(counts[start].items()))))
        start += step
    ordered = tuple(reason for reason, _ in reasons.most_common())
    return ("hour" if hourly else "day"), tuple(buckets), ordered


def _unusual(credentials: Sequence[Credential]) -> tuple[IdentityGrants, ...]:
    grants: dict[str, set[str]] = defaultdict(set)
    for c in credentials:
        grants[c.identity].add(c.grant)
    if not grants:
        return ()
    counts = [len(g) for g in grants.values()]
    median = statistics.median(counts)
    iqr = 0.0
    if len(counts) >= 2:
        q1, _, q3 = statistics.quantiles(counts, n=4, method="inclusive")
        iqr = q3 - q1
    threshold = median + max(2.0, 1.5 * iqr)
    flagged = [
        IdentityGrants(identity, tuple(sorted(g)), len(g), threshold)
        for identity, g in grants.items()
        if len(g) > threshold
    ]
    return tuple(sorted(flagged, key=lambda i: (-i.count, i.identity)))


def build_rotation(
    events: Iterable[AuditEvent],
    config: Config,
    *,
    since: datetime,
    until: datetime,
    ledger: LedgerTrust,
) -> RotationReport:
    window = [e for e in events if since <= e.time <= until]
    by_ref, by_session = _revocations(window, until)
    credentials = tuple(
        _credential(e, until, by_ref, by_session)
        for e in window
        if e.outcome == Outcome.ISSUED and e.kind in ("exchange", "refresh")
    )
    bucket, over_time, reasons = _denials(window, since, until)
    used = {c.grant for c in credentials}
    longest = sorted(
        (c for c in credentials if c.lifetime_seconds is not None),
        key=lambda c: (-(c.lifetime_seconds or 0), c.issued_at),
    )[:LONGEST_SHOWN]
    states = Counter(c.state for c in credentials)
    return RotationReport(
        since=format_time(since),
        until=format_time(until),
        ledger=ledger,
        credentials=credentials,
        denial_bucket=bucket,
        denials_over_time=over_time,
        denial_reasons=reasons,
        longest_lived=tuple(longest),
        grants_never_used=tuple(g.name for g in config.grants if g.name not in used),
        unusual_identities=_unusual(credentials),
        totals={
            "credentials": len(credentials),
            "issued": states["issued"],
            "expired": states["expired"],
            "revoked": states["revoked"],
            "denials": sum(1 for e in window if e.outcome == Outcome.DENIED),
        },
    )


# -- renderings ---------------------------------------------------------------------------------


def render_json(report: RotationReport) -> str:
    return json.dumps(asdict(report), indent=2) + "\n"


def _fmt_seconds(value: int | None) -> str:
    if value is None:
        return "-"
    hours, rest = divmod(value, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _colors(reasons: Sequence[str]) -> dict[str, str]:
    return {r: _PALETTE[i % len(_PALETTE)] for i, r in enumerate(reasons)}


def denials_svg(report: RotationReport) -> str:
    """Stacked bars of denials per reason per bucket, with a legend; inline, no script."""
    buckets = report.denials_over_time
    width, height, left, bottom, top = 900, 260, 50, 40, 20
    plot_h = height - bottom - top
    peak = max([sum(b.counts.values()) for b in buckets] + [1])
    slot = (width - left - 10) / max(len(buckets), 1)
    bar_w = max(slot * 0.8, 1.0)
    colors = _colors(report.denial_reasons)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="denials" width="{width}"'
        f' height="{height + 20 * ((len(colors) + 3) // 4)}" role="img"'
        ' aria-label="Denials by reason over time">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}"'
        ' stroke="#888"/>',
        f'<text x="{left - 5}" y="{top + 4}" font-size="11" text-anchor="end">{peak}</text>',
        f'<text x="{left - 5}" y="{height - bottom}" font-size="11" text-anchor="end">0</text>',
    ]
    label_every = max(1, len(buckets) // 8)
    for i, b in enumerate(buckets):
        x = left + i * slot + (slot - bar_w) / 2
        y = float(height - bottom)
        for reason in report.denial_reasons:
            n = b.counts.get(reason, 0)
            if not n:
                continue
            h = plot_h * n / peak
            y -= h
            out.append(
                f'<rect class="denial" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}"'
                f' height="{h:.1f}" fill="{colors[reason]}">'
                f"<title>{html.escape(b.start)} {html.escape(reason)}: {n}</title></rect>"
            )
        if i % label_every == 0:
            label = b.start[11:16] if report.denial_bucket == "hour" else b.start[:10]
            out.append(
                f'<text x="{x:.1f}" y="{height - bottom + 14}" font-size="10">{label}</text>'
            )
    for i, (reason, color) in enumerate(colors.items()):
        x, y = left + (i % 4) * 210, height + 4 + 20 * (i // 4)
        out.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{x + 16}" y="{y}" font-size="12">{html.escape(reason)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _chain_row(c: Credential) -> list[str]:
    return [
        c.task or "(no task)",
        c.grant,
        c.target,
        c.credential_ref,
        c.ref_kind,
        c.issued_at,
        c.state + (f" ({c.revoked_reason})" if c.revoked_reason else ""),
        c.ended_at or "-",
        _fmt_seconds(c.lifetime_seconds),
        c.request_id,
    ]


_CHAIN_HEADERS = (
    "task",
    "grant",
    "role ARN / Vault policies",
    "key id / accessor (as the ledger holds it)",
    "kind",
    "issued",
    "state",
    "ended",
    "lifetime",
    "request id",
)


def _trust_html(ledger: LedgerTrust) -> str:
    verdict = "VERIFIED" if ledger.ok else f"TAMPERED (first bad seq {ledger.first_bad_seq})"
    color = "#2ca02c" if ledger.ok else "#d62728"
    lines = [
        f'<p id="verdict" style="font-size:1.3em;color:{color}"><b>Ledger {verdict}</b>: '
        f"{ledger.records} records, {ledger.checkpoints_verified} checkpoints verified, "
        f"{ledger.unsigned_tail} records after the newest checkpoint"
        + ("" if ledger.keys_checked else "; signatures NOT checked (no public key given)")
        + "</p>"
    ]
    cp = ledger.checkpoint
    if cp is None:
        lines.append("<p>No checkpoint yet.</p>")
    else:
        sig = cp.signature or "(unsigned)"
        state = "signature verified" if cp.verified else "signature not verified"
        lines.append(
            f"<p>Newest checkpoint: size {cp.size} at {html.escape(cp.time)}, root "
            f"<code>{html.escape(cp.root)}</code>, {state}<br><code id=signature>"
            f"{html.escape(sig)}</code></p>"
        )
    if ledger.findings:
        lines.append("<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in ledger.findings))
        lines.append("</ul>")
    return "\n".join(lines)


def render_html(report: RotationReport) -> str:
    totals = ", ".join(f"{k} {v}" for k, v in report.totals.items())
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # no script, no remote resource: the page renders offline and cannot phone home
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        f"<title>luigi-creds rotation report {html.escape(report.since)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:12px}"
        "code{font-size:11px}</style>",
        "</head><body>",
        "<h1>Credential rotation report</h1>",
        f"<p>{html.escape(report.since)} .. {html.escape(report.until)}: {html.escape(totals)}</p>",
        _trust_html(report.ledger),
        f"<h2>Denials by reason (per {report.denial_bucket})</h2>",
        denials_svg(report),
        "<h2>Longest-lived credentials</h2>",
        _table(_CHAIN_HEADERS, [_chain_row(c) for c in report.longest_lived]),
        "<h2>Grants never used</h2>",
        _table(["grant"], [[g] for g in report.grants_never_used]),
        "<h2>Identities using unusually many grants</h2>",
        _table(
            ["identity", "grants", "count", "threshold"],
            [
                [i.identity, ", ".join(i.grants), str(i.count), f"{i.threshold:g}"]
                for i in report.unusual_identities
            ],
        ),
        "<h2>Every credential: task, grant, target, key, state, lifetime</h2>",
        _table(_CHAIN_HEADERS, [_chain_row(c) for c in report.credentials]),
        "</body></html>",
    ]
    return "\n".join(body) + "\n"


def render(report: RotationReport, fmt: str) -> str:
    if fmt == "json":
        return render_json(report)
    if fmt == "html":
        return render_html(report)
    raise ValueError(f"unknown rotation report format {fmt!r}")


def checkpoint_signature(note: str) -> str:
    """The signature line of a signed note ("— origin base64"), or "" for an unsigned one."""
    return next((line for line in note.splitlines() if line.startswith("\u2014 ")), "")


def ledger_trust(
    verification: VerifyReport, checkpoint: Checkpoint | None, *, keys_checked: bool
) -> LedgerTrust:
    """LedgerTrust from a VerifyReport (broker/audit/verify.py)."""
    return LedgerTrust(
        ok=bool(verification.ok),
        records=int(verification.size),
        first_bad_seq=verification.first_bad_seq,
        checkpoints_verified=int(verification.checkpoints_verified),
        unsigned_tail=int(verification.unsigned_tail),
        keys_checked=keys_checked,
        findings=tuple(
            f"{'FAIL' if f.fatal else 'note'} {f.kind} seq {f.seq}: {f.message}"
            for f in verification.findings
        ),
        checkpoint=checkpoint,
    )
