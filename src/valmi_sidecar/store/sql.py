"""The SQL statements of the store, and the rows they read as records.

Statements are constants with their values bound; the column lists of a ``SELECT`` that
reads a record are derived from the record's fields, in their order, so a row is never
read by position by hand.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from ..events import NewEvent
from .records import DeadLetterFilter, DeadLetterRecord, LedgerRow, QueuedEvent


def record_fields(record: type[msgspec.Struct]) -> tuple[str, ...]:
    """The field names of a record type, in order."""
    return record.__struct_fields__


def columns(record: type[msgspec.Struct], **expressions: str) -> str:
    """The ``SELECT`` list that reads ``record``: its fields in order, each the column of
    its name or the SQL expression given for it."""
    return ", ".join(expressions.get(name, name) for name in record_fields(record))


#: When a key's de-dup window starts: the later of its event's receipt and settling.
REMEMBERED_SINCE: Final = "max(received_at, coalesce(settled_at, 0))"
#: A key row is remembered for a day after every event, so it does not repeat what it can
#: derive: its ``id`` is ``''`` when it is the key itself (a key
#: the sidecar made), its ``created_at`` ``''`` when this formatting of ``received_at``
#: gives it (compared as stored, so a formatting that differs is kept as it is).
CREATED_FROM_RECEIVED: Final = "strftime('%Y-%m-%dT%H:%M:%fZ', {received_at}, 'unixepoch')"
KEY_ID: Final = "coalesce(nullif(id, ''), idem_key)"
KEY_CREATED_AT: Final = "coalesce(nullif(created_at, ''), {})".format(
    CREATED_FROM_RECEIVED.format(received_at="received_at")
)
#: A ledger row's deltas are added to the row of the same key and day.
LEDGER_ADD: Final = (
    " ON CONFLICT (agent_key, kind, event_type, day) DO UPDATE SET"
    " received = received + excluded.received, delivered = delivered + excluded.delivered,"
    " dead_lettered = dead_lettered + excluded.dead_lettered,"
    " received_value = received_value + excluded.received_value,"
    " delivered_value = delivered_value + excluded.delivered_value,"
    " dead_lettered_value = dead_lettered_value + excluded.dead_lettered_value"
)
#: Ledger rows (``LEDGER_ROW_VALUES`` values each) in one statement; ``{rows}`` stands
#: for the rows' placeholders (``with_rows``).
_LEDGER_COLUMNS: Final = (
    "agent_key",
    "kind",
    "event_type",
    "day",
    "received",
    "delivered",
    "dead_lettered",
    "received_value",
    "delivered_value",
    "dead_lettered_value",
)
_INSERT_LEDGER: Final = f"INSERT INTO ledger ({', '.join(_LEDGER_COLUMNS)})"
UPSERT_LEDGER_ROWS: Final = _INSERT_LEDGER + " VALUES {rows}" + LEDGER_ADD
LEDGER_ROW_VALUES: Final = 10


def _insert_key(key: str, id_: str, fingerprint: str, created_at: str, received_at: str) -> str:
    """The ``INSERT`` of one queued key row from these SQL expressions, leaving out the
    id and ``created_at`` it can derive; ``INSERT_KEY`` and ``GROUP_WRITE_VIEW`` share it."""
    derived_created_at = CREATED_FROM_RECEIVED.format(received_at=received_at)
    return (
        "INSERT OR REPLACE INTO keys (idem_key, id, fingerprint, created_at, received_at, state)"
        f" SELECT {key}, CASE WHEN {id_} = {key} THEN '' ELSE {id_} END, {fingerprint},"
        f" CASE WHEN {created_at} = {derived_created_at} THEN '' ELSE {created_at} END,"
        f" {received_at}, 0"
    )


#: What one group transaction writes besides its settlements: the new events, their keys,
#: the ledger (and the duplicates' count). The events and the keys are written by
#: multi-row statements (``rows``): ``{rows}`` stands for the rows' placeholders.
#: A key row leaves out the id and ``created_at`` it can derive (``KEY_ID``,
#: ``KEY_CREATED_AT``); each row binds key, id, fingerprint, created_at, received_at.
INSERT_KEY: Final = (
    _insert_key("column1", "column2", "column3", "column4", "column5") + " FROM (VALUES {rows})"
)
KEY_ROW_VALUES: Final = 5
#: The fields of a ``NewEvent`` that the events table stores (the fingerprint is the key
#: row's), in the order ``INSERT_EVENT`` binds them after ``seq`` and ``size``.
EVENT_FIELDS: Final = tuple(f for f in record_fields(NewEvent) if f != "fingerprint")
_EVENT_COLUMNS: Final = ("seq", "size", *EVENT_FIELDS)
_INSERT_EVENT: Final = f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)})"
INSERT_EVENT: Final = _INSERT_EVENT + " VALUES {rows}"
EVENT_ROW_VALUES: Final = len(EVENT_FIELDS) + 2
#: A large group's new events and their keys in one statement: an ``INSERT`` of
#: ``GROUP_WRITE_COLUMNS`` rows into a TEMP view whose INSTEAD OF trigger writes them
#: (``GROUP_WRITE_VIEW``, made on the writer's connection when it opens; TEMP, so nothing
#: of it is stored in the file). ``op`` 0 is a new event with its key row (written as
#: ``INSERT_KEY`` and ``INSERT_EVENT`` write them), any other nothing: a row that pads the
#: statement to its size. Only a group with nothing else to write takes it, so it has no
#: ledger rows: the ledger counts an event once it is settled (schema version 5).
GROUP_WRITE_COLUMNS: Final = ("op", *_EVENT_COLUMNS, "fingerprint")


def _new(columns: tuple[str, ...]) -> str:
    """The trigger's row values of ``columns``, as ``VALUES`` takes them."""
    return "(" + ", ".join(f"NEW.{c}" for c in columns) + ")"


GROUP_WRITE_VIEW: Final = (
    "CREATE TEMP VIEW IF NOT EXISTS group_write AS SELECT "  # noqa: S608 - constant SQL
    + ", ".join(f"NULL AS {c}" for c in GROUP_WRITE_COLUMNS)
    + ";\nCREATE TEMP TRIGGER IF NOT EXISTS group_write_event INSTEAD OF INSERT ON group_write"
    " WHEN NEW.op = 0 BEGIN "
    + _insert_key("NEW.idem_key", "NEW.id", "NEW.fingerprint", "NEW.created_at", "NEW.received_at")
    + "; "
    + _INSERT_EVENT
    + " VALUES "
    + _new(_EVENT_COLUMNS)
    + "; END;"
)
GROUP_WRITE: Final = (
    f"INSERT INTO temp.group_write ({', '.join(GROUP_WRITE_COLUMNS)}) VALUES {{rows}}"  # noqa: S608 - constant SQL; values are bound
)
#: The committed counts by name (schema version 4 on): received, delivered and
#: dead-lettered are the ledger's totals plus the counters' offsets; duplicates are
#: counted apart (the ledger holds events, not repeats).
COUNTS: Final = (
    "SELECT name, value + CASE name WHEN 'received' THEN r WHEN 'delivered' THEN d"
    " WHEN 'dead_lettered' THEN x ELSE 0 END FROM counters,"
    " (SELECT coalesce(sum(received), 0) AS r, coalesce(sum(delivered), 0) AS d,"
    " coalesce(sum(dead_lettered), 0) AS x FROM ledger)"
)
#: Before version 4, the counters themselves.
COUNTS_V1: Final = "SELECT name, value FROM counters"
BUMP_COUNTER: Final = "UPDATE counters SET value = value + ? WHERE name = ?"
BUMP_OPERATOR: Final = "UPDATE operator_counters SET value = value + ? WHERE name = ?"
DL_COLUMNS: Final = columns(DeadLetterRecord)
INSERT_REQUEUED: Final = (
    "INSERT INTO events (seq, id, idem_key, kind, body, size, agent_key, event_type, value,"
    " received_at, created_at, requeued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: The key of a re-queued dead letter is queued again (never expires while queued); a
#: pruned key row comes back without a fingerprint (a client retry with it gets a 409).
REQUEUE_KEY: Final = (
    "INSERT INTO keys (idem_key, id, fingerprint, created_at, received_at, state)"  # noqa: S608 - constant SQL; values are bound
    " VALUES (?, ?, x'', ?, ?, 0)"
    " ON CONFLICT (idem_key) DO UPDATE SET state = 0, settled_at = NULL"
    f" WHERE {KEY_ID} = excluded.id"
)
LEDGER_COLUMNS: Final = columns(LedgerRow)
COUNT_DEAD: Final = "SELECT count(*) FROM dead_letters WHERE "
SUMMARY: Final = (
    "SELECT reason, count(*), min(dead_at), max(dead_at) FROM dead_letters"
    " GROUP BY reason ORDER BY reason"
)
INSERT_DEAD: Final = (
    "INSERT OR REPLACE INTO dead_letters (seq, id, idem_key, kind, body, agent_key, event_type,"
    " value, received_at, created_at, dead_at, reason, status, detail, attempts)"
    " SELECT seq, id, idem_key, kind, body, agent_key, event_type, value, received_at,"
    " created_at, ?, ?, ?, ?, attempts + 1 FROM events WHERE seq = ?"
)
RETRY: Final = (
    "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE seq = ?"
)
DELETE_EVENTS: Final = "DELETE FROM events WHERE seq IN {list}"
#: ``writes.SEQ_RESERVE``: never lowers it (a re-queue may have written past it).
RESERVE_SEQS: Final = "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'events'"
DELETE_EVENT: Final = "DELETE FROM events WHERE seq = ?"
SETTLE_KEYS: Final = "UPDATE keys SET state = ?, settled_at = ? WHERE idem_key IN {list}"
#: The age of a re-queued dead letter counts from its re-queueing.
AGE_FROM: Final = "max(received_at, coalesce(requeued_at, 0))"
OLDEST: Final = f"SELECT seq, {AGE_FROM} FROM events ORDER BY seq LIMIT 1"  # noqa: S608 - constant SQL; values are bound
#: Due events, oldest first, as ``QueuedEvent``s (the age from ``AGE_FROM``).
LEASE: Final = (
    f"SELECT {columns(QueuedEvent, received_at=AGE_FROM)} FROM events"  # noqa: S608 - constant SQL; values are bound
    " WHERE next_attempt_at <= ? ORDER BY seq LIMIT ?"
)
PRUNE: Final = (
    "DELETE FROM keys WHERE idem_key IN (SELECT idem_key FROM keys"  # noqa: S608 - constant SQL; values are bound
    f" WHERE state != 0 AND {REMEMBERED_SINCE} < ? LIMIT ?)"
)
#: Needs free pages (as a submit does) and leaves nothing behind.
PROBE: Final = (
    "BEGIN IMMEDIATE; INSERT INTO counters (name, value) VALUES ('probe', zeroblob(65536));"
    " DELETE FROM counters WHERE name = 'probe'; COMMIT;"
)

MEASURE: Final = (
    "SELECT page_count, freelist_count FROM pragma_page_count(), pragma_freelist_count()"
)

JSON: Final = msgspec.json.Encoder()

#: A list of up to this many values is bound one ``?`` each (one statement per length in
#: the statement cache); a longer one as one JSON array through ``json_each``, which costs
#: about 6 us more per statement (the usual settle lists one or two events).
SHORT_LIST: Final = 8


_JSON_LIST: Final = "(SELECT value FROM json_each(?))"


@functools.cache
def _listed(statement: str, n: int) -> str:
    values = "(" + ", ".join("?" * n) + ")" if n <= SHORT_LIST else _JSON_LIST
    return statement.replace("{list}", values)


def bind_list(statement: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``statement`` with its ``{list}`` (after every other value it binds) made the list
    of ``values``, and the values to bind for it."""
    if len(values) <= SHORT_LIST:
        return _listed(statement, len(values)), list(values)
    return _listed(statement, SHORT_LIST + 1), [JSON.encode(values).decode()]


#: Rows in one multi-row statement, at most. A group's rows go in chunks whose sizes are
#: powers of two (``row_chunks``): a few statement texts serve every group size, and a
#: group of n rows takes about log2(n) SQLite steps, not n as ``executemany`` does (each
#: step lets go of the GIL and takes it back, from the event loop when it is busy).
MAX_CHUNK_ROWS: Final = 256


def row_chunks(n: int) -> list[int]:
    """The chunk sizes that write ``n`` rows: powers of two, largest first."""
    sizes = []
    while n:
        size = min(MAX_CHUNK_ROWS, 1 << (n.bit_length() - 1))
        sizes.append(size)
        n -= size
    return sizes


@functools.cache
def with_rows(statement: str, width: int, n: int) -> str:
    """``statement`` with its ``{rows}`` made ``n`` rows of ``width`` placeholders."""
    row = "(" + ", ".join("?" * width) + ")"
    return statement.replace("{rows}", ", ".join([row] * n))


#: One ledger row.
UPSERT_LEDGER: Final = with_rows(UPSERT_LEDGER_ROWS, LEDGER_ROW_VALUES, 1)


#: A key row's id and ``created_at`` as written, filled in where the row leaves out what
#: it can derive (``KEY_ID``, ``KEY_CREATED_AT``): a file of any schema version reads
#: the same.
KEY_COLUMNS: Final = (
    f"CAST(idem_key AS BLOB), CAST({KEY_ID} AS BLOB), fingerprint, received_at,"
    f" CAST({KEY_CREATED_AT} AS BLOB)"
)


#: Text columns as stored bytes: damaged text is then a value to judge, not a decode error.
SALVAGE_COLUMNS: Final = (
    "seq, CAST(id AS BLOB), CAST(idem_key AS BLOB), CAST(kind AS BLOB), body,"
    " CAST(agent_key AS BLOB), CAST(event_type AS BLOB), value, received_at,"
    " CAST(created_at AS BLOB)"
)


def dead_letter_where(flt: DeadLetterFilter) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause that selects the dead letters ``flt`` matches, and its values."""
    clauses = ["seq > ?"]
    params: list[Any] = [flt.after_seq]
    if flt.reason is not None:
        clauses.append("reason = ?")
        params.append(flt.reason)
    if flt.agent_key is not None:
        clauses.append("agent_key = ?")
        params.append(flt.agent_key)
    if flt.dead_before is not None:
        clauses.append("dead_at < ?")
        params.append(flt.dead_before)
    if flt.dead_after is not None:
        clauses.append("dead_at >= ?")
        params.append(flt.dead_after)
    if flt.ids is not None:
        clauses.append("id IN (SELECT value FROM json_each(?))")
        params.append(JSON.encode(list(flt.ids)).decode())
    return " AND ".join(clauses), params


def dead_letters_query(flt: DeadLetterFilter, limit: int) -> tuple[str, list[Any]]:
    where, params = dead_letter_where(flt)
    return (
        f"SELECT {DL_COLUMNS} FROM dead_letters WHERE {where} ORDER BY seq LIMIT ?",  # noqa: S608 - constant SQL; values are bound
        [*params, limit],
    )


def summary_row(r: Any) -> dict[str, Any]:
    return {"reason": r[0], "count": r[1], "first_dead_at": r[2], "last_dead_at": r[3]}


#: The queued events as ledger lines: their receipt, which the ledger table counts only
#: once they are settled (schema version 5 on).
_QUEUED_LINES: Final = (
    "SELECT agent_key, kind, event_type, strftime('%Y-%m-%d', received_at, 'unixepoch'),"
    " count(*), 0, 0, total(value), 0, 0 FROM events GROUP BY 1, 2, 3, 4"
)
#: The ledger table's lines and the queue's, summed by line; a line the table left at
#: zero (its events all queued again, or queued when the file was migrated) and that
#: nothing is queued for is no line.
_LEDGER_WITH_QUEUE: Final = (
    "SELECT agent_key, kind, event_type, day, sum(received), sum(delivered),"  # noqa: S608 - constant SQL; values are bound
    " sum(dead_lettered), total(received_value), total(delivered_value),"
    f" total(dead_lettered_value) FROM (SELECT {LEDGER_COLUMNS} FROM ledger"
    f" UNION ALL {_QUEUED_LINES}) WHERE {{where}} GROUP BY agent_key, kind, event_type, day"
    " HAVING sum(received) != 0"
)


def ledger_query(
    agent_key: str | None, since: str | None, until: str | None, *, queue_apart: bool = True
) -> tuple[str, list[Any]]:
    """The ledger's lines, filtered. ``queue_apart``: the ledger table leaves out the
    queued events (schema version 5 on), so they are counted from the queue itself; that
    reads the whole events table, which an operator's request can afford and a commit
    per event could not (``docs/PERFORMANCE.md``)."""
    clauses = ["1"]
    params: list[Any] = []
    for clause, value in (("agent_key = ?", agent_key), ("day >= ?", since), ("day <= ?", until)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    where = " AND ".join(clauses)
    lines = (
        _LEDGER_WITH_QUEUE.format(where=where)
        if queue_apart
        else f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE {where}"  # noqa: S608 - constant SQL; values are bound
    )
    return lines + " ORDER BY day, agent_key, kind, event_type", params
