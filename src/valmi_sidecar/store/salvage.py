"""Salvage: every queued event that can still be read from a damaged database file.

It reads row by row past any damage (decode errors, bad pages, malformed records), and
checks each field it reads against its second copy (the key row, the id's time, the
fingerprint of the body) before it queues the event again.
"""

from __future__ import annotations

import bisect
import re
import sqlite3
from array import array
from collections.abc import Iterable, Iterator
from typing import Any, Final

import msgspec

from ..events import (
    KINDS,
    TYPE_FIELDS,
    Kind,
    NewEvent,
    ValidationError,
    body_fingerprint,
    check_body,
    check_idempotency_key,
    decode,
    rfc3339,
)
from .records import MAX_UNIX_TIME, SalvageReport, UnreadableRow
from .sql import JSON, KEY_COLUMNS, SALVAGE_COLUMNS


class Salvage:
    """Salvage from one open (read-only) connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def events(self, report: SalvageReport, chunk: int = 500) -> Iterator[list[NewEvent]]:
        """Every queued event that can be read and validated, in chunks, as it was stored
        (id, key, body, receipt time; the fingerprint derived again from the body when
        its key row cannot be read). Reads past any damage: a row that
        cannot be read or validated is recorded in ``report.unreadable``; when a damaged
        page stops a range scan, the rows after it are looked up one by one, and the ones
        that cannot be reached are recorded in ``report.damaged``."""
        rows: list[Any] = []
        # Rows whose key has no key row: checked at the end against the key rows found
        # by id (their key may be the damaged copy).
        deferred: list[Any] = []
        seen: set[str | None] = set()
        for row in self._walk(report):
            seen.update((_text(row[1]), _text(row[2])))
            rows.append(row)
            if len(rows) >= chunk:
                events = self._checked(rows, report, deferred)
                rows = []
                if events:
                    yield events
        events = self._checked(rows, report, deferred)
        if events:
            yield events
        if deferred:
            wanted = {_text(r[1]) for r in deferred}
            by_id = {
                row.id: (key, row)
                for key, row in self._queued_key_rows(report)
                if row.id is not None and row.id in wanted
            }
            for start in range(0, len(deferred), chunk):
                events = self._checked(deferred[start : start + chunk], report, None, by_id)
                if events:
                    yield events
        seen.update(u.id for u in report.unreadable)
        for key, row in self._queued_key_rows(report):
            if row.id not in seen and key not in seen:
                report.unreadable.append(UnreadableRow(None, row.id, _LOST))

    def _queued_key_rows(self, report: SalvageReport) -> Iterator[tuple[str, _KeyRow]]:
        """The key rows of queued events that can be read: in key order up to the first
        damaged page, then from the last key backwards down to the last damaged one."""
        first: str | None = None
        for descending in (False, True):
            bound: str | None = None
            while True:
                got, moved = 0, False
                where = "state = 0"
                params: list[str] = []
                if bound is not None:
                    where += " AND idem_key < ?" if descending else " AND idem_key > ?"
                    params.append(bound)
                order = "DESC" if descending else "ASC"
                try:
                    for raw in self._conn.execute(
                        f"SELECT {KEY_COLUMNS} FROM keys WHERE {where} ORDER BY idem_key {order}",  # noqa: S608 - constant SQL; values are bound
                        params,
                    ):
                        got += 1
                        read = _key_row(raw)
                        if read is None:
                            continue
                        key = read[0]
                        if descending and first is not None and key <= first:
                            return  # met the rows read forwards
                        if not descending:
                            first = key
                        bound, moved = key, True
                        yield read
                except sqlite3.DatabaseError as exc:
                    report.errors.add(str(exc))
                    if got and moved:
                        continue  # again from the last key read
                break

    def _walk(self, report: SalvageReport) -> Iterator[Any]:
        """The rows of ``events`` that SQLite can read, in ``seq`` order, past damage;
        the seqs that the index lists and no row came back for are recorded as damaged
        (a damaged page can also hide rows without an error)."""
        known = self._indexed_seqs()
        # One byte per seq the index lists (a queue may hold millions): came back or not.
        walked = bytearray(len(known) if known is not None else 0)
        for row in self._walk_rows(report, known):
            if known is not None and isinstance(row[0], int):
                at = bisect.bisect_left(known, row[0])
                if at < len(known) and known[at] == row[0]:
                    walked[at] = 1
            yield row
        for at, came in enumerate(walked):
            if not came and known is not None:
                report.damage(known[at])

    def _walk_rows(self, report: SalvageReport, known: array[int] | None) -> Iterator[Any]:
        """When a scan stops at a damaged page, the next seqs are looked up one by one
        until one reads, and the scan goes on from there."""
        last = self._max_seq(known)
        after = 0
        # Rows whose seq is out of order (a damaged key): kept apart, so never read twice.
        odd: set[int] = set()
        while True:
            got = 0
            try:
                for row in self._conn.execute(
                    f"SELECT {SALVAGE_COLUMNS} FROM events WHERE seq > ? ORDER BY seq",  # noqa: S608 - constant SQL; values are bound
                    (after,),
                ):
                    seq = row[0]
                    if isinstance(seq, int) and after < seq and (last is None or seq <= last):
                        after = seq
                    elif seq in odd:
                        continue
                    else:
                        odd.add(seq)
                    got += 1
                    yield row
            except sqlite3.DatabaseError as exc:
                report.errors.add(str(exc))
            else:
                return
            if got:
                continue  # scan again from the row before the damage
            if last is None or after >= last:
                report.gave_up = last is None
                return
            # The seqs the index lists when it can be read (each one a row); else every
            # seq, gaps of delivered events included.
            candidates: Iterable[int] = (
                (known[at] for at in range(bisect.bisect_right(known, after), len(known)))
                if known is not None
                else range(after + 1, last + 1)
            )
            after = last
            for seq in candidates:
                try:
                    row = self._conn.execute(
                        f"SELECT {SALVAGE_COLUMNS} FROM events WHERE seq = ?",  # noqa: S608 - constant SQL; values are bound
                        (seq,),
                    ).fetchone()
                except sqlite3.DatabaseError as exc:
                    report.errors.add(str(exc))
                    self._name_damaged(seq, report)
                    continue
                if row is not None:
                    after = seq
                    if seq not in odd:
                        yield row
                    break

    def _indexed_seqs(self) -> array[int] | None:
        """Every seq that the ``events_due`` index lists, in order, read from the index
        alone (it holds each row's seq apart from the table's pages); ``None`` when it is
        damaged."""
        seqs = array("q")
        try:
            for (seq,) in self._conn.execute("SELECT seq FROM events INDEXED BY events_due"):
                if isinstance(seq, int):
                    seqs.append(seq)
        except sqlite3.DatabaseError:
            return None
        return array("q", sorted(seqs))

    def _name_damaged(self, seq: int, report: SalvageReport) -> None:
        """A row that cannot be read whole: named by its id when that much can be read."""
        try:
            row = self._conn.execute(
                "SELECT CAST(id AS BLOB) FROM events WHERE seq = ?", (seq,)
            ).fetchone()
        except sqlite3.DatabaseError:
            row = None
        eid = None if row is None else _text(row[0])
        if eid is None:
            report.damage(seq)
        else:
            report.unreadable.append(UnreadableRow(seq, eid, "its record is damaged"))

    def _max_seq(self, known: array[int] | None) -> int | None:
        """The highest seq the table has held, from what can still be read of it (or up
        to ``writes.SEQ_RESERVE`` above it: ``sqlite_sequence`` is moved ahead a block at
        a time, so probing to it costs that many lookups at most)."""
        found = [known[-1]] if known else []
        for sql in (
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
            "SELECT max(seq) FROM events",
        ):
            try:
                row = self._conn.execute(sql).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row is not None and isinstance(row[0], int):
                found.append(row[0])
        return max(found) if found else None

    def _checked(
        self,
        rows: list[Any],
        report: SalvageReport,
        deferred: list[Any] | None,
        by_id: dict[str, tuple[str, _KeyRow]] | None = None,
    ) -> list[NewEvent]:
        """The events of ``rows``; the rows whose key has no key row go to ``deferred``
        (when given and their id is readable) instead."""
        by_key = self._key_rows([_text(r[2]) for r in rows])
        out = []
        for row in rows:
            if deferred is not None and _text(row[2]) not in by_key and _text(row[1]):
                deferred.append(row)
                continue
            seq = row[0] if isinstance(row[0], int) else None
            event = _salvaged(row, by_key, by_id or {})
            if isinstance(event, NewEvent):
                report.read += 1
                report.unchecked += int(
                    event.idem_key not in by_key and event.id not in (by_id or {})
                )
                out.append(event)
            elif event[0] is not None:
                report.unreadable.append(UnreadableRow(seq, event[0], event[1]))
            elif seq is not None:
                # Nameless: the keys table names it, when it can, among the lost ones.
                report.damage(seq)
        return out

    def _key_rows(self, keys: list[str | None]) -> dict[str, _KeyRow]:
        """The key rows of ``keys``, as far as they can be read; one key at a time when a
        damaged page stops the lookup of all of them."""
        wanted = [k for k in keys if k is not None]
        if not wanted:
            return {}
        try:
            return _key_rows_of(
                self._conn.execute(
                    f"SELECT {KEY_COLUMNS} FROM keys"  # noqa: S608 - constant SQL; values are bound
                    " WHERE idem_key IN (SELECT value FROM json_each(?))",
                    (JSON.encode(wanted).decode(),),
                )
            )
        except sqlite3.DatabaseError:
            pass
        found: dict[str, _KeyRow] = {}
        for key in wanted:
            try:
                cursor = self._conn.execute(
                    f"SELECT {KEY_COLUMNS} FROM keys WHERE idem_key = ?",  # noqa: S608 - constant SQL; values are bound
                    (key,),
                )
                found.update(_key_rows_of(cursor))
            except sqlite3.DatabaseError:
                continue
        return found


_LOST: Final = "queued, says the keys table, but its row in the events table cannot be read"


def _text(raw: object) -> str | None:
    """A stored text value, or ``None`` when it is not printable UTF-8."""
    if not isinstance(raw, bytes):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


class _KeyRow(msgspec.Struct, frozen=True):
    """What the keys table holds of an event, written with it: a second copy of its id
    and receipt time, and the fingerprint of its body."""

    id: str | None
    fingerprint: bytes
    received_at: float | None
    created_at: str | None


#: An id as ingest makes it (``new_event_id``): the receipt time's milliseconds, then
#: random digits.
_EVENT_ID: Final = re.compile(r"evt_([0-9a-f]{12})[0-9a-f]{16}")


def _key_row(raw: Any) -> tuple[str, _KeyRow] | None:
    """A key and its row, from ``KEY_COLUMNS``; ``None`` when the key is unreadable."""
    key, eid, fingerprint, received_at, created_at = raw
    text = _text(key)
    if text is None:
        return None
    return text, _KeyRow(
        _text(eid),
        fingerprint if isinstance(fingerprint, bytes) else b"",
        _unix_time(received_at),
        _text(created_at),
    )


def _key_rows_of(rows: Iterator[Any]) -> dict[str, _KeyRow]:
    return dict(read for read in map(_key_row, rows) if read is not None)


def _unix_time(value: object) -> float | None:
    """A stored receipt time that has a UTC day, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 <= value <= MAX_UNIX_TIME else None


_Refused = tuple[str | None, str]


def _salvaged(
    row: Any, by_key: dict[str, _KeyRow], by_id: dict[str, tuple[str, _KeyRow]]
) -> NewEvent | _Refused:
    """The event a stored row holds, or ``(its id if known, why it cannot be queued
    again)``. Its fields must be readable and agree with their second copies: the id and
    key those of its key row (found by key, or by id when the key is damaged), the
    receipt time that of its ``created_at`` or key row and of the milliseconds in its id,
    the body a valid event that matches the fingerprint stored at ingest (or, when that
    is gone, the columns copied from it)."""
    _seq, raw_id, raw_key, raw_kind, body, agent_key, event_type, value, received, created = row
    who = _identity(_text(raw_id), _text(raw_key), by_key, by_id)
    if len(who) == 2:
        return who
    eid, key, key_row = who
    kind = _text(raw_kind)
    if kind not in KINDS:
        return eid, "its kind is neither action nor outcome"
    if not isinstance(body, bytes):
        return eid, "its body is not readable"
    typed: Kind = kind
    try:
        obj = decode(body)
    except ValidationError as exc:
        return eid, f"its body is damaged: {exc}"
    problems = check_body(typed, obj)
    if problems:
        return eid, f"its body is damaged: {ValidationError(problems)}"
    times = _receipt_time(_unix_time(received), _text(created), key_row)
    if times is None:
        return eid, "its receipt time is damaged"
    received_at, created_at = times
    minted = _EVENT_ID.fullmatch(eid)
    if minted is not None and int(minted[1], 16) != int(received_at * 1000):
        return eid, "its id and its receipt time disagree"
    if minted is None and key_row is None:
        return eid, "its id is not one the sidecar makes, and no key row holds it"
    copied = (_text(agent_key), _text(event_type), value)
    checked = _vouched_body(typed, obj, created_at, key_row, copied)
    if isinstance(checked, str):
        return eid, checked
    fingerprint, number = checked
    return NewEvent(
        id=eid,
        idem_key=key,
        kind=typed,
        body=body,
        fingerprint=fingerprint,
        agent_key=obj["agent_key"],
        event_type=obj[TYPE_FIELDS[typed]],
        value=number,
        received_at=received_at,
        created_at=created_at,
    )


def _identity(
    eid: str | None,
    key: str | None,
    by_key: dict[str, _KeyRow],
    by_id: dict[str, tuple[str, _KeyRow]],
) -> tuple[str, str, _KeyRow | None] | _Refused:
    """A row's id, key and key row, each confirmed by its second copy where one exists."""
    if eid is not None and not eid.isascii():
        eid = None
    key_row = by_key.get(key) if key is not None else None
    if key_row is None and eid is not None and eid in by_id:
        kept, key_row = by_id[eid]
        if key is not None and check_idempotency_key(key) is None:
            # Two readable keys for one id: which copy is damaged is unknown.
            return eid, f"its idempotency key column reads {key!r}, its key row {kept!r}"
        key = kept  # the key row's copy of an unreadable key
    if key is None:
        return eid, "its idempotency key is not readable"
    problem = check_idempotency_key(key)
    if problem is not None:
        return eid, f"its idempotency_key {problem}"
    if key_row is not None and key_row.id is not None:
        if eid is not None and eid != key_row.id:
            return key_row.id, f"its id column reads {eid!r}, not the id its key row holds"
        eid = key_row.id
    if eid is None:
        return None, "its id is not readable"
    if key_row is None and key != eid and (_EVENT_ID.fullmatch(key) or _near(key, eid)):
        # A key the sidecar made is the event's id: one of the two is damaged.
        return eid, f"its idempotency key {key!r} is not its id, and no key row says which is"
    return eid, key, key_row


def _vouched_body(
    kind: Kind,
    obj: dict[str, Any],
    created_at: str,
    key_row: _KeyRow | None,
    copied: tuple[str | None, str | None, object],
) -> tuple[bytes, float | None] | str:
    """The fingerprint and value of a valid body that the fingerprint stored at ingest
    vouches for (or, when that is gone, the columns copied from it: ``copied`` is the
    agent key, event type and value as stored); else why not."""
    # A timestamp equal to the receipt time is the one ingest filled in: the fingerprint
    # is of the body without it.
    as_sent, without = _fingerprints_of(kind, obj)
    filled = obj.get("timestamp") == created_at
    stored = key_row.fingerprint if key_row is not None else b""
    vouched = bool(stored) and (stored == as_sent or (filled and stored == without))
    if stored and not vouched:
        return "its body does not match the fingerprint stored at ingest"
    try:
        number = float(obj["value"]) if kind == "outcome" else None
    except OverflowError:
        return "its value is out of range"
    agent_key, event_type, value = copied
    if not vouched and (
        agent_key != obj["agent_key"]
        or event_type != obj[TYPE_FIELDS[kind]]
        or not _same_number(value, number)
    ):
        return "its body and the columns copied from it disagree"
    return (stored or (without if filled else as_sent)), number  # derived again if gone


def _near(a: str, b: str) -> bool:
    """Whether two strings of one length differ in at most 3 places: a damaged copy."""
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) <= 3


def _receipt_time(
    received: float | None, created: str | None, key_row: _KeyRow | None
) -> tuple[float, str] | None:
    """An event's receipt time and its RFC 3339 form, from a copy that another one
    confirms (ingest writes ``created_at`` as the receipt time formatted, in both the
    event row and its key row); ``None`` when no two agree."""
    if received is not None and created is not None and rfc3339(received) == created:
        return received, created
    if key_row is not None and key_row.received_at is not None:
        kept = rfc3339(key_row.received_at)
        if received == key_row.received_at or kept in (created, key_row.created_at):
            return key_row.received_at, kept
    return None


def _fingerprints_of(kind: Kind, obj: dict[str, Any]) -> tuple[bytes, bytes]:
    """The fingerprint of the body as the client sent it: with its timestamp, or without
    (the sidecar filled it in)."""
    sent = {k: v for k, v in obj.items() if k != "timestamp"}
    return body_fingerprint(kind, obj), body_fingerprint(kind, sent)


def _same_number(stored: object, number: float | None) -> bool:
    if number is None:
        return stored is None
    return isinstance(stored, int | float) and not isinstance(stored, bool) and stored == number
