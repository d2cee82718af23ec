"""Moving subscribers in and out of a list: CSV import, CSV and JSON-lines export.

Used by the admin API and the CLI alike. Neither direction holds the data in memory.

Import reads the file twice, line by line. The first pass checks what makes the whole file
unusable (not UTF-8, malformed CSV, a bad header, no row under the header), so that such
a file writes nothing. The second validates each row and writes valid rows in batches of
`BATCH_SIZE`, each batch in a transaction of its own taken from the caller's
`transaction()` factory (the boundary still owns the commit): a big file neither holds
SQLite's write lock for its whole length nor rolls back every row for one failure. Rows
are independent, so committing batch by batch is safe, and running the same file twice adds
nothing: an address already on the list is `unchanged`, whatever its state (an import
never undoes an unsubscription). An import cut short (a database outage) keeps its
committed batches; running the file again completes it.

Columns: email (required; `Name <address>` gives the name too), name (kept as the
attribute `name`), locale (fr, en, or a tag of either such as fr-FR; else the list's),
attributes (a JSON object of strings, the API's limits), consent_source,
consent_date (ISO date or date-time, neither in the future nor before 1990: an earlier one
is a spreadsheet's empty date or a typo) and consent_version (the wording the person
agreed to, when not the list's current one: confirmed rows only). Comma, semicolon or tab
separated (as the header shows, or a first line `sep=;` as Excel writes it), UTF-8 with or
without a BOM; empty columns after the header's last name are left out. An export's cell
that a spreadsheet would run as a formula (`=...`, `+...`, `-...`) is written after a `'`;
a cell so written is read back without it. The CSV export imports as it is, into another
list or another instance of the service: its confirmed rows, with the event that confirmed
each one as its evidence (`EXPORT_COLUMNS`); a row of another status is refused.

    mode=confirmed  consent_source + consent_date required per row; the subscription is
                    created confirmed, with an "imported" ledger event (source "import")
                    holding that evidence, and a sync job for the backend. Both carry the
                    row's consent_version, else the list's current one.
    mode=invite     the normal double opt-in (`subscriptions.subscribe`, source "operator"):
                    a confirmation mail, nothing confirmed until the person clicks.

An erased address (a tombstone in `erased_address`) is refused in both modes: only the
person's own fresh opt-in brings it back. So is an address on the block-list (or in a
blocked domain): a row error, the rest of the file goes on.

Export pages through the list in id order (keyset, `PAGE_SIZE` rows a page, one extra
query per page for the consent events), so memory stays flat on any size of list.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import IO, Any

import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col, func, select

from app import (
    addresses,
    admin,
    backends,
    blocklist,
    db,
    errors,
    lists,
    outbox,
    privacy,
    schemas,
    subscriptions,
)
from app.config import BackendSettings, Locale
from app.models import (
    ConsentAction,
    ConsentEvent,
    Subscription,
    SubscriptionStatus,
    as_utc,
)

# A context manager yielding a session in a transaction of its own, committed on exit.
Transaction = Callable[[], AbstractContextManager[Session]]

BATCH_SIZE = 1000
PAGE_SIZE = 1000
MAX_ERRORS = 100
# A physical line longer than this is refused (it bounds the memory a line can take).
MAX_LINE_BYTES = 64 * 1024
MAX_CONSENT_SOURCE = 200
MAX_NOTE = 500
# As the admin API's `evidence.consent_version`.
MAX_CONSENT_VERSION = 64
# Clock skew allowed on a consent date-time; a bare date may be "today" anywhere on Earth.
FUTURE_SKEW = timedelta(minutes=5)
EARLIEST_ZONE = timedelta(hours=14)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

COLUMNS = (
    "email",
    "name",
    "locale",
    "attributes",
    "consent_source",
    "consent_date",
    "consent_version",
)
DELIMITERS = (",", ";", "\t")
# The first two columns of a rejects file (`import_csv`'s `rejects`), before each refused row
# as the file had it: an import of the file, once its rows are fixed, leaves them out.
REJECTS_COLUMNS = ("refused_line", "refused_reason")
_COLUMNS_HELP = (
    "The columns are: email (required), name, locale, attributes, consent_source, "
    "consent_date, consent_version (and those of an export, which it imports)."
)


class ImportMode(StrEnum):
    INVITE = "invite"
    CONFIRMED = "confirmed"


class ExportFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


MEDIA_TYPES = {
    ExportFormat.CSV: "text/csv; charset=utf-8",
    ExportFormat.JSONL: "application/x-ndjson",
}


# Import ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowError:
    line: int
    # Masked (`c***@example.org`): the line number finds the row, and reports get pasted.
    email: str
    error: str


@dataclass
class ImportReport:
    list_slug: str
    mode: ImportMode
    dry_run: bool
    read: int = 0
    created: int = 0
    unchanged: int = 0
    invalid: int = 0
    # The first MAX_ERRORS by line; `invalid` counts them all.
    errors: list[RowError] = field(default_factory=list)
    # The last line of the last batch committed. A run cut short (Ctrl-C, the database
    # gone) has written no row after it, and the counts above are those of the rows up to
    # it (a batch that failed is taken out of them, as its transaction rolled back).
    applied_through: int = 0

    def counts(self) -> dict[str, Any]:
        """What the audit log keeps: counts, no address."""
        return {
            "mode": self.mode.value,
            "dry_run": self.dry_run,
            "read": self.read,
            "created": self.created,
            "unchanged": self.unchanged,
            "invalid": self.invalid,
        }


@dataclass(frozen=True, slots=True)
class _Refused:
    line: int
    email: str
    error: str
    # The row as the file had it, for the rejects file.
    cells: list[str]


@dataclass(frozen=True, slots=True)
class ImportRow:
    line: int
    address: addresses.Address
    locale: Locale | None
    attributes: dict[str, str]
    consent_source: str | None
    # ISO 8601: a date, or a date-time in UTC.
    consent_date: str | None
    # The wording the person agreed to elsewhere; None: the list's current one.
    consent_version: str | None = None
    # The row as the file had it: a row refused when its batch is written goes to the
    # rejects file as any other.
    cells: list[str] = field(default_factory=list)


class _RowInvalid(ValueError):
    def __init__(self, message: str, *, email: str = "") -> None:
        super().__init__(message)
        # The row's address as typed, for the report (masked there).
        self.email = email


def _masked(email: str) -> str:
    # A control character shows as `?`: the report is printed, and a terminal would run
    # the file's escape sequences (clear the screen, retitle the window...).
    named = _NAMED_ADDRESS.fullmatch(email.strip())
    if named is not None:
        email = named["address"]
    email = _CONTROL.sub("?", email.strip()[: addresses.MAX_ADDRESS_LENGTH])
    if "@" not in email:
        return f"{email[:1]}***" if email else ""
    return addresses.mask(email)


# A carriage return inside the header line: the lines end with it alone, which the reader
# (like Python's) does not take for a line end.
_CR_ONLY = (
    "The lines end with a carriage return alone (as classic Mac OS wrote them): save the "
    'file again with Windows or Unix line ends ("CSV UTF-8" in a spreadsheet).'
)


# The spreadsheet itself rather than a CSV saved from it: .xlsx and .ods are ZIP files,
# .xls an OLE2 compound file. Their bytes read as "not UTF-8", a wrong lead.
_WORKBOOK_SIGNATURES = (b"PK\x03\x04", bytes.fromhex("D0CF11E0A1B11AE1"))
_WORKBOOK = (
    "The file is a spreadsheet workbook (.xlsx, .ods or .xls), not CSV: save it as "
    '"CSV UTF-8" from the spreadsheet and import that file.'
)


def _lines(source: IO[bytes]) -> Iterator[str]:
    """The file's physical lines, decoded; a precise error at the first line not UTF-8."""
    number = 0
    while True:
        raw = source.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if number == 1 and raw.startswith(_WORKBOOK_SIGNATURES):
            raise errors.InvalidCsv(_WORKBOOK)
        # Before the line ends: UTF-16's end of line is \r\0\n, which looks like a lone \r.
        if number == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise errors.InvalidCsv(f"The file is UTF-16, not UTF-8: {_SAVE_AS_UTF8}")
        if number == 1 and b"\r" in raw.rstrip(b"\r\n"):
            raise errors.InvalidCsv(_CR_ONLY)
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise errors.InvalidCsv(f"Line {number} is longer than {MAX_LINE_BYTES} bytes.")
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.InvalidCsv(_encoding_error(number, raw, e)) from e


_SAVE_AS_UTF8 = 'save the file as UTF-8 ("CSV UTF-8" in a spreadsheet).'


def _encoding_error(number: int, raw: bytes, error: UnicodeDecodeError) -> str:
    return (
        f"Line {number} is not UTF-8 (byte 0x{raw[error.start]:02x} at position "
        f"{error.start + 1}; Latin-1 or Windows-1252?): {_SAVE_AS_UTF8}"
    )


def _delimiter(header: str) -> str:
    """Comma, or the semicolon (or tab) a French spreadsheet writes: whichever splits the
    header; a header's names never contain any of them."""
    counts = {candidate: header.count(candidate) for candidate in DELIMITERS}
    best = max(DELIMITERS, key=lambda candidate: counts[candidate])
    return best if counts[best] else ","


def _columns(header: list[str]) -> list[str]:
    names = [name.strip().lower() for name in header]
    # Empty cells after the last name: a spreadsheet writes them for columns once used or
    # formatted (`email;name;;`), and on every line after it.
    while names and not names[-1]:
        names.pop()
    for position, name in enumerate(names, 1):
        if not name:
            raise errors.InvalidCsv(f"Column {position} of the header has no name. {_COLUMNS_HELP}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise errors.InvalidCsv(f"The header repeats {', '.join(repeated)}.")
    unknown = [name for name in names if name not in COLUMNS + EXPORT_COLUMNS + REJECTS_COLUMNS]
    for signature, where in _FOREIGN_EXPORTS:
        if signature <= set(names):
            # Renaming its columns would import every row as consenting, those who left
            # included: the backend's own members are taken over with their state.
            raise errors.InvalidCsv(
                f"The header is that of {where}, whose rows carry each member's state at "
                "that backend (those who left included): take the list's members over with "
                "`newsletter import-backend --list <slug>` once the list names that backend, "
                "which keeps each one subscribed or not. To import the file as it is, keep "
                "only the subscribed members' rows under the columns below. " + _COLUMNS_HELP
            )
    if "email" not in names and any("@" in name for name in unknown):
        # A bare list of addresses, one a line: its first address read as a column's name.
        raise errors.InvalidCsv(
            "The first line holds an address, not the columns' names: put a header line "
            f"first (email, alone for a list of addresses). {_COLUMNS_HELP}"
        )
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:10])
        raise errors.InvalidCsv(f"Unknown column(s) in the header: {shown}. {_COLUMNS_HELP}")
    if "email" not in names:
        raise errors.InvalidCsv(f"The header has no email column. {_COLUMNS_HELP}")
    return names


# Headers of member lists other tools write, which are not this import's: Mailgun's
# (`address`, with `subscribed`), listmonk's subscriber export (`uuid`, its `status` being
# the subscriber's, enabled or blocklisted, not a subscription's).
_FOREIGN_EXPORTS = (
    ({"address", "subscribed"}, "a Mailgun member list (address, subscribed)"),
    ({"uuid", "email", "status"}, "a listmonk subscriber export (uuid, email, status)"),
)


# The line Excel writes first when asked to, naming the separator of the lines that follow.
_EXCEL_SEPARATOR = re.compile(r"sep=([,;\t])\r?\n?")


def _records(source: IO[bytes]) -> tuple[list[str], str, Iterator[tuple[int, list[str]]]]:
    """The header's column names, the separator, and the records with the line each starts
    on."""
    lines = _lines(source)
    first = next(lines, None)
    # Lines before the header that the reader does not see (Excel's `sep=;`).
    skipped = 0
    hinted = _EXCEL_SEPARATOR.fullmatch(first) if first is not None else None
    if hinted:
        first, skipped = next(lines, None), 1
    if first is None or not first.strip():
        raise errors.InvalidCsv(
            f"The file is empty or its first line is blank: the first line must name the "
            f"columns. {_COLUMNS_HELP}"
        )
    if first.lstrip().startswith("{"):
        raise errors.InvalidCsv(
            "The file holds JSON lines (an export with format jsonl?), not CSV: the import "
            "reads CSV, whose first line names the columns (export with format csv)."
        )
    delimiter = hinted.group(1) if hinted else _delimiter(first)
    reader = csv.reader(itertools.chain([first], lines), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as e:
        raise errors.InvalidCsv(f"Line {1 + skipped} is not valid CSV ({e}).") from e
    columns = _columns(header)

    def records() -> Iterator[tuple[int, list[str]]]:
        last = reader.line_num + skipped
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise errors.InvalidCsv(f"Line {last + 1} is not valid CSV ({e}).") from e
            start, last = last + 1, reader.line_num + skipped
            if any(value.strip() for value in fields):
                yield start, fields

    return columns, delimiter, records()


def check_file(source: IO[bytes], *, progress: Callable[[int], None] | None = None) -> int:
    """Read the whole file once for what would make it unusable; the number of records.
    EmptyCsv for a header with no record under it (blank lines and rows of empty cells
    are no records). `progress` gets the bytes read so far every BATCH_SIZE records, and
    at the end."""
    columns, _, records = _records(source)
    count = 0
    for count, _ in enumerate(records, 1):
        if progress is not None and count % BATCH_SIZE == 0:
            progress(source.tell())
    if progress is not None:
        progress(source.tell())
    if count == 0:
        raise errors.EmptyCsv(
            f"The file holds no rows: its header ({', '.join(columns)}) is followed by no "
            "subscriber, so nothing was imported. Is it the right file?"
        )
    return count


def _text(value: str, *, name: str, limit: int) -> str | None:
    value = value.strip()
    if not value:
        return None
    if len(value) > limit:
        raise _RowInvalid(f"{name} is longer than {limit} characters.")
    if "\n" in value or "\r" in value:
        raise _RowInvalid(
            f"{name} is written on several lines (a line break inside the cell): put it on "
            "one line."
        )
    if _CONTROL.search(value):
        raise _RowInvalid(f"{name} contains control characters.")
    return value


def _consent_date(value: str, *, now: datetime) -> str | None:
    """The date as ISO text: a bare date stays a date, a date-time becomes UTC."""
    value = value.strip()
    if not value:
        return None
    try:
        parsed = date.fromisoformat(value) if len(value) == 10 else datetime.fromisoformat(value)
    except ValueError as e:
        raise _RowInvalid(
            f"consent_date {value[:40]!r} is not an ISO date (2025-03-12) or date-time "
            "(2025-03-12T09:30:00+01:00)."
        ) from e
    if isinstance(parsed, datetime):
        try:
            parsed = as_utc(parsed)
        except OverflowError as e:
            raise _RowInvalid(f"consent_date {value[:40]!r} is out of range once in UTC.") from e
        future = parsed > now + FUTURE_SKEW
    else:
        # A bare date may already be "today" somewhere east of UTC.
        future = parsed > (now + EARLIEST_ZONE).date()
    if future:
        raise _RowInvalid(f"consent_date {value} is in the future.")
    early = schemas.too_early_for_consent(parsed.date() if isinstance(parsed, datetime) else parsed)
    if early is not None:
        raise _RowInvalid(f"consent_date {early}.")
    return parsed.isoformat()


def _attributes(value: str, name: str | None) -> dict[str, str]:
    parsed: Any = {}
    if value.strip():
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise _RowInvalid('attributes is not valid JSON (expected {"org": "DINUM"}).') from e
        if not isinstance(parsed, dict):
            raise _RowInvalid('attributes must be a JSON object such as {"org": "DINUM"}.')
    if name is not None:
        if parsed.get("name", name) != name:
            raise _RowInvalid("name is given twice, differently (column and attributes).")
        parsed["name"] = name
    try:
        return schemas.clean_attributes(parsed)
    except ValueError as e:
        raise _RowInvalid(f"attributes: {e}.") from e


def _cell(values: dict[str, str], name: str) -> str:
    """A text cell, without the `'` our export writes before one a spreadsheet would run
    (`_csv_value`)."""
    text = values.get(name, "").strip()
    return text[1:] if _is_quoted_formula(text) else text


def _exported_evidence(values: dict[str, str]) -> tuple[str, str]:
    """consent_source and consent_date of a row of this service's export: the evidence
    its import recorded, else the event that confirmed it (a click on the link, ...)."""
    source, when = _cell(values, "consent_source"), values.get("consent_date", "")
    event, event_at = values.get("consent_event", "").strip(), values.get("consent_event_at", "")
    if event and not source:
        via = values.get("consent_event_source", "").strip()
        source = f"export: {event} ({via})" if via else f"export: {event}"
    return source, when if when.strip() else event_at


# `Camille Dupont <camille@example.org>` (or the name in double quotes): a mail program's
# address book, a list of members pasted into a spreadsheet, Mailman's mass subscription.
# Matched on the stripped cell, with no two parts that could both take a space: a cell of
# 64 KiB of spaces is read in linear time, not quadratic.
_NAMED_ADDRESS = re.compile(r'(?:"(?P<quoted>[^"]*)"\s*|(?P<name>[^"<>]*))<(?P<address>[^<>]*)>')


def _row(
    values: dict[str, str], *, line: int, mode: ImportMode, now: datetime, cells: list[str]
) -> ImportRow:
    raw_email = _cell(values, "email")
    if not raw_email:
        raise _RowInvalid("email is empty.")
    display_name = None
    named = _NAMED_ADDRESS.fullmatch(raw_email)
    if named is not None:
        raw_email = named["address"].strip()
        display_name = (named["quoted"] or named["name"] or "").strip() or None
        if not raw_email:
            raise _RowInvalid("email is empty between its angle brackets.")
    try:
        address = addresses.parse(raw_email, new=True)
    except addresses.InvalidAddress as e:
        raise _RowInvalid(f"email is not a valid address: {e}") from e
    locale_text = values.get("locale", "").strip().lower()
    try:
        # A tag with a region (`fr-FR`, `fr_CA`), as other tools write it, as the sign-up
        # takes it.
        locale = Locale(str(schemas.language_of(locale_text))) if locale_text else None
    except ValueError as e:
        known = ", ".join(item.value for item in Locale)
        raise _RowInvalid(f"locale {locale_text[:20]!r} is not one of {known}.") from e
    status = values.get("status", "").strip().lower()
    if status and status != SubscriptionStatus.CONFIRMED:
        raise _RowInvalid(
            f"status is {status[:20]!r}: only confirmed subscribers are imported (export "
            "with status=confirmed to leave the others out)."
        )
    name = _text(_cell(values, "name"), name="name", limit=schemas.MAX_ATTRIBUTE_LENGTH)
    if display_name is not None:
        from_email = _text(display_name, name="name", limit=schemas.MAX_ATTRIBUTE_LENGTH)
        if name is not None and name != from_email:
            raise _RowInvalid("name is given twice, differently (column and email cell).")
        name = from_email
    attributes = _attributes(values.get("attributes", ""), name)
    source_text, date_text = _exported_evidence(values)
    consent_source = _text(source_text, name="consent_source", limit=MAX_CONSENT_SOURCE)
    consent_date = _consent_date(date_text, now=now)
    if mode == ImportMode.CONFIRMED:
        if consent_source is None:
            raise _RowInvalid(
                "consent_source is empty: a row without proof of consent can only be invited "
                "(mode=invite)."
            )
        if consent_date is None:
            raise _RowInvalid("consent_date is empty: mode=confirmed needs the date of consent.")
    consent_version = _text(
        _cell(values, "consent_version"), name="consent_version", limit=MAX_CONSENT_VERSION
    )
    if consent_version is not None and mode == ImportMode.INVITE:
        raise _RowInvalid(
            "consent_version is for consent given elsewhere (mode=confirmed): an invitation "
            "asks for consent to the list's current wording."
        )
    return ImportRow(
        line=line,
        address=address,
        locale=locale,
        attributes=attributes,
        consent_source=consent_source,
        consent_date=consent_date,
        consent_version=consent_version,
        cells=cells,
    )


@dataclass(frozen=True, slots=True)
class _ListInfo:
    id: int
    slug: str
    default_locale: str
    consent_version: str


def _list_info(session: Session, *, slug: str) -> _ListInfo:
    row = lists.get(session, slug=slug)
    assert row.id is not None
    return _ListInfo(
        id=row.id,
        slug=row.slug,
        default_locale=row.default_locale,
        consent_version=row.consent_version,
    )


def import_csv(
    transaction: Transaction,
    *,
    source: IO[bytes],
    list_slug: str,
    mode: ImportMode,
    dry_run: bool,
    operator: str,
    note: str | None,
    key: bytes,
    resend_interval: timedelta,
    now: datetime,
    progress: Callable[[int], None] | None = None,
    batch_size: int = BATCH_SIZE,
    backend: BackendSettings | None = None,
    report: ImportReport | None = None,
    rejects: IO[str] | None = None,
    checking: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import a CSV file (a seekable binary stream) into a list; see the module docstring.

    Raises ListNotFound, or InvalidCsv for a file that cannot be read at all (EmptyCsv for
    one with no row), before anything is written. `checking` gets the bytes read so far by
    that first pass (`check_file`), `progress` those of the second, after each batch. A dry
    run reads the database to count what would happen, and writes
    nothing. An address the list's `backend` cannot hold is a row error.

    `report`, when given, is filled as the import goes: a caller whose run is cut short
    still holds what was committed (its `applied_through`), to tell the operator.

    `rejects`, when given, gets every refused row, in line order, as CSV in the file's
    separator: refused_line, refused_reason, then the row's cells as the file had them
    (under the file's header), so that the operator can fix the rows and import that file.
    The cells are written as they were, those a spreadsheet would run included (an
    export's get a `'`): the file holds nothing that the operator's did not, and imports
    back exact. Rows are written once the batch that holds them is settled: a run cut
    short has written those up to its `applied_through`.
    """
    if note is not None and len(note) > MAX_NOTE:
        raise errors.BadRequest(f"The note is longer than {MAX_NOTE} characters.")
    with transaction() as session:
        mailing_list = _list_info(session, slug=list_slug)
    source.seek(0)
    check_file(source, progress=checking)
    source.seek(0)
    columns, delimiter, records = _records(source)
    if report is None:
        report = ImportReport(list_slug=list_slug, mode=mode, dry_run=dry_run)
    write_rejected = _rejects_writer(rejects, columns=columns, delimiter=delimiter)
    # The first line of each address seen: a second row for it is reported, not applied.
    # The one structure that grows with the file (about 100 bytes an address).
    first_line: dict[str, int] = {}
    # The rows read since the last batch was settled: those to write, and those refused
    # (some only when their batch is written: an erased address, a blocked one). Settled
    # together once they are `batch_size`, whatever the share of each, so that memory stays
    # bounded by a file of refused rows too, and each settles in line order.
    batch: list[ImportRow] = []
    refused: list[_Refused] = []

    def settle(last_line: int) -> None:
        assert report is not None
        if batch:
            before = (report.created, report.unchanged)
            try:
                with transaction() as session:
                    _apply(
                        session,
                        rows=batch,
                        mailing_list=mailing_list,
                        mode=mode,
                        write=not dry_run,
                        report=report,
                        refused=refused,
                        operator=operator,
                        note=note,
                        key=key,
                        resend_interval=resend_interval,
                        now=now,
                    )
            except BaseException:
                # Rolled back: the counts stay those of what was committed.
                report.created, report.unchanged = before
                raise
        refused.sort(key=lambda item: item.line)
        for item in refused:
            report.invalid += 1
            if len(report.errors) < MAX_ERRORS:
                report.errors.append(
                    RowError(line=item.line, email=_masked(item.email), error=item.error)
                )
            write_rejected(item)
        report.applied_through = last_line
        batch.clear()
        refused.clear()
        if progress is not None:
            progress(source.tell())

    line = 0
    for line, fields in records:
        report.read += 1
        # Empty cells past the header's last column (a spreadsheet's trailing separators)
        # hold nothing to lose.
        if len(fields) > len(columns) and not any(cell.strip() for cell in fields[len(columns) :]):
            fields = fields[: len(columns)]
        try:
            row = _checked_row(
                fields, columns=columns, line=line, mode=mode, now=now, backend=backend
            )
        except _RowInvalid as e:
            refused.append(_Refused(line, e.email, str(e), fields))
        else:
            seen = first_line.setdefault(row.address.key, line)
            if seen == line:
                batch.append(row)
            else:
                refused.append(
                    _Refused(
                        line,
                        row.address.email,
                        f"The same address as line {seen}; only that line is imported.",
                        fields,
                    )
                )
        if len(batch) + len(refused) >= batch_size:
            settle(line)
    settle(line)
    return report


def _checked_row(
    fields: list[str],
    *,
    columns: list[str],
    line: int,
    mode: ImportMode,
    now: datetime,
    backend: BackendSettings | None,
) -> ImportRow:
    """The row read and checked, or _RowInvalid (its `email` the row's, as typed)."""
    values = dict(zip(columns, fields, strict=False))
    email = values.get("email", "")
    if len(fields) != len(columns):
        raise _RowInvalid(
            f"The row has {len(fields)} fields, the header {len(columns)}.", email=email
        )
    try:
        row = _row(values, line=line, mode=mode, now=now, cells=fields)
    except _RowInvalid as e:
        e.email = email
        raise
    refusal = backends.refusal(backend, row.address.email)
    if refusal is not None:
        raise _RowInvalid(f"email is refused: {refusal}.", email=row.address.email)
    return row


def _rejects_writer(
    rejects: IO[str] | None, *, columns: list[str], delimiter: str
) -> Callable[[_Refused], None]:
    """What writes a refused row into `rejects` (see `import_csv`), its header written."""
    if rejects is None:
        return lambda item: None
    # A rejects file imported again: its own refused_line and refused_reason are replaced.
    kept = [at for at, name in enumerate(columns) if name not in REJECTS_COLUMNS]
    writer = csv.writer(rejects, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow([*REJECTS_COLUMNS, *(columns[at] for at in kept)])

    def write(item: _Refused) -> None:
        cells = [item.cells[at] for at in kept if at < len(item.cells)]
        writer.writerow([item.line, item.error, *cells, *item.cells[len(columns) :]])

    return write


def cut_short(report: ImportReport, *, again: str) -> str:
    """What an import stopped midway (Ctrl-C, the database gone) wrote, and how to finish
    it: `again` names the way to run it again ("run the same command")."""
    if report.dry_run or not report.applied_through:
        return f"The import into {report.list_slug} was interrupted: nothing was written."
    return (
        f"The import into {report.list_slug} was interrupted: the rows up to line "
        f"{report.applied_through} are imported ({report.created} created, "
        f"{report.unchanged} unchanged), the rows after it are not. {again} to finish: "
        "the rows already imported are left as they are."
    )


def _known(session: Session, *, list_id: int, keys: list[str]) -> set[str]:
    if not keys:
        return set()
    return set(
        session.exec(
            select(Subscription.email_key).where(
                Subscription.list_id == list_id, col(Subscription.email_key).in_(keys)
            )
        ).all()
    )


ERASED_ERROR = (
    "This address was erased at its owner's request: it cannot be imported; only the "
    "person's own subscription (double opt-in) can bring it back."
)


BLOCKED_ERROR = "This address (or its domain) is on the block-list: it cannot be imported."


def _apply(
    session: Session,
    *,
    rows: list[ImportRow],
    mailing_list: _ListInfo,
    mode: ImportMode,
    write: bool,
    report: ImportReport,
    refused: list[_Refused],
    operator: str,
    note: str | None,
    key: bytes,
    resend_interval: timedelta,
    now: datetime,
) -> None:
    keys = [row.address.key for row in rows]
    erased = privacy.erased_among(session, keys=keys, key=key)
    blocked = blocklist.blocked_among(session, email_keys=keys)
    writes_confirmed = write and mode == ImportMode.CONFIRMED
    # Which addresses the list already has. A confirmed import lets its INSERT ... ON
    # CONFLICT DO NOTHING tell (through the unique index), and asks only about the rare
    # erased ones: a look-up of a thousand keys at once is planned from the table's
    # statistics, and on PostgreSQL, right after a big import into a fresh list, stale
    # ones made it scan the whole list once a batch (from 10 ms to 0.8 s a batch).
    known = _known(
        session, list_id=mailing_list.id, keys=sorted(erased) if writes_confirmed else keys
    )
    fresh = []
    for row in rows:
        if row.address.key in blocked:
            refused.append(_Refused(row.line, row.address.email, BLOCKED_ERROR, row.cells))
        elif row.address.key in known:
            report.unchanged += 1
        elif row.address.key in erased:
            refused.append(_Refused(row.line, row.address.email, ERASED_ERROR, row.cells))
        else:
            fresh.append(row)
    if not write:
        report.created += len(fresh)
    elif mode == ImportMode.CONFIRMED:
        created = _insert_confirmed(
            session, rows=fresh, mailing_list=mailing_list, operator=operator, note=note, now=now
        )
        report.created += created
        report.unchanged += len(fresh) - created
    else:
        _invite(
            session,
            rows=fresh,
            mailing_list=mailing_list,
            operator=operator,
            note=note,
            key=key,
            resend_interval=resend_interval,
            now=now,
        )
        report.created += len(fresh)


def _invite(
    session: Session,
    *,
    rows: list[ImportRow],
    mailing_list: _ListInfo,
    operator: str,
    note: str | None,
    key: bytes,
    resend_interval: timedelta,
    now: datetime,
) -> None:
    """The normal double opt-in for each row, then the operator and note written into the
    ledger events it recorded (one query for the batch)."""
    for row in rows:
        subscriptions.subscribe(
            session,
            list_slug=mailing_list.slug,
            address=row.address,
            locale=row.locale,
            fallback_locale=None,
            attributes=row.attributes,
            evidence=subscriptions.Evidence(source="operator"),
            key=key,
            now=now,
            resend_interval=resend_interval,
        )
    if not rows:
        return
    ids = select(Subscription.id).where(
        Subscription.list_id == mailing_list.id,
        col(Subscription.email_key).in_([row.address.key for row in rows]),
    )
    for event in session.exec(
        select(ConsentEvent).where(
            col(ConsentEvent.subscription_id).in_(ids),
            ConsentEvent.action == ConsentAction.SUBSCRIBE_REQUESTED,
            ConsentEvent.occurred_at == now,
        )
    ).all():
        event.detail = {**event.detail, "operator": operator, "note": note, "via": "import"}
        session.add(event)
    session.flush()


_CONFIRMED_KEYS = [*subscriptions.NEW_ROW_KEYS, "confirmed_at", "unsubscribed_at"]


# By dialect, made on first use (db.dialect_insert imports only the dialect in use).
_INSERT_CONFIRMED: dict[str, db.Prepared] = {}


def _insert_confirmed_statement(session: Session) -> db.Prepared:
    dialect = session.get_bind().dialect.name
    statement = _INSERT_CONFIRMED.get(dialect)
    if statement is None:
        table = SQLModel.metadata.tables["subscription"]
        statement = _INSERT_CONFIRMED[dialect] = db.Prepared(
            db.dialect_insert(session)(table)
            .on_conflict_do_nothing(index_elements=["list_id", "email_key"])
            .returning(table.c.id, table.c.email_key),
            insert_keys=_CONFIRMED_KEYS,
        )
    return statement


def _insert_confirmed(
    session: Session,
    *,
    rows: list[ImportRow],
    mailing_list: _ListInfo,
    operator: str,
    note: str | None,
    now: datetime,
) -> int:
    """Insert the batch's new subscriptions as confirmed, in a few statements; the count.

    `ON CONFLICT DO NOTHING`: an address added meanwhile by someone else stays as it is.
    """
    if not rows:
        return 0
    values = [
        {
            "list_id": mailing_list.id,
            "email": row.address.email,
            "email_key": row.address.key,
            "email_ascii_key": row.address.ascii_key,
            "status": SubscriptionStatus.CONFIRMED.value,
            "locale": row.locale.value if row.locale else mailing_list.default_locale,
            "attributes": row.attributes,
            "consent_version": row.consent_version or mailing_list.consent_version,
            "created_at": now,
            "updated_at": now,
            "confirmed_at": now,
            "unsubscribed_at": None,
            "last_mail_at": None,
        }
        for row in rows
    ]
    # RETURNING says which were new.
    statement = _insert_confirmed_statement(session)
    inserted: Sequence[Any]
    if session.get_bind().dialect.name == "postgresql":
        inserted = statement.execute_many_returning(session, values)
    else:
        # sqlite3's `executemany` returns no RETURNING rows: SQLAlchemy's several rows a
        # statement ("insertmanyvalues") instead.
        assert isinstance(statement.statement, sa.Insert)
        inserted = session.execute(statement.statement, values).all()
    ids = {email_key: row_id for row_id, email_key in inserted}
    if not ids:
        return 0
    events: list[dict[str, Any]] = []
    for row in rows:
        subscription_id = ids.get(row.address.key)
        if subscription_id is None:
            continue
        events.append(
            {
                "subscription_id": subscription_id,
                "list_id": mailing_list.id,
                "action": ConsentAction.IMPORTED.value,
                "status_after": SubscriptionStatus.CONFIRMED.value,
                "source": "import",
                "source_url": None,
                "consent_version": row.consent_version or mailing_list.consent_version,
                "ip": None,
                "user_agent": None,
                "detail": {
                    "consent_source": row.consent_source,
                    "consent_date": row.consent_date,
                    "operator": operator,
                    "note": note,
                },
                "occurred_at": now,
                "address_hash": None,
            }
        )
    subscriptions.record_many(session, events)
    outbox.enqueue_new_syncs(
        session, subscription_ids=list(ids.values()), list_id=mailing_list.id, now=now
    )
    return len(ids)


# Export ------------------------------------------------------------------------------------

# Columns of an export, in order. consent_event*: the ledger event that made the
# subscription confirmed (a click on the confirmation link, or an import), where there is
# one; consent_source / consent_date: the evidence an operator gave when importing or
# adding the subscriber as confirmed.
EXPORT_FIELDS = (
    "email",
    "name",
    "status",
    "locale",
    "attributes",
    "consent_version",
    "created_at",
    "confirmed_at",
    "unsubscribed_at",
    "consent_event",
    "consent_event_at",
    "consent_event_source",
    "consent_ip",
    "consent_user_agent",
    "consent_source",
    "consent_date",
)
# The other columns of the CSV export, so that an export imports as it is: `status` is
# checked, and the confirming event stands for the evidence of a row without consent_source
# and consent_date. The rest is not imported: the new subscription has its own dates, and
# the confirmation's IP and user agent stay with the source's ledger, whose retention rules
# they follow.
EXPORT_COLUMNS = tuple(name for name in EXPORT_FIELDS if name not in COLUMNS)
_CONFIRMING = (ConsentAction.CONFIRMED.value, ConsentAction.IMPORTED.value)
_NO_EVENT: dict[str, Any] = dict.fromkeys(EXPORT_FIELDS[9:])


@dataclass(frozen=True, slots=True)
class ExportPage:
    records: list[dict[str, Any]]
    # Where the next page starts (keyset); None when this page is the last.
    next_after: int | None


def export_count(session: Session, *, list_id: int, where: admin.SubscriberFilter) -> int:
    query = admin.subscriber_query(list_id, where).with_only_columns(
        func.count(), maintain_column_froms=True
    )
    return int(session.execute(query).scalar_one())


def export_page(
    session: Session,
    *,
    list_id: int,
    where: admin.SubscriberFilter,
    after: int | None,
    limit: int = PAGE_SIZE,
) -> ExportPage:
    """One page of records in id order after `after`: one query for the subscriptions and
    one for their confirming events."""
    query = admin.subscriber_query(list_id, where).with_only_columns(
        col(Subscription.id),
        col(Subscription.email),
        col(Subscription.status),
        col(Subscription.locale),
        col(Subscription.attributes),
        col(Subscription.consent_version),
        col(Subscription.created_at),
        col(Subscription.confirmed_at),
        col(Subscription.unsubscribed_at),
    )
    if after is not None:
        query = query.where(col(Subscription.id) > after)
    rows = session.execute(query.order_by(col(Subscription.id)).limit(limit)).all()
    if not rows:
        return ExportPage(records=[], next_after=None)
    ids = [row[0] for row in rows]
    # The latest confirming event of each subscription, as the export's columns.
    confirming: dict[int, dict[str, Any]] = {}
    for subscription_id, action, source, ip, agent, occurred_at, detail in session.execute(
        sa.select(
            col(ConsentEvent.subscription_id),
            col(ConsentEvent.action),
            col(ConsentEvent.source),
            col(ConsentEvent.ip),
            col(ConsentEvent.user_agent),
            col(ConsentEvent.occurred_at),
            col(ConsentEvent.detail),
        )
        .where(
            col(ConsentEvent.subscription_id).in_(ids),
            col(ConsentEvent.action).in_(_CONFIRMING),
            col(ConsentEvent.status_after) == SubscriptionStatus.CONFIRMED.value,
        )
        .order_by(col(ConsentEvent.id))
    ).all():
        confirming[subscription_id] = {
            "consent_event": action,
            "consent_event_at": occurred_at,
            "consent_event_source": source,
            "consent_ip": ip,
            "consent_user_agent": agent,
            # An import's row, or an operator's "add as confirmed" with its evidence.
            "consent_source": detail.get("consent_source") or detail.get("evidence_source"),
            "consent_date": detail.get("consent_date") or detail.get("consented_at"),
        }
    records = [
        {
            "email": email,
            "name": attributes.get("name"),
            "status": status,
            "locale": locale,
            "attributes": attributes,
            "consent_version": version,
            "created_at": created,
            "confirmed_at": confirmed,
            "unsubscribed_at": left,
            **confirming.get(row_id, _NO_EVENT),
        }
        for row_id, email, status, locale, attributes, version, created, confirmed, left in rows
    ]
    return ExportPage(records=records, next_after=ids[-1] if len(ids) == limit else None)


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


# A spreadsheet runs a cell starting with one of these as a formula; names, user agents,
# attributes and addresses come from the public form (OWASP "CSV injection"). An address
# may start with `=`, `+` or `-` and hold `|`, `'` and `!`: `=cmd|'/Ccalc'!A0@example.org`
# is valid, and a stranger may subscribe it. A leading `'` makes the cell text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_quoted_formula(text: str) -> bool:
    """An address as the export writes one that starts like a formula: `'` before it."""
    return text.startswith("'") and text.lstrip("'").startswith(_FORMULA_START)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True) if value else ""
    text = str(value)
    if text.startswith(_FORMULA_START):
        return "'" + text
    # The text must come back exact from an import (`_cell` takes one `'` off a cell that
    # reads as a quoted formula), so one that already looks quoted is quoted again.
    if _is_quoted_formula(text):
        return "'" + text
    return text


def header(format: ExportFormat) -> bytes:
    if format == ExportFormat.JSONL:
        return b""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(EXPORT_FIELDS)
    return buffer.getvalue().encode()


def encode(records: Iterable[dict[str, Any]], format: ExportFormat) -> bytes:
    """Records as CSV rows (after `header()`) or JSON lines."""
    if format == ExportFormat.JSONL:
        return "".join(
            json.dumps({k: _json_value(v) for k, v in record.items()}, ensure_ascii=False) + "\n"
            for record in records
        ).encode()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for record in records:
        writer.writerow([_csv_value(record[name]) for name in EXPORT_FIELDS])
    return buffer.getvalue().encode()


def export_chunks(
    transaction: Transaction,
    *,
    list_id: int,
    where: admin.SubscriberFilter,
    format: ExportFormat,
    progress: Callable[[int], None] | None = None,
) -> Generator[bytes, None, None]:
    """The whole export as chunks of bytes, a page at a time, each page in a transaction
    of its own (for the CLI; the API runs the same pages from its event loop)."""
    yield header(format)
    after: int | None = None
    while True:
        with transaction() as session:
            page = export_page(session, list_id=list_id, where=where, after=after)
        if page.records:
            yield encode(page.records, format)
            if progress is not None:
                progress(len(page.records))
        if page.next_after is None:
            return
        after = page.next_after
