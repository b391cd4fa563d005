"""`audit report`: credential-rotation evidence for an auditor, computed from ledger events.

Owns the figures and their renderings (table, JSON, CSV, HTML with inline SVG charts, no script
and nothing fetched). Pure: takes events and the Config, returns text; talks to no system.

Figures, per grant and identity (`issuer:subject`) over the window:
- credentials issued; lifetime (expires_at - time of the `issued` record) max and median;
- credentials whose lifetime exceeds the grant's configured TTL (Config is the source of truth);
- refresh sessions whose span (first to last record carrying the session_id) exceeds session_max;
- denials by grant and reason; grants in the Config never issued in the window;
- identities using a grant from an unexpected `ref` or `environment` claim. Expected means: the
  grant's `match` pattern for that claim when the grant constrains it (a mismatch there means the
  record disagrees with today's policy); otherwise the value most credentials of that grant were
  issued from (a strict mode), so a one-off ref or environment stands out. No mode, no flag.
"""

from __future__ import annotations

import csv
import html
import io
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from broker.audit.chain import format_time
from broker.audit.events import AuditEvent, Outcome
from broker.audit.spreadsheet import spreadsheet_safe
from broker.config import Config, GrantConfig, MatchValue, RegexPattern
from broker.policy import claim_matcher

WATCHED_CLAIMS = ("ref", "environment")


@dataclass(frozen=True)
class GrantIdentity:
    grant: str
    identity: str
    issued: int
    lifetime_max: int | None  # seconds
    lifetime_median: float | None  # seconds
    outlived_ttl: int


@dataclass(frozen=True)
class Outlived:
    request_id: str
    grant: str
    identity: str
    credential_ref: str
    lifetime: int
    ttl: int


@dataclass(frozen=True)
class LongSession:
    session_id: str
    identity: str
    start: str
    end: str
    seconds: int
    session_max: int


@dataclass(frozen=True)
class Denials:
    grant: str
    reason: str
    count: int


@dataclass(frozen=True)
class UnexpectedUse:
    grant: str
    identity: str
    claim: str
    value: str
    expected: str
    count: int


@dataclass(frozen=True)
class Issuance:
    time: str
    grant: str
    identity: str
    lifetime: int | None


@dataclass(frozen=True)
class Report:
    since: str
    until: str
    per_grant_identity: tuple[GrantIdentity, ...]
    outlived: tuple[Outlived, ...]
    long_sessions: tuple[LongSession, ...]
    denials: tuple[Denials, ...]
    unused_grants: tuple[str, ...]
    unexpected: tuple[UnexpectedUse, ...]
    issuances: tuple[Issuance, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _identity(event: AuditEvent) -> str:
    return f"{event.issuer}:{event.subject}"


def _describe(rule: MatchValue) -> str:
    patterns = rule if isinstance(rule, tuple) else (rule,)
    return " | ".join(p.regex if isinstance(p, RegexPattern) else p for p in patterns)


def build_report(
    events: Iterable[AuditEvent], config: Config, *, since: datetime, until: datetime
) -> Report:
    """Compute the report over events with since <= time < until."""
    grants: dict[str, GrantConfig] = {g.name: g for g in config.grants}
    session_max = config.broker.session_max
    lifetimes: dict[tuple[str, str], list[int]] = defaultdict(list)
    issued_count: Counter[tuple[str, str]] = Counter()
    outlived: list[Outlived] = []
    sessions: dict[str, list[AuditEvent]] = defaultdict(list)
    denials: Counter[tuple[str, str]] = Counter()
    claim_uses: dict[tuple[str, str], Counter[tuple[str, str]]] = defaultdict(Counter)
    issuances: list[Issuance] = []

    for event in events:
        if not since <= event.time < until:
            continue
        if event.session_id:
            sessions[event.session_id].append(event)
        if event.outcome == Outcome.DENIED:
            denials[(event.grant, event.reason or "unspecified")] += 1
        if event.outcome == Outcome.TALLIED:
            # Refusals of requests that never authenticated, counted per window: they name no
            # grant anyone proved a claim on, so they are listed under "-".
            for entry in event.detail.get("counts", ()):
                if entry.get("outcome") == Outcome.DENIED:
                    denials[("", str(entry.get("reason") or "unspecified"))] += int(entry["count"])
        if event.outcome != Outcome.ISSUED:
            continue
        key = (event.grant, _identity(event))
        issued_count[key] += 1
        lifetime = None
        if event.expires_at is not None:
            lifetime = int((event.expires_at - event.time).total_seconds())
            lifetimes[key].append(lifetime)
            grant = grants.get(event.grant)
            if grant is not None and lifetime > grant.ttl:
                outlived.append(
                    Outlived(
                        event.request_id,
                        event.grant,
                        key[1],
                        event.credential_ref,
                        lifetime,
                        grant.ttl,
                    )
                )
        issuances.append(Issuance(format_time(event.time), event.grant, key[1], lifetime))
        for claim in WATCHED_CLAIMS:
            value = event.claims.get(claim)
            if isinstance(value, str):
                claim_uses[(event.grant, claim)][(key[1], value)] += 1

    rows = tuple(
        GrantIdentity(
            grant=grant,
            identity=identity,
            issued=issued_count[(grant, identity)],
            lifetime_max=max(lifetimes[(grant, identity)], default=None),
            lifetime_median=(
                statistics.median(lifetimes[(grant, identity)])
                if lifetimes[(grant, identity)]
                else None
            ),
            outlived_ttl=sum(1 for o in outlived if (o.grant, o.identity) == (grant, identity)),
        )
        for grant, identity in sorted(issued_count)
    )

    long_sessions = []
    for session_id, evs in sorted(sessions.items()):
        start = min(e.time for e in evs)
        end = max(e.time for e in evs)
        span = int((end - start).total_seconds())
        if span > session_max:
            long_sessions.append(
                LongSession(
                    session_id,
                    _identity(evs[0]),
                    format_time(start),
                    format_time(end),
                    span,
                    session_max,
                )
            )

    unexpected = []
    for (grant_name, claim), uses in sorted(claim_uses.items()):
        grant = grants.get(grant_name)
        rule = grant.match.get(claim) if grant is not None else None
        per_value: Counter[str] = Counter()
        for (_, value), n in uses.items():
            per_value[value] += n
        if rule is not None:
            expected = _describe(rule)
            matches = claim_matcher(claim, rule)
            allowed = {v for v in per_value if matches(v)}
        else:
            ranked = per_value.most_common(2)
            if len(ranked) < 2 or ranked[0][1] == ranked[1][1]:
                continue  # one value, or no single usual one: nothing stands out
            expected = ranked[0][0]
            allowed = {expected}
        for (identity, value), n in sorted(uses.items()):
            if value not in allowed:
                unexpected.append(UnexpectedUse(grant_name, identity, claim, value, expected, n))

    used = {grant for grant, _ in issued_count}
    return Report(
        since=format_time(since),
        until=format_time(until),
        per_grant_identity=rows,
        outlived=tuple(outlived),
        long_sessions=tuple(long_sessions),
        denials=tuple(Denials(g, r, n) for (g, r), n in sorted(denials.items())),
        unused_grants=tuple(sorted(g for g in grants if g not in used)),
        unexpected=tuple(unexpected),
        issuances=tuple(issuances),
    )


# ---------------------------------------------------------------------------------------------
# Renderings


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    seconds = int(value)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _sections(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    return [
        (
            "Credentials issued per grant and identity",
            ["grant", "identity", "issued", "lifetime max", "lifetime median", "outlived TTL"],
            [
                [
                    r.grant,
                    r.identity,
                    str(r.issued),
                    _fmt_seconds(r.lifetime_max),
                    _fmt_seconds(r.lifetime_median),
                    str(r.outlived_ttl),
                ]
                for r in report.per_grant_identity
            ],
        ),
        (
            "Credentials that outlived the grant TTL",
            ["request", "grant", "identity", "credential", "lifetime", "ttl"],
            [
                [
                    o.request_id,
                    o.grant,
                    o.identity,
                    o.credential_ref,
                    _fmt_seconds(o.lifetime),
                    _fmt_seconds(o.ttl),
                ]
                for o in report.outlived
            ],
        ),
        (
            "Sessions longer than session_max",
            ["session", "identity", "start", "end", "length", "session_max"],
            [
                [
                    s.session_id,
                    s.identity,
                    s.start,
                    s.end,
                    _fmt_seconds(s.seconds),
                    _fmt_seconds(s.session_max),
                ]
                for s in report.long_sessions
            ],
        ),
        (
            "Denials by reason",
            ["grant", "reason", "count"],
            [[d.grant or "-", d.reason, str(d.count)] for d in report.denials],
        ),
        ("Grants never used", ["grant"], [[g] for g in report.unused_grants]),
        (
            "Grants used from an unexpected ref or environment",
            ["grant", "identity", "claim", "value", "expected", "count"],
            [
                [u.grant, u.identity, u.claim, u.value, u.expected, str(u.count)]
                for u in report.unexpected
            ],
        ),
    ]


def render_table(report: Report) -> str:
    parts = [f"Audit report {report.since} .. {report.until}"]
    for title, headers, rows in _sections(report):
        parts.append(f"\n{title}\n" + (_table(headers, rows) if rows else "(none)"))
    return "\n".join(parts) + "\n"


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n"


def render_csv(report: Report) -> str:
    """One CSV: each row starts with its section title; a section's first row names its columns.

    Cells are spreadsheet-safe: subjects, refs and grant names come from tokens and requests,
    so one starting with `=` must not run as a formula where the auditor opens the file."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["section", "c1", "c2", "c3", "c4", "c5", "c6"])
    for title, headers, rows in _sections(report):
        writer.writerow([title, *headers])
        for row in rows:
            writer.writerow([spreadsheet_safe(cell) for cell in (title, *row)])
    return buf.getvalue()


_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


def _timeline_svg(report: Report) -> str:
    grants = sorted({i.grant for i in report.issuances})
    width, lane, left = 900, 28, 160
    height = 40 + lane * max(len(grants), 1)
    start = datetime.fromisoformat(report.since.replace("Z", "+00:00"))
    end = datetime.fromisoformat(report.until.replace("Z", "+00:00"))
    span = max((end - start).total_seconds(), 1.0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline" width="{width}" height="{height}"'
        ' role="img" aria-label="Issuance timeline">',
        f'<line x1="{left}" y1="{height - 20}" x2="{width - 10}" y2="{height - 20}"'
        ' stroke="#888"/>',
        f'<text x="{left}" y="{height - 5}" font-size="11">{html.escape(report.since)}</text>',
        f'<text x="{width - 10}" y="{height - 5}" font-size="11" text-anchor="end">'
        f"{html.escape(report.until)}</text>",
    ]
    days = int(span // 86400)
    for d in range(1, days + 1) if days <= 62 else ():  # day ticks, up to two months
        x = left + (width - 10 - left) * d * 86400 / span
        out.append(f'<line x1="{x:.1f}" y1="8" x2="{x:.1f}" y2="{height - 20}" stroke="#eee"/>')
    for n, grant in enumerate(grants):
        y = 20 + n * lane
        out.append(f'<text x="5" y="{y + 4}" font-size="12">{html.escape(grant)}</text>')
        color = _PALETTE[n % len(_PALETTE)]
        for issuance in report.issuances:
            if issuance.grant != grant:
                continue
            when = datetime.fromisoformat(issuance.time.replace("Z", "+00:00"))
            x = left + (width - 10 - left) * (when - start).total_seconds() / span
            out.append(
                f'<circle class="issuance" cx="{x:.1f}" cy="{y}" r="4" fill="{color}">'
                f"<title>{html.escape(issuance.time)} {html.escape(issuance.identity)}</title>"
                "</circle>"
            )
    out.append("</svg>")
    return "\n".join(out)


def _lifetime_svg(report: Report, ttls: dict[str, int]) -> str:
    by_grant: dict[str, list[int]] = defaultdict(list)
    for issuance in report.issuances:
        if issuance.lifetime is not None:
            by_grant[issuance.grant].append(issuance.lifetime)
    grants = sorted(by_grant)
    width, bar, left = 900, 34, 160
    height = 30 + bar * max(len(grants), 1)
    top = max([*(max(v) for v in by_grant.values()), *(ttls.get(g, 0) for g in grants), 1])
    scale = (width - left - 140) / top  # room for the labels right of the bars
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="lifetimes" width="{width}" height="{height}"'
        ' role="img" aria-label="Credential lifetimes per grant">'
    ]
    for n, grant in enumerate(grants):
        y = 10 + n * bar
        longest = max(by_grant[grant])
        median = statistics.median(by_grant[grant])
        out += [
            f'<text x="5" y="{y + 16}" font-size="12">{html.escape(grant)}</text>',
            f'<rect class="lifetime-max" x="{left}" y="{y}" width="{longest * scale:.1f}"'
            f' height="11" fill="#9ecae1"><title>max {_fmt_seconds(longest)}</title></rect>',
            f'<rect class="lifetime-median" x="{left}" y="{y + 12}" width="{median * scale:.1f}"'
            f' height="11" fill="#3182bd"><title>median {_fmt_seconds(median)}</title></rect>',
            f'<text x="{left + longest * scale + 4:.1f}" y="{y + 10}" font-size="10">'
            f"max {_fmt_seconds(longest)}</text>",
            f'<text x="{left + median * scale + 4:.1f}" y="{y + 22}" font-size="10">'
            f"median {_fmt_seconds(median)}</text>",
        ]
        if grant in ttls:
            x = left + ttls[grant] * scale
            out.append(
                f'<line class="ttl" x1="{x:.1f}" y1="{y - 2}" x2="{x:.1f}" y2="{y + 25}"'
                ' stroke="#d62728" stroke-width="2"><title>grant TTL</title></line>'
            )
    out.append("</svg>")
    return "\n".join(out)


def render_html(report: Report, config: Config) -> str:
    ttls = {g.name: g.ttl for g in config.grants}
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # no script, no remote resource: the page renders offline and cannot phone home
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        f"<title>luigi-creds audit report {html.escape(report.since)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style>",
        "</head><body>",
        f"<h1>Audit report</h1><p>{html.escape(report.since)} .. {html.escape(report.until)}</p>",
        "<h2>Issuance timeline</h2>",
        _timeline_svg(report),
        "<h2>Credential lifetimes (max, median; red line: grant TTL)</h2>",
        _lifetime_svg(report, ttls),
    ]
    for title, headers, rows in _sections(report):
        body.append(f"<h2>{html.escape(title)}</h2>")
        if not rows:
            body.append("<p>(none)</p>")
            continue
        body.append(
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
        )
        for row in rows:
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        body.append("</table>")
    body.append("</body></html>")
    return "\n".join(body) + "\n"


def render(report: Report, config: Config, fmt: str) -> str:
    if fmt == "table":
        return render_table(report)
    if fmt == "json":
        return render_json(report)
    if fmt == "csv":
        return render_csv(report)
    if fmt == "html":
        return render_html(report, config)
    raise ValueError(f"unknown report format {fmt!r}")
