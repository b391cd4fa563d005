"""CSV cells that a spreadsheet shows as text and never evaluates.

Audit CSVs (export and report) carry values callers chose: task ids, grant names, token subjects
and refs. Auditors open them in Excel, LibreOffice or Google Sheets, where a cell starting with
`=` runs as a formula (`=HYPERLINK(...)` leaks data, DDE runs commands). Pure; no I/O.
"""

from __future__ import annotations

from typing import Any, Final

# A cell starting with one of these is read as a formula by Excel, LibreOffice and Google Sheets
# (OWASP "CSV Injection"): `=`, `+`, `-`, `@`, and tab or carriage return, which some of them
# skip before looking. Line feed is added for the same reason.
_FORMULA_TRIGGERS: Final = ("=", "+", "-", "@", "\t", "\r", "\n")


def spreadsheet_safe(value: Any) -> Any:
    """`value` for a CSV cell: a string that would start a formula gets a leading `'`, which
    spreadsheets show as text and never evaluate (OWASP's recommendation). Numbers pass as
    they are, so a negative count stays a number."""
    if isinstance(value, str) and value.startswith(_FORMULA_TRIGGERS):
        return "'" + value
    return value
