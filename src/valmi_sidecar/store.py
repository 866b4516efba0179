"""The SQLite queue: schema and migrations, the group-commit writer, lease / settle, counts.

One ``Store`` owns one data directory: an exclusive ``flock`` on ``DIR/lock`` (so two
sidecars never send the same queue twice) and the database ``DIR/queue.db`` (WAL).

Writes
    Every write goes through one writer task. ``submit()``, ``settle()`` and ``prune()``
    put an operation with a future on its queue; the writer takes everything pending (up
    to ``MAX_GROUP_EVENTS``), runs one transaction on the writer connection and resolves
    the futures only after ``COMMIT`` returned (group commit). If the transaction fails
    (disk full, I/O error) it is rolled back and every operation in it fails with
    ``StoreError``; the writer keeps running, ``writable`` is ``False`` until a commit
    succeeds again (the writer probes every ``PROBE_INTERVAL_S`` while idle).

    If the writer task itself dies of an unexpected exception, every pending operation
    fails with ``StoreError`` and the task ends with that exception: the service watches
    ``Store.writer_task`` (``add_done_callback``) and stops, as for any background task.

Reads
    ``lease()``, ``next_due_at()`` and ``dead_letters()`` use a second, query-only
    connection. Under WAL it sees committed data only, so the flusher never sends an
    event whose commit then failed.

Counts
    ``counts()`` is an in-memory mirror of the committed state, loaded at open and
    updated after each commit; ``received == queued + delivered + dead_lettered`` holds
    at all times (duplicates are counted apart).

The disk budget
    ``max_queue_bytes`` bounds every file in the data directory (``disk.DiskBudget``).
    The writer refuses a submission with ``QueueFullError`` before its commit when the
    database would leave less than the budget's reserve: it decides from a mirror of the
    bytes in use that errs high, and measures the database (pages less free pages, one
    statement) only when the mirror says the submission does not fit. After a commit it
    cuts the WAL once past its soft bound. Settlements are never refused: they move dead
    letters one at a time into pages freed before, within the reserve.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import functools
import os
import re
import shutil
import sqlite3
import stat
import tempfile
import time
from array import array
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

import aiosqlite
import msgspec
import structlog

from .disk import (
    DEAD_LETTER_OVERHEAD_BYTES,
    EVENT_OVERHEAD_BYTES,
    SETTLE_DEAD_BYTES,
    DiskBudget,
    data_dir_bytes,
    event_disk_bytes,
    file_bytes,
)
from .events import (
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
from .metrics import COMMIT_EVENTS_BUCKETS, COMMIT_SECONDS_BUCKETS, Histogram

log = structlog.get_logger("valmi_sidecar.store")

#: Events (submitted or settled) in one group-commit transaction, at most (a single
#: submission is never split, so a group may exceed it by one submission).
MAX_GROUP_EVENTS: Final = 2_000
#: The ``Retry-After`` given with ``QueueFullError``.
QUEUE_FULL_RETRY_AFTER_S: Final = 30
#: While a commit has failed and nothing else is written, how often the writer tries a
#: tiny transaction to find out whether the disk is writable again.
PROBE_INTERVAL_S: Final = 1.0
#: How long ``close()`` lets the writer commit what is pending before it gives up, and
#: how long it waits for each connection to close: all of ``close()`` stays under 10 s.
CLOSE_DRAIN_S: Final = 5.0
CONNECTION_CLOSE_S: Final = 1.5
#: SQLite's wait for a lock before ``SQLITE_BUSY``.
BUSY_TIMEOUT_MS: Final = 5_000
#: ``keys`` rows deleted per prune transaction (the writer interleaves other work; each
#: transaction stays within the disk budget's bound on one transaction's WAL).
PRUNE_CHUNK: Final = 2_000
#: Free pages released per ``incremental_vacuum`` step, and free pages kept for reuse (at
#: most; fewer with a small disk budget). Every step goes through the WAL.
VACUUM_STEP_PAGES: Final = 64
VACUUM_KEEP_PAGES: Final = 1_024
#: SQLite's default interval between its automatic checkpoints, in WAL pages.
WAL_AUTOCHECKPOINT_PAGES: Final = 1_000
#: The database may always grow to this many pages, whatever the budget: its schema
#: needs a few (a budget this small refuses every event; configuration refuses it first).
MIN_PAGES: Final = 64
#: Below this much room for events in the database, ``/readyz`` says the queue is full,
#: and says so until this much is free again.
FULL_ROOM_BYTES: Final = 4 * 1024
ROOM_AGAIN_BYTES: Final = 64 * 1024
#: ``rates()``: one sample of the counts a second at most, over about a minute.
RATE_SAMPLE_S: Final = 1.0
RATE_WINDOW_S: Final = 60.0
DB_NAME: Final = "queue.db"
#: The database's own files: the budget measures them apart from the rest of the directory.
DB_FILES: Final = frozenset({DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"})
LOCK_NAME: Final = "lock"
#: Written by a clean close: the database file's identity and the queue's size then. A
#: start that finds it, with the file unchanged and no WAL, skips the integrity check and
#: the count of the queue (both read the whole file). Every open deletes it first.
CLEAN_NAME: Final = "clean-shutdown"

#: ``keys.state``: where the event of a key is.
QUEUED: Final = 0
DELIVERED: Final = 1
DEAD: Final = 2


class StoreError(Exception):
    """A write failed (disk full, I/O error, database closed). Nothing of it was committed,
    unless it is an ``OutcomeUnknownError``."""


class OutcomeUnknownError(StoreError):
    """A write whose transaction was in progress when the writer stopped (cancelled at
    close, or crashed): it may have been committed. Only a retry with the same idempotency
    key is safe; saying that nothing was stored could make a client send it twice."""


class DataDirLockedError(StoreError):
    """Another sidecar holds the data directory's lock."""


class QueueFullError(StoreError):
    """The queue is at its size limit (events or bytes); nothing of the submission was stored."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class IdempotencyConflictError(Exception):
    """An ``Idempotency-Key`` was used before with a different body."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclass(frozen=True, slots=True)
class Accepted:
    """The answer for one submitted event: its id and receipt time; ``duplicate`` when the
    idempotency key was seen before with the same body (then id and created_at are the
    original's, and nothing new was stored)."""

    id: str
    created_at: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    seq: int
    id: str
    idem_key: str
    kind: Kind
    body: bytes
    #: When the event was received, or re-queued from the dead letters if later: the
    #: start of its age for ``max_event_age_s``.
    received_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Delivered:
    seq: int


@dataclass(frozen=True, slots=True)
class Retry:
    seq: int
    next_attempt_at: float
    error: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    reason: str
    status: int | None
    detail: str
    #: The event's body bytes, when the caller knows them: the flusher keeps the dead
    #: letters of one settlement within ``disk.SETTLE_DEAD_BYTES``.
    size: int = 0


Settlement = Delivered | Retry | DeadLetter


@dataclass(frozen=True, slots=True)
class Counts:
    received: int
    queued: int
    queued_bytes: int
    delivered: int
    dead_lettered: int
    duplicates: int
    oldest_queued_at: float | None


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """The data directory against the disk budget (``max_queue_bytes``)."""

    #: Every file in the data directory now, as the budget counts them.
    bytes: int
    max_bytes: int
    #: Whether new events are refused for want of room (``queue_full``).
    full: bool
    #: Dead letters stored now, and what they take on disk (bodies plus rows, estimated).
    dead_letters: int
    dead_letter_bytes: int

    @property
    def dead_letter_share(self) -> float:
        return self.dead_letter_bytes / self.max_bytes if self.max_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "full": self.full,
            "dead_letters": self.dead_letters,
            "dead_letter_bytes": self.dead_letter_bytes,
            "dead_letter_share": round(self.dead_letter_share, 4),
            "dead_letters_warning": (
                "dead letters take a large share of max_queue_bytes: re-queue "
                "('valmi-sidecar dead-letters retry') or export and purge them"
                if self.dead_letter_share >= DEAD_LETTER_WARN_SHARE
                else None
            ),
        }


#: Dead letters taking this share of the disk budget or more are reported (status, log).
DEAD_LETTER_WARN_SHARE: Final = 0.25


def counts_json(
    c: Counts, *, in_flight: int, max_events: int, max_bytes: int
) -> dict[str, dict[str, int]]:
    """The ``events`` and ``queue`` parts of ``/v1/status``, whether the sidecar runs or
    the figures are read from a stopped sidecar's database."""
    return {
        "events": {
            "received": c.received,
            "queued": c.queued,
            "in_flight": in_flight,
            "delivered": c.delivered,
            "dead_lettered": c.dead_lettered,
            "duplicates": c.duplicates,
        },
        "queue": {
            "events": c.queued,
            "bytes": c.queued_bytes,
            "max_events": max_events,
            "max_bytes": max_bytes,
        },
    }


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    seq: int
    id: str
    idem_key: str
    kind: Kind
    body: bytes
    received_at: float
    dead_at: float
    reason: str
    status: int | None
    detail: str
    attempts: int
    agent_key: str = ""
    event_type: str = ""
    value: float | None = None
    created_at: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (admin API, ``dead-letters export``): the body as JSON."""
        try:
            body: Any = msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            body = self.body.decode("utf-8", "replace")
        return {
            "id": self.id,
            "idempotency_key": self.idem_key,
            "kind": self.kind,
            "agent_key": self.agent_key,
            "event_type": self.event_type,
            "value": self.value,
            "created_at": self.created_at,
            "received_at": self.received_at,
            "dead_at": self.dead_at,
            "reason": self.reason,
            "status": self.status,
            "detail": self.detail,
            "attempts": self.attempts,
            "body": body,
        }


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operation applies to; every field set narrows it.

    ``dead_before`` / ``dead_after`` are Unix times compared with when the event was
    dead-lettered; ``after_seq`` is a cursor for paging.
    """

    reason: str | None = None
    agent_key: str | None = None
    dead_before: float | None = None
    dead_after: float | None = None
    ids: tuple[str, ...] | None = None
    after_seq: int = 0

    def where(self) -> tuple[str, list[Any]]:
        clauses = ["seq > ?"]
        params: list[Any] = [self.after_seq]
        if self.reason is not None:
            clauses.append("reason = ?")
            params.append(self.reason)
        if self.agent_key is not None:
            clauses.append("agent_key = ?")
            params.append(self.agent_key)
        if self.dead_before is not None:
            clauses.append("dead_at < ?")
            params.append(self.dead_before)
        if self.dead_after is not None:
            clauses.append("dead_at >= ?")
            params.append(self.dead_after)
        if self.ids is not None:
            clauses.append("id IN (SELECT value FROM json_each(?))")
            params.append(_json.encode(list(self.ids)).decode())
        return " AND ".join(clauses), params


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One ledger line: the events of one agent key, kind and event type received on one
    UTC day, and where they are now. ``queued = received - delivered - dead_lettered``.
    Values are the summed ``value`` of outcomes (``0`` for actions)."""

    agent_key: str
    kind: str
    event_type: str
    day: str
    received: int
    delivered: int
    dead_lettered: int
    received_value: float
    delivered_value: float
    dead_lettered_value: float

    @property
    def queued(self) -> int:
        return self.received - self.delivered - self.dead_lettered

    @property
    def queued_value(self) -> float:
        return self.received_value - self.delivered_value - self.dead_lettered_value

    def as_dict(self) -> dict[str, Any]:
        outcome = self.kind == "outcome"
        return {
            "day": self.day,
            "agent_key": self.agent_key,
            "kind": self.kind,
            "event_type": self.event_type,
            "received": self.received,
            "queued": self.queued,
            "delivered": self.delivered,
            "dead_lettered": self.dead_lettered,
            "value": {
                "received": _round(self.received_value),
                "queued": _round(self.queued_value),
                "delivered": _round(self.delivered_value),
                "dead_lettered": _round(self.dead_lettered_value),
            }
            if outcome
            else None,
        }


def _round(value: float) -> float:
    """Sums of floats drift in the last bits; the ledger shows 9 significant decimals."""
    return round(value, 9) + 0.0


@dataclass(slots=True)
class StoreStats:
    """What the store did since it opened, for ``/metrics`` (plain counters, event loop only)."""

    received: dict[str, int] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    dead_lettered: dict[tuple[str, str], int] = field(default_factory=dict)
    requeued: int = 0
    purged: int = 0
    salvaged: int = 0
    commit_failures: int = 0
    commit_events: Histogram = field(default_factory=lambda: Histogram(COMMIT_EVENTS_BUCKETS))
    commit_seconds: Histogram = field(default_factory=lambda: Histogram(COMMIT_SECONDS_BUCKETS))
    #: Corrupt databases this store moved aside when it opened (0 or 1).
    corrupt_moved_aside: int = 0
    #: Moved-aside databases in the data directory when it opened.
    corrupt_files: int = 0


@dataclass(frozen=True, slots=True)
class ImportResult:
    imported: int
    duplicates: int
    conflicts: int


_T = TypeVar("_T")

# -- schema ----------------------------------------------------------------------------

#: Forward migrations; ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``
#: (``PRAGMA user_version``). Append, never edit a released one.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        body BLOB NOT NULL,
        size INTEGER NOT NULL,
        agent_key TEXT NOT NULL,
        event_type TEXT NOT NULL,
        value REAL,
        received_at REAL NOT NULL,
        created_at TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE INDEX events_due ON events (next_attempt_at);

    -- One row per event ever accepted, kept for the de-dup window once it left the queue.
    CREATE TABLE keys (
        idem_key TEXT PRIMARY KEY,
        id TEXT NOT NULL,
        fingerprint BLOB NOT NULL,
        created_at TEXT NOT NULL,
        received_at REAL NOT NULL,
        state INTEGER NOT NULL,   -- 0 queued, 1 delivered, 2 dead-lettered
        settled_at REAL
    ) WITHOUT ROWID;
    CREATE INDEX keys_prunable ON keys (received_at) WHERE state != 0;

    CREATE TABLE dead_letters (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        body BLOB NOT NULL,
        agent_key TEXT NOT NULL,
        event_type TEXT NOT NULL,
        value REAL,
        received_at REAL NOT NULL,
        created_at TEXT NOT NULL,
        dead_at REAL NOT NULL,
        reason TEXT NOT NULL,
        status INTEGER,
        detail TEXT NOT NULL,
        attempts INTEGER NOT NULL
    );

    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO counters (name, value) VALUES
        ('received', 0), ('delivered', 0), ('dead_lettered', 0), ('duplicates', 0);
    """,
    # 2: the ledger (per agent key, kind, event type and UTC day of receipt), kept in the
    # same transactions as the events; re-queued dead letters; purge and re-queue counts.
    """
    CREATE TABLE ledger (
        agent_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        event_type TEXT NOT NULL,
        day TEXT NOT NULL,        -- UTC day the sidecar received the event, YYYY-MM-DD
        received INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        dead_lettered INTEGER NOT NULL DEFAULT 0,
        received_value REAL NOT NULL DEFAULT 0,
        delivered_value REAL NOT NULL DEFAULT 0,
        dead_lettered_value REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (agent_key, kind, event_type, day)
    ) WITHOUT ROWID;
    CREATE INDEX ledger_day ON ledger (day);
    CREATE INDEX dead_letters_id ON dead_letters (id);
    ALTER TABLE events ADD COLUMN requeued_at REAL;
    -- What operators did to the dead letters (apart from the counts that reconcile).
    CREATE TABLE operator_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO operator_counters (name, value) VALUES ('requeued', 0), ('purged', 0);
    -- What is still stored goes into the ledger as it is; events delivered before the
    -- ledger existed are gone, so they are one row with empty names and day.
    INSERT INTO ledger (agent_key, kind, event_type, day, received, dead_lettered,
                        received_value, dead_lettered_value)
        SELECT agent_key, kind, event_type, day, count(*), sum(dead), coalesce(sum(value), 0),
               coalesce(sum(CASE WHEN dead THEN value END), 0)
        FROM (SELECT agent_key, kind, event_type, value, 0 AS dead,
                     strftime('%Y-%m-%d', received_at, 'unixepoch') AS day FROM events
              UNION ALL
              SELECT agent_key, kind, event_type, value, 1 AS dead,
                     strftime('%Y-%m-%d', received_at, 'unixepoch') AS day FROM dead_letters)
        GROUP BY agent_key, kind, event_type, day;
    INSERT INTO ledger (agent_key, kind, event_type, day, received, delivered)
        SELECT '', '', '', '', value, value FROM counters WHERE name = 'delivered' AND value > 0;
    """,
    # 3: the de-dup window of a settled key counts from the later of receipt and settling
    # (an event that waited two days in the queue still de-duplicates for a day after).
    """
    DROP INDEX keys_prunable;
    CREATE INDEX keys_remembered_since ON keys (max(received_at, coalesce(settled_at, 0)))
        WHERE state != 0;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: When a key's de-dup window starts: the later of its event's receipt and settling.
_REMEMBERED_SINCE: Final = "max(received_at, coalesce(settled_at, 0))"
#: A key row remembered for a day by every event is about a fifth smaller when it does
#: not repeat what it can derive: its ``id`` is ``''`` when it is the key itself (a key
#: the sidecar made), its ``created_at`` ``''`` when this formatting of ``received_at``
#: gives it (compared as stored, so a formatting that differs is kept as it is).
_CREATED_FROM_RECEIVED: Final = "strftime('%Y-%m-%dT%H:%M:%fZ', {received_at}, 'unixepoch')"
_KEY_ID: Final = "coalesce(nullif(id, ''), idem_key)"
_KEY_CREATED_AT: Final = "coalesce(nullif(created_at, ''), {})".format(
    _CREATED_FROM_RECEIVED.format(received_at="received_at")
)
_SELECT_KEYS: Final = (
    f"SELECT idem_key, {_KEY_ID}, fingerprint, {_KEY_CREATED_AT}, {_REMEMBERED_SINCE}, state"  # noqa: S608 - constant SQL; values are bound
    " FROM keys WHERE idem_key IN (SELECT value FROM json_each(?))"
)
#: A ledger row's deltas are added to the row of the same key and day.
_LEDGER_ADD: Final = (
    " ON CONFLICT (agent_key, kind, event_type, day) DO UPDATE SET"
    " received = received + excluded.received, delivered = delivered + excluded.delivered,"
    " dead_lettered = dead_lettered + excluded.dead_lettered,"
    " received_value = received_value + excluded.received_value,"
    " delivered_value = delivered_value + excluded.delivered_value,"
    " dead_lettered_value = dead_lettered_value + excluded.dead_lettered_value"
)
_UPSERT_LEDGER: Final = (
    "INSERT INTO ledger (agent_key, kind, event_type, day, received, delivered, dead_lettered,"  # noqa: S608 - constant SQL; values are bound
    " received_value, delivered_value, dead_lettered_value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    + _LEDGER_ADD
)
#: What one group transaction writes besides its settlements (new events, their keys, the
#: ledger and the counters) goes through ONE multi-row INSERT into this TEMP view, whose
#: INSTEAD OF triggers do the writes row by row. Python's sqlite3 releases the GIL around
#: every step and reset and must win it back from the busy event loop each time (under
#: load 1-3 ms each); one statement per group, run in autocommit so that its own step also
#: commits (and fsyncs), makes that 2 times instead of about 10. ``op`` selects the row's
#: kind: 0 an event (and its key), 1 a ledger delta, 2 the counters.
_GROUP_WRITE_COLUMNS: Final = (
    "op",
    "seq",
    "id",
    "idem_key",
    "kind",
    "body",
    "size",
    "agent_key",
    "event_type",
    "value",
    "received_at",
    "created_at",
    "fingerprint",
    "day",
    "received",
    "delivered",
    "dead_lettered",
    "received_value",
    "delivered_value",
    "dead_lettered_value",
    "duplicates",
)
_GROUP_WRITE_NCOL: Final = len(_GROUP_WRITE_COLUMNS)
_GROUP_WRITE_DDL: Final = (
    "CREATE TEMP VIEW IF NOT EXISTS group_write AS SELECT "  # noqa: S608 - constant SQL
    + ", ".join(f"NULL AS {c}" for c in _GROUP_WRITE_COLUMNS)
    + """;
    CREATE TEMP TRIGGER IF NOT EXISTS group_write_event INSTEAD OF INSERT ON group_write
    WHEN NEW.op = 0 BEGIN
        INSERT OR REPLACE INTO keys (idem_key, id, fingerprint, created_at, received_at, state)
            VALUES (NEW.idem_key, CASE WHEN NEW.id = NEW.idem_key THEN '' ELSE NEW.id END,
                    NEW.fingerprint,
                    CASE WHEN NEW.created_at = """
    + _CREATED_FROM_RECEIVED.format(received_at="NEW.received_at")
    + """ THEN ''
                         ELSE NEW.created_at END,
                    NEW.received_at, 0);
        INSERT INTO events (seq, id, idem_key, kind, body, size, agent_key, event_type, value,
                            received_at, created_at)
            VALUES (NEW.seq, NEW.id, NEW.idem_key, NEW.kind, NEW.body, NEW.size, NEW.agent_key,
                    NEW.event_type, NEW.value, NEW.received_at, NEW.created_at);
    END;
    CREATE TEMP TRIGGER IF NOT EXISTS group_write_ledger INSTEAD OF INSERT ON group_write
    WHEN NEW.op = 1 BEGIN
        INSERT INTO ledger (agent_key, kind, event_type, day, received, delivered,
                            dead_lettered, received_value, delivered_value, dead_lettered_value)
            VALUES (NEW.agent_key, NEW.kind, NEW.event_type, NEW.day, NEW.received,
                    NEW.delivered, NEW.dead_lettered, NEW.received_value, NEW.delivered_value,
                    NEW.dead_lettered_value)
            """
    + _LEDGER_ADD
    + """;
    END;
    CREATE TEMP TRIGGER IF NOT EXISTS group_write_counters INSTEAD OF INSERT ON group_write
    WHEN NEW.op = 2 BEGIN
        UPDATE counters SET value = value + CASE name WHEN 'received' THEN NEW.received
            WHEN 'delivered' THEN NEW.delivered WHEN 'dead_lettered' THEN NEW.dead_lettered
            WHEN 'duplicates' THEN NEW.duplicates ELSE 0 END;
    END;
    """
)
_GROUP_WRITE_HEAD: Final = f"INSERT INTO group_write ({', '.join(_GROUP_WRITE_COLUMNS)}) VALUES "  # noqa: S608 - constant SQL
_GROUP_WRITE_ROW: Final = "(" + ", ".join("?" * _GROUP_WRITE_NCOL) + ")"
_SELECT_SETTLED: Final = (
    "SELECT seq, idem_key, size, agent_key, kind, event_type, value,"
    " strftime('%Y-%m-%d', received_at, 'unixepoch') FROM events"
    " WHERE seq IN (SELECT value FROM json_each(?))"
)
_BUMP_COUNTER: Final = "UPDATE counters SET value = value + ? WHERE name = ?"
_BUMP_OPERATOR: Final = "UPDATE operator_counters SET value = value + ? WHERE name = ?"
_DL_COLUMNS: Final = (
    "seq, id, idem_key, kind, body, received_at, dead_at, reason, status, detail, attempts,"
    " agent_key, event_type, value, created_at"
)
_DL_REQUEUE_COLUMNS: Final = (
    "seq, id, idem_key, kind, body, agent_key, event_type, value, received_at, created_at,"
    " strftime('%Y-%m-%d', received_at, 'unixepoch')"
)
_INSERT_REQUEUED: Final = (
    "INSERT INTO events (seq, id, idem_key, kind, body, size, agent_key, event_type, value,"
    " received_at, created_at, requeued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: The key of a re-queued dead letter is queued again (never expires while queued); a
#: pruned key row comes back without a fingerprint (a client retry with it gets a 409).
_REQUEUE_KEY: Final = (
    "INSERT INTO keys (idem_key, id, fingerprint, created_at, received_at, state)"  # noqa: S608 - constant SQL; values are bound
    " VALUES (?, ?, x'', ?, ?, 0)"
    " ON CONFLICT (idem_key) DO UPDATE SET state = 0, settled_at = NULL"
    f" WHERE {_KEY_ID} = excluded.id"
)
_LEDGER_COLUMNS: Final = (
    "agent_key, kind, event_type, day, received, delivered, dead_lettered, received_value,"
    " delivered_value, dead_lettered_value"
)
_COUNT_DEAD: Final = "SELECT count(*) FROM dead_letters WHERE "
_SUMMARY: Final = (
    "SELECT reason, count(*), min(dead_at), max(dead_at) FROM dead_letters"
    " GROUP BY reason ORDER BY reason"
)
_INSERT_DEAD: Final = (
    "INSERT OR REPLACE INTO dead_letters (seq, id, idem_key, kind, body, agent_key, event_type,"
    " value, received_at, created_at, dead_at, reason, status, detail, attempts)"
    " SELECT seq, id, idem_key, kind, body, agent_key, event_type, value, received_at,"
    " created_at, ?, ?, ?, ?, attempts + 1 FROM events WHERE seq = ?"
)
_RETRY: Final = (
    "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE seq = ?"
)
_DELETE_EVENTS: Final = "DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?))"
_DELETE_EVENT: Final = "DELETE FROM events WHERE seq = ?"
_SETTLE_KEYS: Final = (
    "UPDATE keys SET state = ?, settled_at = ? WHERE idem_key IN (SELECT value FROM json_each(?))"
)
#: The age of a re-queued dead letter counts from its re-queueing.
_AGE_FROM: Final = "max(received_at, coalesce(requeued_at, 0))"
_OLDEST: Final = f"SELECT seq, {_AGE_FROM} FROM events ORDER BY seq LIMIT 1"  # noqa: S608 - constant SQL; values are bound
_PRUNE: Final = (
    "DELETE FROM keys WHERE idem_key IN (SELECT idem_key FROM keys"  # noqa: S608 - constant SQL; values are bound
    f" WHERE state != 0 AND {_REMEMBERED_SINCE} < ? LIMIT ?)"
)
#: Needs free pages (as a submit does) and leaves nothing behind.
_PROBE: Final = (
    "BEGIN IMMEDIATE; INSERT INTO counters (name, value) VALUES ('probe', zeroblob(65536));"
    " DELETE FROM counters WHERE name = 'probe'; COMMIT;"
)

_MEASURE: Final = (
    "SELECT page_count, freelist_count FROM pragma_page_count(), pragma_freelist_count()"
)

_json: Final = msgspec.json.Encoder()


# -- writer operations -----------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Submit:
    events: Sequence[NewEvent]
    future: asyncio.Future[list[Accepted]]
    #: Look up every key, the sidecar's own too: events that come back (salvage) keep
    #: the keys they were given, and those may be stored already.
    all_keys: bool = False


@dataclass(slots=True, eq=False)
class _Settle:
    settlements: Sequence[Settlement]
    future: asyncio.Future[None]


@dataclass(slots=True, eq=False)
class _Prune:
    """Maintenance, run alone in the writer: delete up to ``PRUNE_CHUNK`` expired keys
    (``cutoff`` is a time), or with ``cutoff=None`` release free pages."""

    cutoff: float | None
    future: asyncio.Future[int]


@dataclass(slots=True, eq=False)
class _Requeue:
    """Operator action, run alone: move up to ``limit`` dead letters back to the queue."""

    filter: DeadLetterFilter
    limit: int
    future: asyncio.Future[int]


@dataclass(slots=True, eq=False)
class _Purge:
    """Operator action, run alone: delete up to ``limit`` dead letters (counts stay)."""

    filter: DeadLetterFilter
    limit: int
    future: asyncio.Future[int]


_Op = _Submit | _Settle | _Prune | _Requeue | _Purge
_SOLO: Final = (_Prune, _Requeue, _Purge)

#: ``(agent_key, kind, event_type, day)`` -> ``[received, delivered, dead_lettered,
#: received_value, delivered_value, dead_lettered_value]``.
_LedgerDelta = dict[tuple[str, str, str, str], list[float]]


#: Ledger columns.
_RECEIVED, _DELIVERED, _DEAD = 0, 1, 2


def _bump(
    delta: _LedgerDelta,
    key: tuple[str, str, str, str],
    col: int,
    value: float | None,
    sign: int = 1,
) -> None:
    row = delta.get(key)
    if row is None:
        row = delta[key] = [0, 0, 0, 0.0, 0.0, 0.0]
    row[col] += sign
    if value is not None:
        row[col + 3] += sign * value


#: Rows per group-write INSERT at most (fewer when SQLite binds fewer values): one statement
#: per size up to it in the statement cache. (Padding to a few sizes with ignored rows was
#: measured: the padding costs more writer CPU than the cache saves.)
_MAX_INSERT_ROWS: Final = 64
#: The writer's statement cache (sqlite3's default is 128): the group-write INSERTs plus
#: everything else the writer runs.
_WRITER_CACHED_STATEMENTS: Final = 256


@functools.cache
def _values_sql(head: str, row: str, n: int) -> str:
    return head + ", ".join([row] * n)


_GROUP_WRITE_INDEX: Final = {name: i for i, name in enumerate(_GROUP_WRITE_COLUMNS)}


def _group_write_row(op: int, **values: Any) -> tuple[Any, ...]:
    """One row of the group-write INSERT: ``op`` and the named columns, NULL elsewhere."""
    row: list[Any] = [None] * _GROUP_WRITE_NCOL
    row[0] = op
    for name, value in values.items():
        row[_GROUP_WRITE_INDEX[name]] = value
    return tuple(row)


def _group_write_rows(event_rows: Sequence[tuple[Any, ...]], plan: _Plan) -> list[tuple[Any, ...]]:
    """The rows of the group-write INSERT: events, ledger deltas, the counters.

    An event row is op 0 then the columns ``seq`` to ``fingerprint`` in order (the hot
    path: built without names); the few others are built by name."""
    tail = (None,) * (_GROUP_WRITE_NCOL - _GROUP_WRITE_INDEX["fingerprint"] - 1)
    rows: list[tuple[Any, ...]] = [(0, *r, *tail) for r in event_rows]
    for (agent_key, kind, event_type, day), d in plan.ledger.items():
        rows.append(
            _group_write_row(
                1,
                agent_key=agent_key,
                kind=kind,
                event_type=event_type,
                day=day,
                received=int(d[0]),
                delivered=int(d[1]),
                dead_lettered=int(d[2]),
                received_value=d[3],
                delivered_value=d[4],
                dead_lettered_value=d[5],
            )
        )
    if plan.received or plan.delivered or plan.dead_lettered or plan.duplicates:
        rows.append(
            _group_write_row(
                2,
                received=plan.received,
                delivered=plan.delivered,
                dead_lettered=plan.dead_lettered,
                duplicates=plan.duplicates,
            )
        )
    return rows


def _write_and_commit(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Write ``rows`` through the group-write view and commit the transaction.

    With no transaction open (no settlements in the group) and rows for one statement,
    that statement runs in autocommit: its own step writes, commits and fsyncs (same
    durability: ``synchronous`` applies to every commit), with one GIL round trip.
    """
    limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _GROUP_WRITE_NCOL
    per = max(1, min(_MAX_INSERT_ROWS, limit))
    if rows and len(rows) <= per and not db.in_transaction:
        isolation = db.isolation_level
        db.isolation_level = None  # no implicit BEGIN: the one INSERT is the transaction
        try:
            _insert_group_rows(db, rows)
        finally:
            db.isolation_level = isolation
        return
    i = 0
    while i < len(rows):
        _insert_group_rows(db, rows[i : i + per])
        i += per
    db.commit()


def _insert_group_rows(db: sqlite3.Connection, chunk: list[tuple[Any, ...]]) -> None:
    sql = _values_sql(_GROUP_WRITE_HEAD, _GROUP_WRITE_ROW, len(chunk))
    db.execute(sql, [v for r in chunk for v in r])


def _count(counts: dict[Any, int], key: Any, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


def _ledger_rows(delta: _LedgerDelta) -> list[tuple[Any, ...]]:
    return [(*key, int(r[0]), int(r[1]), int(r[2]), r[3], r[4], r[5]) for key, r in delta.items()]


#: The last second of year 9999: a receipt time must have a UTC day (the ledger's).
MAX_UNIX_TIME: Final = 253_402_300_799


def salvage_problem(event: NewEvent) -> tuple[str, str] | None:
    """Why a salvaged event cannot be queued again, as ``(field, problem)``; ``None`` when it
    can. A damaged row or a hand-made record may hold what ingest never makes: a receipt
    time with no UTC day (the writer cannot book it) or a key that cannot be a header."""
    if not 0 <= event.received_at <= MAX_UNIX_TIME:  # NaN too
        return "received_at", f"must be a Unix time from 0 to {MAX_UNIX_TIME}"
    problem = check_idempotency_key(event.idem_key)
    if problem is not None:
        return "idempotency_key", problem
    return None


@functools.lru_cache(maxsize=64)
def _day_of(day_number: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day_number * 86400))


def utc_day(ts: float) -> str:
    """The UTC day of a Unix time, ``YYYY-MM-DD`` (as SQLite's ``strftime`` gives it)."""
    return _day_of(int(ts // 86400))


@dataclass(slots=True)
class _Plan:
    """What one group transaction changes, applied to the mirror after ``COMMIT``."""

    results: list[tuple[_Op, Any]] = field(default_factory=list)
    received: int = 0
    queued_bytes: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    removed: int = 0
    removed_bytes: int = 0
    next_seq: int = 0
    oldest: tuple[int, float] | None = None
    oldest_changed: bool = False
    ledger: _LedgerDelta = field(default_factory=dict)
    events: int = 0
    received_kinds: dict[str, int] = field(default_factory=dict)
    delivered_kinds: dict[str, int] = field(default_factory=dict)
    duplicate_kinds: dict[str, int] = field(default_factory=dict)
    dead_by: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Body bytes of the events dead-lettered.
    dead_bytes: int = 0
    #: What the accepted events may add to the database (``disk.event_disk_bytes``).
    disk_added: int = 0
    #: Bytes of the database in use, when measured during this group (before its writes).
    disk_measured: int | None = None
    #: Whether new events are refused for want of room, when this group decided it.
    disk_full: bool | None = None
    #: Bytes of the database in use after the commit, when measured (room freed).
    disk_after: int | None = None


class _Fail:
    """A planned failure of one operation (raised to its caller after the commit)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


# -- the store -------------------------------------------------------------------------


class Store:
    """The durable queue of one data directory. Build it with ``await Store.open(...)``."""

    def __init__(
        self,
        *,
        data_dir: Path,
        lock_fd: int,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        budget: DiskBudget,
        max_queue_events: int,
        dedup_window_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._data_dir = data_dir
        self._path = data_dir / DB_NAME
        self._lock_fd: int | None = lock_fd
        self._writer = writer
        self._reader = reader
        self._budget = budget
        self._max_events = max_queue_events
        self._window_s = dedup_window_s
        self._clock = clock

        self._pending: deque[_Op] = deque()
        self._wakeup = asyncio.Event()
        self._new_events = asyncio.Event()
        self._stopping = False
        self._closing = False
        self._closed = False
        #: What start-up did about integrity: "passed" (``PRAGMA quick_check``), "skipped"
        #: (closed cleanly last time, the file unchanged since) or "off" (not asked).
        self.startup_check = "off"
        self._writable = True
        self._failure: BaseException | None = None
        self._group: list[_Op] = []
        self._writer_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None

        # The mirror of committed state.
        self._received = 0
        self._delivered = 0
        self._dead_lettered = 0
        self._duplicates = 0
        self._queued = 0
        self._queued_bytes = 0
        self._oldest: tuple[int, float] | None = None
        self._next_seq = 1
        self._requeued_at = 0.0
        self._samples: deque[tuple[float, int, int, int]] = deque()
        # The disk: bytes of the database in use as last measured plus what was added
        # since (erring high; measured again when it nears the budget), whether events
        # are refused for want of room, and the dead letters stored (count, body bytes).
        self._disk_used = 0
        self._disk_full = False
        self._wal_path = self._path.with_name(DB_NAME + "-wal")
        #: Writer thread only: the last checkpoint left the WAL past its soft bound.
        self._wal_over = False
        self._dead_stored = 0
        self._dead_bytes = 0

        #: What the store did since it opened, for ``/metrics``.
        self.stats = StoreStats()
        #: Group transactions committed (submits, settles, prunes; probes not counted).
        self.commits = 0
        #: Probe transactions finished (failed or not) while not ``writable``.
        self.probes = 0

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        durability: Literal["full", "normal"] = "full",
        max_queue_bytes: int = 1024**3,
        max_queue_events: int = 5_000_000,
        max_body_bytes: int = 1024 * 1024,
        dedup_window_s: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
        prune_interval_s: float | None = 600.0,
        recover_corrupt: bool = False,
    ) -> Store:
        """Lock ``data_dir``, open (or create and migrate) its database, start the writer.

        Raises ``DataDirLockedError`` when another sidecar uses the directory and
        ``StoreError`` when the database cannot be used (newer schema, no WAL, I/O;
        ``CorruptDatabaseError`` when the file is damaged).
        ``prune_interval_s=None`` turns the periodic prune off (call ``prune()`` yourself).

        ``max_queue_bytes`` bounds every file in ``data_dir`` (``disk.DiskBudget``; the
        largest submission, ``max_body_bytes``, sizes the WAL's share).

        ``recover_corrupt=True`` (the service) first runs ``PRAGMA quick_check``; a damaged
        file is moved aside to ``queue.db.corrupt-<UTC time>`` (with its WAL) and the store
        starts with an empty queue, so that a corrupt disk never makes a crash loop
        (``valmi-sidecar salvage FILE`` re-queues what can be read of it).
        """
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        data_dir = Path(data_dir)
        lock_fd = await asyncio.to_thread(_lock_data_dir, data_dir)
        try:
            clean = await asyncio.to_thread(_take_clean_record, data_dir)
        except BaseException:
            os.close(lock_fd)
            raise
        options: dict[str, Any] = {
            "durability": durability,
            "max_queue_bytes": max_queue_bytes,
            "max_body_bytes": max_body_bytes,
            "max_queue_events": max_queue_events,
            "dedup_window_s": dedup_window_s,
            "clock": clock,
            "check": recover_corrupt and clean is None,
            "clean": clean,
        }
        try:
            try:
                store = await cls._open_database(data_dir, lock_fd, **options)
                moved = None
            except CorruptDatabaseError as exc:
                if not recover_corrupt:
                    raise
                path = data_dir / DB_NAME
                moved = await asyncio.to_thread(_move_aside, path)
                log.error(
                    "database_corrupt",
                    path=str(path),
                    moved_to=str(moved),
                    error=str(exc),
                    action=f"started with an empty queue; run 'valmi-sidecar salvage {moved}' "
                    "to re-queue what can be read of it",
                )
                options |= {"check": True, "clean": None}  # a new, empty file
                store = await cls._open_database(data_dir, lock_fd, **options)
            store.stats.corrupt_moved_aside = int(moved is not None)
            store.stats.corrupt_files = len(await asyncio.to_thread(moved_aside_files, data_dir))
        except BaseException:
            os.close(lock_fd)
            raise
        store._writer_task = asyncio.create_task(store._run_writer(), name="store-writer")
        if prune_interval_s is not None:
            store._prune_task = asyncio.create_task(
                store._run_pruner(prune_interval_s), name="store-prune"
            )
        c = store.counts()
        log.info(
            "store_opened",
            path=str(store._path),
            durability=durability,
            integrity_check=store.startup_check,
            queued=c.queued,
            queued_bytes=c.queued_bytes,
            received=c.received,
            delivered=c.delivered,
            dead_lettered=c.dead_lettered,
            disk_bytes=data_dir_bytes(data_dir),
            max_queue_bytes=max_queue_bytes,
        )
        store._warn_if_budget_short()
        return store

    @classmethod
    async def _open_database(
        cls,
        data_dir: Path,
        lock_fd: int,
        *,
        durability: str,
        max_queue_bytes: int,
        max_body_bytes: int,
        max_queue_events: int,
        dedup_window_s: float,
        clock: Callable[[], float],
        check: bool,
        clean: tuple[int, int] | None,
    ) -> Store:
        """Connect, check, migrate and load; on failure close the connections (not the lock).

        ``clean``: the queue's size from the clean-shutdown record, when it matched."""
        writer: aiosqlite.Connection | None = None
        reader: aiosqlite.Connection | None = None
        path = data_dir / DB_NAME
        try:
            await asyncio.to_thread(_create_private, path)
            writer = await aiosqlite.connect(
                path, isolation_level="IMMEDIATE", cached_statements=_WRITER_CACHED_STATEMENTS
            )
            if check:
                await _quick_check(writer, path)
            rows = await writer.execute_fetchall("PRAGMA page_size")
            budget = DiskBudget.plan(
                max_queue_bytes,
                max_body_bytes=max_body_bytes,
                other_bytes=await asyncio.to_thread(data_dir_bytes, data_dir, exclude=DB_FILES),
                page_size=int(next(iter(rows))[0]),
            )
            await _setup_writer(writer, path, synchronous=durability.upper(), budget=budget)
            reader = await aiosqlite.connect(path, isolation_level=None)
            for pragma in (f"busy_timeout = {BUSY_TIMEOUT_MS}", "query_only = ON"):
                await reader.execute(f"PRAGMA {pragma}")
            await asyncio.to_thread(_chmod_private, path)
            store = cls(
                data_dir=data_dir,
                lock_fd=lock_fd,
                writer=writer,
                reader=reader,
                budget=budget,
                max_queue_events=max_queue_events,
                dedup_window_s=dedup_window_s,
                clock=clock,
            )
            store.startup_check = "passed" if check else "skipped" if clean else "off"
            await store._load(clean)
            await store._in_writer_thread(store._measure_now)
        except BaseException as exc:
            for conn in (reader, writer):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            if isinstance(exc, sqlite3.Error):
                kind = CorruptDatabaseError if is_corruption(exc) else StoreError
                raise kind(f"cannot open {path}: {exc}") from exc
            raise
        return store

    async def _load(self, clean: tuple[int, int] | None) -> None:
        rows = await self._reader.execute_fetchall("SELECT name, value FROM counters")
        values = {str(r[0]): int(r[1]) for r in rows}
        self._received = values["received"]
        self._delivered = values["delivered"]
        self._dead_lettered = values["dead_lettered"]
        self._duplicates = values["duplicates"]
        if clean is not None:
            self._queued, self._queued_bytes = clean
        else:
            rows = await self._reader.execute_fetchall(
                "SELECT count(*), coalesce(sum(size), 0) FROM events"
            )
            for r in rows:
                self._queued, self._queued_bytes = int(r[0]), int(r[1])
        for r in await self._reader.execute_fetchall(_OLDEST):
            self._oldest = (int(r[0]), float(r[1]))
        for r in await self._reader.execute_fetchall(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM dead_letters"
        ):
            self._dead_stored, self._dead_bytes = int(r[0]), int(r[1])
        for r in await self._reader.execute_fetchall(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
        ):
            self._next_seq = int(r[0]) + 1
        if self._received != self._queued + self._delivered + self._dead_lettered:
            log.warning(
                "counts_do_not_reconcile",
                received=self._received,
                queued=self._queued,
                delivered=self._delivered,
                dead_lettered=self._dead_lettered,
            )

    async def close(self) -> None:
        """Refuse new writes, commit what is pending (bounded by ``CLOSE_DRAIN_S``), stop
        the writer and the pruner, close both connections and release the lock."""
        if self._closing:
            return
        self._closing = True
        asked: list[aiosqlite.Connection] = []
        clean = True
        try:
            if self._prune_task is not None:
                self._prune_task.cancel()
                await asyncio.wait({self._prune_task})
            task = self._writer_task
            if task is not None:
                self._stopping = True
                self._wakeup.set()
                await asyncio.wait({task}, timeout=CLOSE_DRAIN_S)
                if not task.done():
                    clean = False
                    log.error(
                        "store_close_timeout", pending=len(self._pending), bound_s=CLOSE_DRAIN_S
                    )
                    task.cancel()
                    await asyncio.wait({task}, timeout=1.0)
            self._fail_all(StoreError("the store is closed"))
            for conn in (self._reader, self._writer):
                asked.append(conn)
                try:
                    await asyncio.wait_for(conn.close(), CONNECTION_CLOSE_S)
                except (sqlite3.Error, ValueError, TimeoutError) as exc:
                    clean = False
                    log.error("store_close_failed", error=f"{type(exc).__name__}: {exc}")
            if clean and self._failure is None and self._writable:
                try:
                    await asyncio.to_thread(
                        _write_clean_record, self._data_dir, self._queued, self._queued_bytes
                    )
                except OSError as exc:  # the next start checks the file: slower, no harm
                    log.warning("clean_record_failed", error=str(exc))
            await asyncio.to_thread(_give_files, self._data_dir)
        finally:
            self._closed = True
            for conn in (self._reader, self._writer):
                if conn not in asked:  # cancelled before closing it (aiosqlite's close()
                    conn.stop()  # stops its thread itself): the thread is not a daemon
            if self._lock_fd is not None:
                fd, self._lock_fd = self._lock_fd, None
                os.close(fd)  # releases the flock
        log.info("store_closed", path=str(self._path), queued=self._queued)

    # -- public surface ------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False after a failed commit (or once the writer stopped) until a commit succeeds."""
        return self._writable and self._failure is None and not self._closed

    @property
    def writer_task(self) -> asyncio.Task[None]:
        """The writer task. It ends only in ``close()``; if it ends otherwise (an unexpected
        exception, which it carries), the store can no longer write: stop the service."""
        assert self._writer_task is not None
        return self._writer_task

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def budget(self) -> DiskBudget:
        """How ``max_queue_bytes`` is shared between the files of the data directory."""
        return self._budget

    @property
    def full(self) -> bool:
        """Whether new events are refused for want of room in the disk budget."""
        return self._disk_full

    def disk(self) -> DiskUsage:
        """The data directory against the disk budget (a few ``stat`` calls, no I/O wait)."""
        return DiskUsage(
            bytes=data_dir_bytes(self._data_dir),
            max_bytes=self._budget.max_bytes,
            full=self._disk_full,
            dead_letters=self._dead_stored,
            dead_letter_bytes=self._dead_letter_disk_bytes(),
        )

    def _warn_if_budget_short(self) -> None:
        problem = self._budget.problem()
        if problem is not None:
            log.error(
                "disk_budget_too_small",
                problem=problem,
                other_files_bytes=self._budget.other_bytes,
                action="raise max_queue_bytes, or remove what else is in the data directory "
                "(salvage, then delete, moved-aside databases)",
            )
        elif self._disk_full:
            log.warning(
                "disk_budget_full",
                max_queue_bytes=self._budget.max_bytes,
                database_in_use=self._disk_used,
                dead_letter_bytes=self._dead_letter_disk_bytes(),
            )

    def database_bytes(self) -> int:
        """Bytes of the database file and its WAL (two ``stat`` calls, no I/O wait)."""
        total = 0
        for p in (self._path, self._path.with_name(self._path.name + "-wal")):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    async def submit(self, events: Sequence[NewEvent]) -> list[Accepted]:
        """Make ``events`` durable, all or nothing; one ``Accepted`` per event, same order.

        Returns after the commit. Raises ``IdempotencyConflictError`` (a key reused with a
        different body), ``QueueFullError`` or ``StoreError``; then nothing was stored.
        """
        return await self._submit(events)

    def submit_soon(self, events: Sequence[NewEvent]) -> asyncio.Future[list[Accepted]]:
        """What ``submit`` does, without a task: the future resolves after the commit (or
        with the same errors). For callers that submit many at once (the ingest workers'
        channel); raises ``StoreError`` at once if the store is closing or stopped."""
        return self._submit_future(events)

    def _submit_future(
        self, events: Sequence[NewEvent], *, all_keys: bool = False
    ) -> asyncio.Future[list[Accepted]]:
        future: asyncio.Future[list[Accepted]] = self._loop_future()
        if events:
            self._enqueue(_Submit(events, future, all_keys))
        else:
            future.set_result([])
        return future

    async def _submit(
        self, events: Sequence[NewEvent], *, all_keys: bool = False
    ) -> list[Accepted]:
        if not events:
            return []
        return await self._submit_future(events, all_keys=all_keys)

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Record the outcome of sending leased events, in one transaction. A settlement
        for an event no longer queued is ignored."""
        if not settlements:
            return
        future: asyncio.Future[None] = self._loop_future()
        self._enqueue(_Settle(settlements, future))
        await future

    async def lease(self, limit: int, exclude: Collection[int]) -> list[QueuedEvent]:
        """Up to ``limit`` due events, oldest first, skipping the seqs in ``exclude``.

        Nothing is marked in the database: an event leased when the process dies is still
        queued at restart and is sent again with the same key.
        """
        if limit <= 0:
            return []
        rows = await self._reader.execute_fetchall(
            f"SELECT seq, id, idem_key, kind, body, {_AGE_FROM}, attempts FROM events"  # noqa: S608 - constant SQL; values are bound
            " WHERE next_attempt_at <= ? ORDER BY seq LIMIT ?",
            (self._clock(), limit + len(exclude)),
        )
        out: list[QueuedEvent] = []
        for r in rows:
            if r[0] in exclude:
                continue
            out.append(QueuedEvent(r[0], r[1], r[2], cast(Kind, r[3]), r[4], r[5], r[6]))
            if len(out) == limit:
                break
        return out

    async def next_due_at(self, exclude: Collection[int]) -> float | None:
        """The earliest ``next_attempt_at`` of the queued events not in ``exclude``."""
        rows = await self._reader.execute_fetchall(
            "SELECT seq, next_attempt_at FROM events ORDER BY next_attempt_at LIMIT ?",
            (len(exclude) + 1,),
        )
        for r in rows:
            if r[0] not in exclude:
                return float(r[1])
        return None

    def counts(self) -> Counts:
        """The committed counts (in memory, no I/O)."""
        return Counts(
            received=self._received,
            queued=self._queued,
            queued_bytes=self._queued_bytes,
            delivered=self._delivered,
            dead_lettered=self._dead_lettered,
            duplicates=self._duplicates,
            oldest_queued_at=None if self._oldest is None else self._oldest[1],
        )

    async def wait_for_events(self) -> None:
        """Return once a commit added events since the previous call returned."""
        await self._new_events.wait()
        self._new_events.clear()

    async def prune(self) -> int:
        """Forget the idempotency keys older than the de-dup window whose events left the
        queue, then give free pages back to the file system. Returns the keys deleted."""
        total = 0
        while True:
            n = await self._maintain(self._clock() - self._window_s)
            total += n
            if n < PRUNE_CHUNK:
                break
        await self._maintain(None)
        if total:
            log.info("keys_pruned", n=total)
        return total

    async def dead_letters(
        self, limit: int = 100, flt: DeadLetterFilter | None = None
    ) -> list[DeadLetterRecord]:
        """Up to ``limit`` dead letters that match ``flt``, oldest event first."""
        sql, params = _dead_letters_query(flt or DeadLetterFilter(), limit)
        return [_dead_letter(r) for r in await self._reader.execute_fetchall(sql, params)]

    async def count_dead_letters(self, flt: DeadLetterFilter) -> int:
        """How many stored dead letters match ``flt``."""
        where, params = flt.where()
        rows = await self._reader.execute_fetchall(_COUNT_DEAD + where, params)
        return int(next(iter(rows))[0])

    async def dead_letter_summary(self) -> list[dict[str, Any]]:
        """Stored dead letters by reason: count, first and last ``dead_at``."""
        return [_summary_row(r) for r in await self._reader.execute_fetchall(_SUMMARY)]

    async def ledger(
        self, agent_key: str | None = None, since: str | None = None, until: str | None = None
    ) -> list[LedgerRow]:
        """The ledger lines, filtered by agent key and UTC day (``YYYY-MM-DD``, inclusive)."""
        sql, params = _ledger_query(agent_key, since, until)
        return [_ledger_row(r) for r in await self._reader.execute_fetchall(sql, params)]

    async def requeue_dead_letters(self, flt: DeadLetterFilter, limit: int) -> int:
        """Move up to ``limit`` matching dead letters back to the queue, with their original
        id and idempotency key; returns how many. Each transaction moves a bounded number
        of bytes (the disk budget's bound on the WAL); raises ``QueueFullError`` when not
        even the first would fit (nothing moved), or returns what moved before one did not."""
        return await self._change_dead_letters(_Requeue, flt, limit)

    async def purge_dead_letters(self, flt: DeadLetterFilter, limit: int) -> int:
        """Delete up to ``limit`` matching dead letters; returns how many. The counts (and
        the ledger) still count them as dead-lettered: only the stored events go."""
        return await self._change_dead_letters(_Purge, flt, limit)

    async def _change_dead_letters(
        self, kind: type[_Requeue | _Purge], flt: DeadLetterFilter, limit: int
    ) -> int:
        done = 0
        while done < limit:
            future: asyncio.Future[int] = self._loop_future()
            self._enqueue(kind(flt, limit - done, future))
            try:
                n = await future
            except QueueFullError:
                if done:
                    break
                raise
            if n == 0:
                break
            done += n
        return done

    async def import_events(self, events: Sequence[NewEvent]) -> ImportResult:
        """Queue events that keep their id, key and receipt time (``salvage``). An event
        whose key is known with the same body is a duplicate (not stored again); with a
        different body, a conflict (skipped). Raises ``QueueFullError``/``StoreError``."""
        try:
            accepted = await self._submit(events, all_keys=True)
        except IdempotencyConflictError:
            # One at a time decides which ones conflict; they still share group commits.
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(self._import_one(e)) for e in events]
            except ExceptionGroup as group:
                raise group.exceptions[0] from group
            outcomes = [t.result() for t in tasks]
        else:
            outcomes = ["duplicate" if a.duplicate else "imported" for a in accepted]
        result = ImportResult(
            imported=outcomes.count("imported"),
            duplicates=outcomes.count("duplicate"),
            conflicts=outcomes.count("conflict"),
        )
        self.stats.salvaged += result.imported
        return result

    async def _import_one(self, event: NewEvent) -> str:
        try:
            (accepted,) = await self._submit([event], all_keys=True)
        except IdempotencyConflictError:
            return "conflict"
        return "duplicate" if accepted.duplicate else "imported"

    def rates(self) -> dict[str, float | None]:
        """Events a second over about the last minute (received, delivered, dead-lettered);
        ``None`` until two samples a second apart exist."""
        self._sample()
        if len(self._samples) < 2:
            return dict.fromkeys(("received", "delivered", "dead_lettered"), None)
        t0, r0, d0, x0 = self._samples[0]
        t1, r1, d1, x1 = self._samples[-1]
        span = t1 - t0
        return {
            "received": round((r1 - r0) / span, 3),
            "delivered": round((d1 - d0) / span, 3),
            "dead_lettered": round((x1 - x0) / span, 3),
        }

    def _sample(self) -> None:
        now = time.monotonic()
        samples = self._samples
        if samples and now - samples[-1][0] < RATE_SAMPLE_S:
            return
        dead_total = sum(self.stats.dead_lettered.values())
        samples.append((now, self._received, self._delivered, dead_total))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()

    # -- the writer ----------------------------------------------------------------------

    def _loop_future(self) -> asyncio.Future[Any]:
        if self._closing:
            raise StoreError("the store is closing")
        if self._failure is not None:
            raise StoreError(f"the store's writer stopped: {self._failure!r}")
        return asyncio.get_running_loop().create_future()

    async def _maintain(self, cutoff: float | None) -> int:
        future: asyncio.Future[int] = self._loop_future()
        self._enqueue(_Prune(cutoff, future))
        return await future

    def _enqueue(self, op: _Op) -> None:
        self._pending.append(op)
        self._wakeup.set()

    async def _run_writer(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._stopping:
                        return
                    self._wakeup.clear()
                    if self._writable:
                        await self._wakeup.wait()
                    else:
                        try:
                            await asyncio.wait_for(self._wakeup.wait(), PROBE_INTERVAL_S)
                        except TimeoutError:
                            await self._probe()
                    continue
                group = self._group = self._take_group()
                if group:
                    first = group[0]
                    if isinstance(first, _Prune):
                        await self._commit_prune(first)
                    elif isinstance(first, _Requeue | _Purge):
                        await self._commit_operator(first)
                    else:
                        await self._commit_group(group)
                self._group = []
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self._failure = exc
                log.error("store_writer_crashed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._fail_all(StoreError("the store's writer stopped"))

    def _take_group(self) -> list[_Op]:
        """Pending operations for one transaction: a prune alone, else submits and settles
        up to ``MAX_GROUP_EVENTS`` events. Operations whose caller gave up are dropped."""
        group: list[_Op] = []
        n = 0
        # Body bytes of the group's submissions: one transaction's WAL stays within the
        # disk budget's bound (a single submission is never split).
        body_bytes = 0
        pending = self._pending
        while pending and n < MAX_GROUP_EVENTS:
            op = pending[0]
            if isinstance(op, _SOLO):
                if group:
                    break
                pending.popleft()
                if not op.future.done():
                    return [op]
                continue
            if isinstance(op, _Submit):
                size = sum(len(e.body) for e in op.events)
                if group and body_bytes + size > self._budget.group_body_bytes:
                    break
            else:
                size = 0
            pending.popleft()
            if op.future.done():
                continue  # cancelled by its caller: not stored, nobody waits for it
            assert isinstance(op, _Submit | _Settle)
            group.append(op)
            body_bytes += size
            n += len(op.events) if isinstance(op, _Submit) else len(op.settlements)
        return group

    def _fail_all(self, error: StoreError) -> None:
        """Fail every operation still waiting: with ``error`` those never written, with
        ``OutcomeUnknownError`` those of the transaction in progress (its thread may
        still commit it)."""
        unknown = OutcomeUnknownError(f"{error} in the middle of a commit")
        for op in self._group:
            if not op.future.done():
                op.future.set_exception(unknown)
        for op in self._pending:
            if not op.future.done():
                op.future.set_exception(error)
        self._group = []
        self._pending.clear()

    async def _in_writer_thread(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` with the writer's sqlite3 connection on the writer's own thread.

        One trip to the thread for a whole transaction, instead of one per statement:
        under load each trip back waits behind the requests the event loop is serving
        (measured: 6 trips made a 0.6 ms commit take 9 ms). aiosqlite has no public call
        for it; ``_execute`` and ``_conn`` are its internals, stable since 2019, and the
        version range in pyproject.toml is the one tested.
        """
        db = self._writer
        result: _T = await db._execute(lambda: fn(db._conn))  # type: ignore[no-untyped-call]
        return result

    async def _commit_group(self, group: list[_Op]) -> None:
        started = time.monotonic()
        try:
            plan = await self._in_writer_thread(functools.partial(self._write_group, group))
        except sqlite3.Error as exc:
            self.stats.commit_failures += 1
            await self._rollback(exc, len(group))
            error = StoreError(f"could not commit to {self._path}: {exc}")
            error.__cause__ = exc
            for op in group:
                if not op.future.done():
                    op.future.set_exception(error)
            return
        self._committed()
        stats = self.stats
        stats.commit_seconds.observe(time.monotonic() - started)
        stats.commit_events.observe(plan.events)
        for counts, into in (
            (plan.received_kinds, stats.received),
            (plan.delivered_kinds, stats.delivered),
            (plan.duplicate_kinds, stats.duplicates),
        ):
            for kind, n in counts.items():
                _count(into, kind, n)
        for key, n in plan.dead_by.items():
            _count(stats.dead_lettered, key, n)
        self._received += plan.received
        self._queued += plan.received - plan.removed
        self._queued_bytes += plan.queued_bytes - plan.removed_bytes
        self._delivered += plan.delivered
        self._dead_lettered += plan.dead_lettered
        self._duplicates += plan.duplicates
        self._next_seq = plan.next_seq
        if plan.oldest_changed:
            self._oldest = plan.oldest
        if plan.dead_lettered:
            self._add_dead_letters(plan.dead_lettered, plan.dead_bytes)
        self._apply_disk(plan)
        if plan.received:
            self._new_events.set()
        for op, result in plan.results:
            if op.future.done():
                continue
            if isinstance(result, _Fail):
                op.future.set_exception(result.error)
            else:
                op.future.set_result(result)

    def _apply_disk(self, plan: _Plan) -> None:
        """The mirror of the disk after a group commit."""
        was_full = self._disk_full
        if plan.disk_after is not None:
            self._disk_used = plan.disk_after
        else:
            if plan.disk_measured is not None:
                self._disk_used = plan.disk_measured
            self._disk_used += plan.disk_added
        refused = plan.disk_full if plan.disk_after is None else None
        self._disk_full = self._full_after(was_full, refused=bool(refused))
        if self._disk_full and not was_full:
            log.warning(
                "disk_budget_full",
                max_queue_bytes=self._budget.max_bytes,
                database_in_use=self._disk_used,
                dead_letter_bytes=self._dead_letter_disk_bytes(),
            )
        elif was_full and not self._disk_full:
            log.info("disk_budget_room_again", database_in_use=self._disk_used)

    def _full_after(self, was_full: bool, *, refused: bool) -> bool:
        """Whether the store is full now (``/readyz``): a submission was just refused for
        room, or too little is left; once full, until a fair amount is free again, so that
        it does not flap while small events still fit between refused large ones."""
        room = self._budget.intake_bytes - self._disk_used
        return refused or room < (ROOM_AGAIN_BYTES if was_full else FULL_ROOM_BYTES)

    def _add_dead_letters(self, n: int, body_bytes: int) -> None:
        before = self._dead_letter_disk_bytes()
        self._dead_stored += n
        self._dead_bytes += body_bytes
        after = self._dead_letter_disk_bytes()
        warn_at = self._budget.max_bytes * DEAD_LETTER_WARN_SHARE
        if before < warn_at <= after:
            log.warning(
                "dead_letters_fill_the_disk",
                dead_letters=self._dead_stored,
                dead_letter_bytes=after,
                max_queue_bytes=self._budget.max_bytes,
                action="fix the cause, then 'valmi-sidecar dead-letters retry', or export "
                "and purge them: they keep their room until then",
            )

    def _dead_letter_disk_bytes(self) -> int:
        return self._dead_bytes + self._dead_stored * DEAD_LETTER_OVERHEAD_BYTES

    def _write_group(self, group: list[_Op], db: sqlite3.Connection) -> _Plan:
        """Run the statements of one group and commit, on the writer's thread; return
        what they changed. The event loop applies the plan once this returns."""
        plan = _Plan(next_seq=self._next_seq, oldest=self._oldest)
        submits = [op for op in group if isinstance(op, _Submit)]
        settles = [op for op in group if isinstance(op, _Settle)]

        event_rows: list[tuple[Any, ...]] = []
        if submits:
            # Only a client's own key can be stored already: a key the sidecar made is the
            # event's new id (time plus 64 random bits), so looking it up finds nothing;
            # unless the event comes back (salvage) with the key it was given then.
            keys = [
                e.idem_key for op in submits for e in op.events if op.all_keys or e.idem_key != e.id
            ]
            known: dict[str, tuple[Any, ...]] = {}
            if keys:
                rows = db.execute(_SELECT_KEYS, (_json.encode(keys).decode(),)).fetchall()
                known = {r[0]: tuple(r) for r in rows}
            if self._wal_over:  # the last checkpoint could not finish: try again first
                self._checkpoint_if_big(db)
            self._plan_submits(db, submits, plan, event_rows, known)
        for op in settles:
            plan.results.append((op, None))
        if settles:
            self._write_settles(db, settles, plan)
        # After the settlements, which may have removed every older event: the new events
        # are written last, so they are the oldest only when nothing older is left.
        if event_rows and plan.oldest is None:
            plan.oldest = (event_rows[0][0], event_rows[0][9])
            plan.oldest_changed = True
        _write_and_commit(db, _group_write_rows(event_rows, plan))
        # Committed: from here on nothing may fail the group's operations.
        try:
            self._checkpoint_if_big(db)
            if plan.removed and (self._disk_full or plan.disk_full):
                plan.disk_after = self._measure(db)  # room again for new events?
        except sqlite3.Error as exc:
            self._wal_over = True
            log.warning("checkpoint_failed", error=str(exc))
        return plan

    # -- the disk budget (on the writer's thread) -----------------------------------------

    def _measure(self, db: sqlite3.Connection) -> int:
        """Bytes of the database in use now: its pages less the free ones."""
        pages, free = db.execute(_MEASURE).fetchone()
        return (int(pages) - int(free)) * self._budget.page_size

    def _measure_now(self, db: sqlite3.Connection) -> None:
        """Measure and set the mirror (at open, and after maintenance, which runs alone)."""
        self._disk_used = self._measure(db)
        self._disk_full = self._full_after(self._disk_full, refused=False)

    def _checkpoint_if_big(self, db: sqlite3.Connection) -> None:
        """Checkpoint and truncate the WAL once a commit left it past its soft bound (a
        reader in the middle of a long read can hold it; then ``_wal_over`` stays set and
        new events wait, see ``_room_for``)."""
        if file_bytes(self._wal_path) <= self._budget.wal_soft_bytes:
            self._wal_over = False
            return
        # Without waiting for readers: a long read (a 'check' of the file) must not stall
        # every commit behind it; new events wait instead until the WAL can be cut.
        db.execute("PRAGMA busy_timeout = 0")
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._wal_over = file_bytes(self._wal_path) > self._budget.wal_soft_bytes
        if self._wal_over:
            log.warning(
                "wal_checkpoint_blocked",
                wal_bytes=file_bytes(self._wal_path),
                bound=self._budget.wal_soft_bytes,
            )

    def _room_for(self, db: sqlite3.Connection, plan: _Plan, need: int) -> QueueFullError | None:
        """Whether events that may take ``need`` bytes fit in the disk budget after what
        this group accepted so far: ``None`` (then counted in the plan) or the refusal. The
        database is measured only when the mirror, which errs high, says they do not fit."""
        budget = self._budget
        used = self._disk_used if plan.disk_measured is None else plan.disk_measured
        if used + plan.disk_added + need > budget.intake_bytes and plan.disk_measured is None:
            used = plan.disk_measured = self._measure(db)
        if self._wal_over:
            plan.disk_full = True
            return QueueFullError(
                f"the WAL of {self._path} could not be checkpointed (a long read holds it), "
                f"and max_queue_bytes={budget.max_bytes} leaves it no more room; retry later",
                QUEUE_FULL_RETRY_AFTER_S,
            )
        if used + plan.disk_added + need > budget.intake_bytes:
            plan.disk_full = True
            return QueueFullError(
                f"the data directory is at its disk budget, max_queue_bytes={budget.max_bytes}: "
                f"{used + plan.disk_added} of the {budget.intake_bytes} bytes the database "
                "keeps for events, keys and dead letters are in use; retry later (forwarding "
                "frees room; dead letters keep theirs until re-queued or purged)",
                QUEUE_FULL_RETRY_AFTER_S,
            )
        plan.disk_added += need
        plan.disk_full = False
        return None

    def _plan_submits(
        self,
        db: sqlite3.Connection,
        submits: list[_Submit],
        plan: _Plan,
        event_rows: list[tuple[Any, ...]],
        known: dict[str, tuple[Any, ...]],
    ) -> None:
        cutoff = self._clock() - self._window_s
        # Keys stored by earlier submissions of this group: key -> (id, fingerprint, created_at).
        group_keys: dict[str, tuple[str, bytes, str]] = {}
        queued = self._queued
        queued_bytes = self._queued_bytes
        seq = plan.next_seq
        for op in submits:
            accepted: list[Accepted] = []
            mine: dict[str, tuple[str, bytes, str]] = {}
            new: list[NewEvent] = []
            new_bytes = 0
            dups: list[str] = []
            failure: Exception | None = None
            for e in op.events:
                k = e.idem_key
                prior = mine.get(k) or group_keys.get(k)
                if prior is None and k in known:
                    _, pid, pfp, pcreated, since, pstate = known[k]
                    if pstate == QUEUED or since >= cutoff:
                        prior = (pid, pfp, pcreated)
                if prior is None:
                    mine[k] = (e.id, e.fingerprint, e.created_at)
                    new.append(e)
                    new_bytes += len(e.body)
                    accepted.append(Accepted(e.id, e.created_at, duplicate=False))
                elif prior[1] == e.fingerprint:
                    dups.append(e.kind)
                    accepted.append(Accepted(prior[0], prior[2], duplicate=True))
                else:
                    failure = IdempotencyConflictError(k)
                    break
            if failure is None and new:
                if queued + len(new) > self._max_events:
                    failure = QueueFullError(
                        f"{queued} events queued, limit max_queue_events={self._max_events}",
                        QUEUE_FULL_RETRY_AFTER_S,
                    )
                else:
                    failure = self._room_for(
                        db, plan, sum(event_disk_bytes(len(e.body)) for e in new)
                    )
            if failure is not None:
                plan.results.append((op, _Fail(failure)))
                continue
            group_keys.update(mine)
            queued += len(new)
            queued_bytes += new_bytes
            plan.duplicates += len(dups)
            plan.events += len(op.events)
            for kind in dups:
                _count(plan.duplicate_kinds, kind)
            for e in new:
                _count(plan.received_kinds, e.kind)
                _bump(
                    plan.ledger,
                    (e.agent_key, e.kind, e.event_type, utc_day(e.received_at)),
                    _RECEIVED,
                    e.value,
                )
                event_rows.append(
                    (
                        seq,
                        e.id,
                        e.idem_key,
                        e.kind,
                        e.body,
                        len(e.body),
                        e.agent_key,
                        e.event_type,
                        e.value,
                        e.received_at,
                        e.created_at,
                        e.fingerprint,
                    )
                )
                seq += 1
            plan.results.append((op, accepted))
        plan.received = queued - self._queued
        plan.queued_bytes = queued_bytes - self._queued_bytes
        plan.next_seq = seq

    def _write_settles(self, db: sqlite3.Connection, settles: list[_Settle], plan: _Plan) -> None:
        seqs = [s.seq for op in settles for s in op.settlements]
        rows = db.execute(_SELECT_SETTLED, (_json.encode(seqs).decode(),)).fetchall()
        present: dict[int, tuple[Any, ...]] = {int(r[0]): tuple(r[1:]) for r in rows}
        plan.events += len(seqs)
        now = self._clock()
        dead_rows: list[tuple[Any, ...]] = []
        retry_rows: list[tuple[Any, ...]] = []
        deleted: list[int] = []
        delivered: list[int] = []
        settled_keys: dict[int, list[str]] = {DELIVERED: [], DEAD: []}
        for op in settles:
            for s in op.settlements:
                found = present.get(s.seq)
                if found is None:
                    continue  # no longer queued (settled before, or settled twice here)
                if isinstance(s, Retry):
                    retry_rows.append((s.next_attempt_at, s.error, s.seq))
                    continue
                del present[s.seq]
                # found: idem_key, size, agent_key, kind, event_type, value, day
                ledger_key = (found[2], found[3], found[4], found[6])
                if isinstance(s, Delivered):
                    delivered.append(s.seq)
                    plan.delivered += 1
                    settled_keys[DELIVERED].append(found[0])
                    _bump(plan.ledger, ledger_key, _DELIVERED, found[5])
                    _count(plan.delivered_kinds, found[3])
                else:
                    plan.dead_lettered += 1
                    settled_keys[DEAD].append(found[0])
                    dead_rows.append((now, s.reason, s.status, s.detail, s.seq))
                    plan.dead_bytes += found[1]
                    _bump(plan.ledger, ledger_key, _DEAD, found[5])
                    _count(plan.dead_by, (found[3], s.reason))
                deleted.append(s.seq)
                plan.removed_bytes += found[1]
        if retry_rows:
            db.executemany(_RETRY, retry_rows)
        if delivered:
            # One statement (not one per row): the writer thread takes the GIL back after
            # every SQLite step, and each time it may have to wait for the loop.
            db.execute(_DELETE_EVENTS, (_json.encode(delivered).decode(),))
        for row in dead_rows:
            # One at a time, after the deliveries: each dead letter reuses the pages the
            # ones before it freed, so the database grows by one event at most, within the
            # disk budget's reserve, even when it is full.
            db.execute(_INSERT_DEAD, row)
            db.execute(_DELETE_EVENT, (row[-1],))
        if deleted:
            for state, keys in settled_keys.items():
                if keys:
                    db.execute(_SETTLE_KEYS, (state, now, _json.encode(keys).decode()))
            plan.removed = len(deleted)
            if plan.oldest is not None and plan.oldest[0] in deleted:
                plan.oldest = None
                for r in db.execute(_OLDEST).fetchall():
                    plan.oldest = (int(r[0]), float(r[1]))
                plan.oldest_changed = True

    async def _commit_operator(self, op: _Requeue | _Purge) -> None:
        """Re-queue or purge dead letters in one transaction of their own."""
        db = self._writer
        where, params = op.filter.where()
        try:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_DL_REQUEUE_COLUMNS} FROM dead_letters WHERE {where}"  # noqa: S608 - constant SQL; values are bound
                    " ORDER BY seq LIMIT ?",
                    (*params, op.limit),
                )
            )
            if not rows:
                op.future.set_result(0)
                return
            # One transaction's WAL within the disk budget's bound: the rest of the
            # request goes in the next (_change_dead_letters() loops).
            rows = _within_bytes(rows, SETTLE_DEAD_BYTES)
            if isinstance(op, _Purge):
                await db.executemany(
                    "DELETE FROM dead_letters WHERE seq = ?", [(r[0],) for r in rows]
                )
                await db.execute(_BUMP_OPERATOR, (len(rows), "purged"))
                await db.commit()
            else:
                used = await self._in_writer_thread(self._measure)
                failure = self._requeue_limit(rows, used)
                if failure is not None:
                    op.future.set_exception(failure)
                    return
                await self._write_requeue(rows)
                await db.commit()
        except sqlite3.Error as exc:
            self.stats.commit_failures += 1
            await self._rollback(exc, 1)
            error = StoreError(f"could not change the dead letters in {self._path}: {exc}")
            error.__cause__ = exc
            if not op.future.done():
                op.future.set_exception(error)
            return
        self._committed()
        n = len(rows)
        self._dead_stored -= n
        self._dead_bytes -= sum(len(r[4]) for r in rows)
        if isinstance(op, _Purge):
            self.stats.purged += n
            log.info("dead_letters_purged", n=n)
        else:
            first_seq = self._next_seq
            self._next_seq += n
            self._dead_lettered -= n
            self._queued += n
            self._queued_bytes += sum(len(r[4]) for r in rows)
            if self._oldest is None:
                self._oldest = (first_seq, self._requeued_at)
            self.stats.requeued += n
            self._new_events.set()
            log.info("dead_letters_requeued", n=n)
        await self._after_solo()
        if not op.future.done():
            op.future.set_result(n)

    def _requeue_limit(self, rows: list[Any], used: int) -> QueueFullError | None:
        """A re-queued dead letter leaves its row for an event row of about the same size:
        it needs little room, and may use half the reserve (an operator freeing room)."""
        n = len(rows)
        budget = self._budget
        room = budget.intake_bytes + budget.reserve_bytes // 2 - used
        if self._queued + n > self._max_events or n * EVENT_OVERHEAD_BYTES > room:
            return QueueFullError(
                f"re-queueing {n} dead letters would pass the queue's limit "
                f"({self._queued} of {self._max_events} events queued; {used} bytes of the "
                f"database in use, max_queue_bytes={budget.max_bytes}); retry fewer or later",
                QUEUE_FULL_RETRY_AFTER_S,
            )
        return None

    async def _after_solo(self) -> None:
        """After a transaction of its own (maintenance, an operator's), committed: bound
        the WAL and measure the database again (nothing of it may fail the operation)."""

        def run(db: sqlite3.Connection) -> None:
            self._checkpoint_if_big(db)
            self._measure_now(db)

        was_full = self._disk_full
        try:
            await self._in_writer_thread(run)
        except sqlite3.Error as exc:
            log.warning("checkpoint_failed", error=str(exc))
            return
        if was_full and not self._disk_full:
            log.info("disk_budget_room_again", database_in_use=self._disk_used)

    async def _write_requeue(self, rows: list[Any]) -> None:
        """A re-queued dead letter keeps its id, idempotency key and receipt time, gets a
        new place at the end of the queue, and its age restarts (``requeued_at``). It moves
        from dead-lettered to queued in the counters and in the ledger; received is
        unchanged, so the counts still reconcile."""
        db = self._writer
        now = self._requeued_at = self._clock()
        seq = self._next_seq
        event_rows: list[tuple[Any, ...]] = []
        key_rows: list[tuple[Any, ...]] = []
        delta: _LedgerDelta = {}
        for i, r in enumerate(rows):
            # r: seq, id, idem_key, kind, body, agent_key, event_type, value, received_at,
            # created_at, day
            event_rows.append(
                (seq + i, r[1], r[2], r[3], r[4], len(r[4]), r[5], r[6], r[7], r[8], r[9], now)
            )
            key_rows.append((r[2], r[1], r[9], r[8]))
            _bump(delta, (r[5], r[3], r[6], r[10]), _DEAD, r[7], sign=-1)
        # Deleted first: the events reuse the pages the dead letters leave.
        await db.executemany("DELETE FROM dead_letters WHERE seq = ?", [(r[0],) for r in rows])
        await db.executemany(_INSERT_REQUEUED, event_rows)
        await db.executemany(_REQUEUE_KEY, key_rows)
        await db.executemany(_UPSERT_LEDGER, _ledger_rows(delta))
        await db.execute(_BUMP_COUNTER, (-len(rows), "dead_lettered"))
        await db.execute(_BUMP_OPERATOR, (len(rows), "requeued"))

    async def _commit_prune(self, op: _Prune) -> None:
        try:
            if op.cutoff is None:
                n = await self._vacuum()
            else:
                cursor = await self._writer.execute(_PRUNE, (op.cutoff, PRUNE_CHUNK))
                n = cursor.rowcount
                await self._writer.commit()
        except sqlite3.Error as exc:
            await self._rollback(exc, 1)
            error = StoreError(f"could not prune {self._path}: {exc}")
            error.__cause__ = exc
            if not op.future.done():
                op.future.set_exception(error)
            return
        self._committed()
        await self._after_solo()
        if not op.future.done():
            op.future.set_result(n)

    async def _vacuum(self) -> int:
        """Give free pages beyond ``VACUUM_KEEP_PAGES`` back to the file system, in small
        steps (one big ``incremental_vacuum`` pushes far more pages through the WAL).
        Returns the pages released. Runs in autocommit mode, each step its own transaction."""
        rows = await self._writer.execute_fetchall("PRAGMA freelist_count")
        free = int(next(iter(rows))[0])
        released = 0
        keep = min(VACUUM_KEEP_PAGES, self._budget.max_pages // 16)
        while free - released > keep and not self._stopping:
            step = min(VACUUM_STEP_PAGES, free - released - keep)
            # executescript, not execute: the pragma frees one page per step of the
            # statement, and sqlite3's execute() steps a column-less statement only once.
            await self._writer.executescript(f"PRAGMA incremental_vacuum({step});")
            released += step
        if released:
            log.info("store_vacuumed", pages=released)
        return released

    async def _rollback(self, exc: sqlite3.Error, ops: int) -> None:
        self._writable = False
        log.error("commit_failed", error=str(exc), ops=ops, path=str(self._path))
        try:
            await self._writer.rollback()
        except sqlite3.Error as rb_exc:
            log.error("rollback_failed", error=str(rb_exc))

    def _committed(self) -> None:
        self.commits += 1
        self._sample()
        if not self._writable:
            self._writable = True
            log.info("store_writable_again", path=str(self._path))

    async def _probe(self) -> None:
        try:
            await self._writer.executescript(_PROBE)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                await self._writer.rollback()
            self.probes += 1
            log.debug("store_probe_failed", error=str(exc))
            return
        self.probes += 1
        self._writable = True
        log.info("store_writable_again", path=str(self._path))

    async def _run_pruner(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.prune()
            except StoreError as exc:
                log.error("prune_failed", error=str(exc))
            except Exception as exc:  # a bug in one prune must not end pruning; logged
                log.error("prune_crashed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)


# -- queries shared by the store and the read-only database -------------------------------


def _within_bytes(rows: list[Any], limit: int) -> list[Any]:
    """The first dead-letter rows (body at index 4) whose bytes fit in ``limit``; one at least."""
    total = 0
    for i, r in enumerate(rows):
        total += len(r[4]) + DEAD_LETTER_OVERHEAD_BYTES
        if total > limit and i:
            return rows[:i]
    return rows


def _dead_letters_query(flt: DeadLetterFilter, limit: int) -> tuple[str, list[Any]]:
    where, params = flt.where()
    return (
        f"SELECT {_DL_COLUMNS} FROM dead_letters WHERE {where} ORDER BY seq LIMIT ?",  # noqa: S608 - constant SQL; values are bound
        [*params, limit],
    )


def _dead_letter(r: Any) -> DeadLetterRecord:
    return DeadLetterRecord(
        r[0], r[1], r[2], cast(Kind, r[3]), bytes(r[4]), r[5], r[6], r[7], r[8], r[9], r[10],
        r[11], r[12], r[13], r[14],
    )  # fmt: skip


def _summary_row(r: Any) -> dict[str, Any]:
    return {"reason": r[0], "count": r[1], "first_dead_at": r[2], "last_dead_at": r[3]}


def _ledger_query(
    agent_key: str | None, since: str | None, until: str | None
) -> tuple[str, list[Any]]:
    clauses = ["1"]
    params: list[Any] = []
    for clause, value in (("agent_key = ?", agent_key), ("day >= ?", since), ("day <= ?", until)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (
        f"SELECT {_LEDGER_COLUMNS} FROM ledger WHERE {' AND '.join(clauses)}"  # noqa: S608 - constant SQL; values are bound
        " ORDER BY day, agent_key, kind, event_type",
        params,
    )


def _ledger_row(r: Any) -> LedgerRow:
    return LedgerRow(
        r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), float(r[7]), float(r[8]),
        float(r[9]),
    )  # fmt: skip


# -- read-only access, corrupt databases and salvage (blocking: CLI, or to_thread) -------

#: SQLite's primary result codes that mean the file is damaged, not the disk busy or full.
_CORRUPT_CODES: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
MOVED_ASIDE_MARK: Final = ".corrupt-"


class CorruptDatabaseError(StoreError):
    """The database file is damaged (SQLITE_CORRUPT, SQLITE_NOTADB, or an integrity check
    that found problems)."""


def is_corruption(exc: BaseException) -> bool:
    """Whether a ``sqlite3`` error says the file is damaged."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.DatabaseError)
        and code is not None
        and code & 0xFF in _CORRUPT_CODES
    )


def integrity_check(conn: sqlite3.Connection, *, quick: bool = False) -> list[str]:
    """``PRAGMA integrity_check`` (or ``quick_check``): the problems found, ``[]`` when ok.
    Raises ``CorruptDatabaseError`` when the check itself cannot read the file."""
    pragma = "quick_check" if quick else "integrity_check"
    try:
        rows = conn.execute(f"PRAGMA {pragma}").fetchall()
    except sqlite3.DatabaseError as exc:
        if is_corruption(exc):
            raise CorruptDatabaseError(f"{pragma}: {exc}") from exc
        raise
    problems = [str(r[0]) for r in rows]
    return [] if problems == ["ok"] else problems


class ReadOnlyDatabase:
    """A query-only connection to a database file, for the command line when no sidecar
    runs (and for ``check`` and ``salvage`` at any time). Never migrates or writes; under
    WAL it sees everything committed, a running sidecar's commits included.

    ``untouched=True`` (a moved-aside file) leaves the file's directory as it was: SQLite
    reads it as immutable, with no -wal or -shm created beside it; a file with a WAL of
    its own is read from a private copy of both instead, since an immutable database
    ignores its WAL."""

    def __init__(self, path: Path, *, untouched: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"no database at {self.path}")
        self._copy_dir: Path | None = None
        uri = self.path.resolve().as_uri() + "?mode=ro"
        if untouched:
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.is_file() and wal.stat().st_size > 0:
                self._copy_dir = _private_copy(self.path, wal)
                uri = (self._copy_dir / DB_NAME).as_uri() + "?mode=ro"
            else:
                uri += "&immutable=1"
        try:
            # Used from one thread at a time (the CLI hands salvage chunks to a worker).
            self._conn = sqlite3.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
        except sqlite3.Error as exc:
            self._remove_copy()
            raise StoreError(f"cannot open {self.path} read-only: {exc}") from exc
        try:
            if untouched:
                # A file shorter than its header says (truncated) is then read as far as
                # it goes instead of refused whole; the connection cannot write anyway.
                self._conn.execute("PRAGMA writable_schema = ON")
            self.version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            # The schema is read once, here: without it nothing in the file can be read.
            self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            self.close()
            cls = CorruptDatabaseError if is_corruption(exc) else StoreError
            raise cls(f"cannot read {self.path}: {exc}") from exc

    def __enter__(self) -> ReadOnlyDatabase:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()
        self._remove_copy()

    def _remove_copy(self) -> None:
        if self._copy_dir is not None:
            shutil.rmtree(self._copy_dir, ignore_errors=True)
            self._copy_dir = None

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            cls = CorruptDatabaseError if is_corruption(exc) else StoreError
            raise cls(f"cannot read {self.path}: {exc}") from exc

    def _need(self, version: int, what: str) -> None:
        if self.version < version:
            raise StoreError(
                f"{self.path} has schema version {self.version}: no {what} yet; "
                "start the sidecar once to migrate it"
            )

    def counts(self) -> Counts:
        values = {str(r[0]): int(r[1]) for r in self._rows("SELECT name, value FROM counters")}
        queued, size = self._rows("SELECT count(*), coalesce(sum(size), 0) FROM events")[0]
        age_from = _AGE_FROM if self.version >= 2 else "received_at"
        oldest = self._rows(f"SELECT {age_from} FROM events ORDER BY seq LIMIT 1")  # noqa: S608 - constant SQL; values are bound
        return Counts(
            received=values.get("received", 0),
            queued=int(queued),
            queued_bytes=int(size),
            delivered=values.get("delivered", 0),
            dead_lettered=values.get("dead_lettered", 0),
            duplicates=values.get("duplicates", 0),
            oldest_queued_at=float(oldest[0][0]) if oldest else None,
        )

    def operator_counts(self) -> dict[str, int]:
        """Dead letters re-queued and purged by operators, ever."""
        if self.version < 2:
            return {"requeued": 0, "purged": 0}
        return {
            str(r[0]): int(r[1]) for r in self._rows("SELECT name, value FROM operator_counters")
        }

    def ledger(
        self, agent_key: str | None = None, since: str | None = None, until: str | None = None
    ) -> list[LedgerRow]:
        self._need(2, "ledger")
        return [_ledger_row(r) for r in self._rows(*_ledger_query(agent_key, since, until))]

    def dead_letters(
        self, limit: int = 100, flt: DeadLetterFilter | None = None
    ) -> list[DeadLetterRecord]:
        self._need(2, "dead-letter filters")
        sql, params = _dead_letters_query(flt or DeadLetterFilter(), limit)
        return [_dead_letter(r) for r in self._rows(sql, params)]

    def dead_letter_summary(self) -> list[dict[str, Any]]:
        return [_summary_row(r) for r in self._rows(_SUMMARY)]

    def count_dead_letters(self, flt: DeadLetterFilter) -> int:
        where, params = flt.where()
        return int(self._rows(_COUNT_DEAD + where, params)[0][0])

    def integrity_check(self) -> list[str]:
        return integrity_check(self._conn)

    def salvage(self, report: SalvageReport, chunk: int = 500) -> Iterator[list[NewEvent]]:
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
                        f"SELECT {_KEY_COLUMNS} FROM keys WHERE {where} ORDER BY idem_key {order}",  # noqa: S608 - constant SQL; values are bound
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
                    f"SELECT {_SALVAGE_COLUMNS} FROM events WHERE seq > ? ORDER BY seq",  # noqa: S608 - constant SQL; values are bound
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
                        f"SELECT {_SALVAGE_COLUMNS} FROM events WHERE seq = ?",  # noqa: S608 - constant SQL; values are bound
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
        """The highest seq the table has held, from what can still be read of it."""
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
                    f"SELECT {_KEY_COLUMNS} FROM keys"  # noqa: S608 - constant SQL; values are bound
                    " WHERE idem_key IN (SELECT value FROM json_each(?))",
                    (_json.encode(wanted).decode(),),
                )
            )
        except sqlite3.DatabaseError:
            pass
        found: dict[str, _KeyRow] = {}
        for key in wanted:
            try:
                cursor = self._conn.execute(
                    f"SELECT {_KEY_COLUMNS} FROM keys WHERE idem_key = ?",  # noqa: S608 - constant SQL; values are bound
                    (key,),
                )
                found.update(_key_rows_of(cursor))
            except sqlite3.DatabaseError:
                continue
        return found


#: Text columns as stored bytes: damaged text is then a value to judge, not a decode error.
_SALVAGE_COLUMNS: Final = (
    "seq, CAST(id AS BLOB), CAST(idem_key AS BLOB), CAST(kind AS BLOB), body,"
    " CAST(agent_key AS BLOB), CAST(event_type AS BLOB), value, received_at,"
    " CAST(created_at AS BLOB)"
)


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


@dataclass(frozen=True, slots=True)
class _KeyRow:
    """What the keys table holds of an event, written with it: a second copy of its id
    and receipt time, and the fingerprint of its body."""

    id: str | None
    fingerprint: bytes
    received_at: float | None
    created_at: str | None


#: An id as ingest makes it (``new_event_id``): the receipt time's milliseconds, then
#: random digits.
_EVENT_ID: Final = re.compile(r"evt_([0-9a-f]{12})[0-9a-f]{16}")

#: A key row's id and ``created_at`` as written, filled in where the row leaves out what
#: it can derive (``_KEY_ID``, ``_KEY_CREATED_AT``): a file of any schema version reads
#: the same.
_KEY_COLUMNS: Final = (
    f"CAST(idem_key AS BLOB), CAST({_KEY_ID} AS BLOB), fingerprint, received_at,"
    f" CAST({_KEY_CREATED_AT} AS BLOB)"
)


def _key_row(raw: Any) -> tuple[str, _KeyRow] | None:
    """A key and its row, from ``_KEY_COLUMNS``; ``None`` when the key is unreadable."""
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


def _salvaged(
    row: Any, by_key: dict[str, _KeyRow], by_id: dict[str, tuple[str, _KeyRow]]
) -> NewEvent | tuple[str | None, str]:
    """The event a stored row holds, or ``(its id if known, why it cannot be queued
    again)``. Its fields must be readable and agree with their second copies: the id and
    key those of its key row (found by key, or by id when the key is damaged), the
    receipt time that of its ``created_at`` or key row and of the milliseconds in its id,
    the body a valid event that matches the fingerprint stored at ingest (or, when that
    is gone, the columns copied from it)."""
    _seq, raw_id, raw_key, raw_kind, body, agent_key, event_type, value, received, created = row
    eid, key, kind = _text(raw_id), _text(raw_key), _text(raw_kind)
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
    # A timestamp equal to the receipt time is the one ingest filled in: the fingerprint
    # is of the body without it.
    as_sent, without = _fingerprints_of(typed, obj)
    filled = obj.get("timestamp") == created_at
    stored = key_row.fingerprint if key_row is not None else b""
    vouched = bool(stored) and (stored == as_sent or (filled and stored == without))
    if stored and not vouched:
        return eid, "its body does not match the fingerprint stored at ingest"
    try:
        number = float(obj["value"]) if typed == "outcome" else None
    except OverflowError:
        return eid, "its value is out of range"
    if not vouched and (
        _text(agent_key) != obj["agent_key"]
        or _text(event_type) != obj[TYPE_FIELDS[typed]]
        or not _same_number(value, number)
    ):
        return eid, "its body and the columns copied from it disagree"
    if not stored:
        stored = without if filled else as_sent  # derived again
    return NewEvent(
        id=eid,
        idem_key=key,
        kind=typed,
        body=body,
        fingerprint=stored,
        agent_key=obj["agent_key"],
        event_type=obj[TYPE_FIELDS[typed]],
        value=number,
        received_at=received_at,
        created_at=created_at,
    )


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


@dataclass(frozen=True, slots=True)
class UnreadableRow:
    """A stored event that salvage could not queue again: its seq, its id when readable,
    and why."""

    seq: int | None
    id: str | None
    reason: str


@dataclass(slots=True)
class SalvageReport:
    read: int = 0
    unreadable: list[UnreadableRow] = field(default_factory=list)
    #: The seqs whose rows could not be reached: in damaged pages.
    damaged_seqs: set[int] = field(default_factory=set)
    #: Events read whose key row is gone: their key and id have no second copy.
    unchecked: int = 0
    #: What SQLite said about the damage, once each.
    errors: set[str] = field(default_factory=set)
    #: The table could not be walked to its end (its size unreadable).
    gave_up: bool = False

    def damage(self, seq: int) -> None:
        self.damaged_seqs.add(seq)

    @property
    def damaged(self) -> list[tuple[int, int]]:
        """The damaged seqs as ranges ``(first, last)``, in order."""
        ranges: list[tuple[int, int]] = []
        for seq in sorted(self.damaged_seqs):
            if ranges and ranges[-1][1] == seq - 1:
                ranges[-1] = (ranges[-1][0], seq)
            else:
                ranges.append((seq, seq))
        return ranges


def _private_copy(path: Path, wal: Path) -> Path:
    """A copy of a database and its WAL in a new private temporary directory."""
    copy_dir = Path(tempfile.mkdtemp(prefix="valmi-sidecar-read-"))
    try:
        shutil.copyfile(path, copy_dir / DB_NAME)
        shutil.copyfile(wal, copy_dir / (DB_NAME + "-wal"))
    except OSError as exc:
        shutil.rmtree(copy_dir, ignore_errors=True)
        raise StoreError(
            f"cannot copy {path} and its WAL to {copy_dir.parent} to read them without "
            f"changing them: {exc.strerror}; set TMPDIR to a directory with room for "
            f"{path.stat().st_size + wal.stat().st_size} bytes"
        ) from exc
    return copy_dir


def moved_aside_files(data_dir: Path) -> list[Path]:
    """The corrupt databases moved aside in ``data_dir`` (not their -wal/-shm files)."""
    return sorted(
        p
        for p in Path(data_dir).glob(f"{DB_NAME}{MOVED_ASIDE_MARK}*")
        if not p.name.endswith(("-wal", "-shm"))
    )


def _move_aside(path: Path) -> Path:
    """Rename a damaged database (with its -wal and -shm) to ``queue.db.corrupt-<UTC time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}{MOVED_ASIDE_MARK}{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}{MOVED_ASIDE_MARK}{stamp}-{n}")
    os.rename(path, dest)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.rename(side, dest.with_name(dest.name + suffix))
    _fsync_dir(path.parent)
    return dest


def _fsync_dir(directory: Path) -> None:
    """Make renames and deletions in ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- files and connections (blocking helpers run via asyncio.to_thread) -----------------


def _lock_data_dir(data_dir: Path) -> int:
    """Create ``data_dir`` (0700), take its exclusive lock, write our pid; return the fd.
    Run as root on another user's directory, give that user back any file of ours that
    is root's (see ``_give_files``)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = data_dir.stat()
    if stat.S_IMODE(st.st_mode) != 0o700:
        if st.st_uid == os.geteuid():
            data_dir.chmod(0o700)
        else:
            log.warning(
                "data_dir_not_private", path=str(data_dir), mode=oct(stat.S_IMODE(st.st_mode))
            )
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except PermissionError:
        raise StoreError(_not_ours(path)) from None
    try:
        _give_fd(fd, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise DataDirLockedError(
                f"another valmi-sidecar (pid {holder}) is using {data_dir}; "
                "stop it or choose another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _give_files(data_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_ours(path: Path) -> str:
    """Why a file of the data directory cannot be opened, and what to do about it."""
    try:
        owner = path.stat().st_uid
    except OSError:
        owner = -1
    return (
        f"cannot open {path}: permission denied: it belongs to uid {owner} and this "
        f"process runs as uid {os.geteuid()} (a command run as another user, such as "
        "root, left it); stop every valmi-sidecar on this directory and give its files to "
        f"the user the service runs as: chown -R {os.geteuid()}:{os.getegid()} {path.parent}"
    )


def _foreign_owner(data_dir: Path) -> tuple[int, int] | None:
    """The owner and group that the files this process makes in ``data_dir`` must have,
    when they are not its own: run as root on a directory of another user (the service
    account), files left as root's would lock that user out. ``None`` otherwise."""
    if os.geteuid() != 0:
        return None
    st = os.stat(data_dir)
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def _give_fd(fd: int, path: Path) -> None:
    """Give the open file ``path`` to the owner of its directory, when that is due (see
    ``_foreign_owner``)."""
    owner = _foreign_owner(path.parent)
    if owner is None:
        return
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != owner and _only_name(st, path):
        _fchown(fd, owner, str(path))


def _only_name(st: os.stat_result, path: Path) -> bool:
    """Whether the open file ``st`` is a regular file whose only name is ``path`` (not a
    link planted there to a file elsewhere, which root must not give away)."""
    try:
        named = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_nlink == 1
        and (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino)
    )


def _fchown(fd: int, owner: tuple[int, int], where: str) -> bool:
    try:
        os.fchown(fd, *owner)
    except OSError as exc:  # a user namespace that does not map the owner, say
        log.warning(
            "file_owner_not_restored",
            path=where,
            uid=owner[0],
            error=f"{type(exc).__name__}: {exc.strerror}",
        )
        return False
    return True


def _give_files(data_dir: Path) -> None:
    """Run as root on another user's data directory: give that user the sidecar's files
    in it that are not theirs yet (the lock, the database and its -wal and -shm, the
    clean-shutdown record, moved-aside files), those made now and any a command run as
    root left before. Each is opened without following a link and changed only if it is
    a regular file with no other name, so a link planted in the directory gives nothing
    else away."""
    owner = _foreign_owner(data_dir)
    if owner is None:
        return
    names = [LOCK_NAME, *(p.name for p in data_dir.glob(f"{DB_NAME}*"))]
    names += [p.name for p in data_dir.glob(f"{CLEAN_NAME}*")]
    for name in names:
        try:
            fd = os.open(
                data_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError:
            continue  # gone meanwhile, or a link: not ours to change
        try:
            st = os.fstat(fd)
            path = data_dir / name
            if (
                (st.st_uid, st.st_gid) != owner
                and _only_name(st, path)
                and _fchown(fd, owner, str(path))
            ):
                log.info("file_owner_restored", path=str(path), uid=owner[0])
        finally:
            os.close(fd)


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (or make it 0600 if ours),
    owned like the directory when run as root on another user's (SQLite then gives its
    -wal and -shm files the database's owner)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except PermissionError:
        raise StoreError(_not_ours(path)) from None
    try:
        _give_fd(fd, path)
    finally:
        os.close(fd)
    for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        # SQLite would say only "unable to open database file".
        try:
            os.close(os.open(side, os.O_RDWR | os.O_CLOEXEC))
        except FileNotFoundError:
            continue
        except PermissionError:
            raise StoreError(_not_ours(side)) from None
    _chmod_private(path)


def _chmod_private(path: Path) -> None:
    """Make the database and its WAL and shared-memory files 0600 (those we own)."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if stat.S_IMODE(st.st_mode) != 0o600 and st.st_uid == os.geteuid():
            p.chmod(0o600)


def _identity(path: Path) -> list[int] | None:
    """The database file's inode, size and modification time, or ``None`` when there is
    no file or its WAL has content (then it was not closed cleanly, or is in use)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    with contextlib.suppress(FileNotFoundError):
        if path.with_name(path.name + "-wal").stat().st_size:
            return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _take_clean_record(data_dir: Path) -> tuple[int, int] | None:
    """Delete the clean-shutdown record (durably, before any write to the database) and
    return the queue's size it holds, ``(events, bytes)``, when the database file is still
    the one it describes; ``None`` when there is none or it does not match."""
    record = data_dir / CLEAN_NAME
    try:
        raw = record.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        # Not readable by this user (another user's, such as root's, or not a file): it
        # cannot vouch for the database, so start-up runs the full check, as after a
        # crash. It is removed so that the next clean close can write one again.
        removed = True
        try:
            record.unlink()
            _fsync_dir(data_dir)
        except OSError:
            removed = False  # never read, so never trusted: only the check's time is lost
        log.warning(
            "clean_record_unreadable",
            path=str(record),
            error=f"{type(exc).__name__}: {exc.strerror}",
            removed=removed,
            action="running the full start-up check, as after a crash",
        )
        return None
    record.unlink()
    _fsync_dir(data_dir)
    try:
        saved = msgspec.json.decode(raw)
        identity = _identity(data_dir / DB_NAME)
        if (
            identity is None
            or saved.get("schema") != SCHEMA_VERSION
            or saved.get("identity") != identity
        ):
            return None
        return int(saved["queued"]), int(saved["queued_bytes"])
    except (msgspec.DecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None


def _write_clean_record(data_dir: Path, queued: int, queued_bytes: int) -> None:
    """Record a clean close (after the connections closed and SQLite removed the WAL)."""
    identity = _identity(data_dir / DB_NAME)
    if identity is None:
        return
    body = _json.encode(
        {
            "schema": SCHEMA_VERSION,
            "identity": identity,
            "queued": queued,
            "queued_bytes": queued_bytes,
        }
    )
    tmp = data_dir / (CLEAN_NAME + ".tmp")
    # A new file, never one found there: a link would make this write land elsewhere.
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _give_fd(fd, tmp)
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, data_dir / CLEAN_NAME)


async def _quick_check(db: aiosqlite.Connection, path: Path) -> None:
    """Raise ``CorruptDatabaseError`` when ``PRAGMA quick_check`` finds the file damaged."""
    started = time.monotonic()
    rows = await db.execute_fetchall("PRAGMA quick_check")
    problems = [str(r[0]) for r in rows]
    if problems != ["ok"]:
        raise CorruptDatabaseError(f"{path} is damaged: {'; '.join(problems[:5])}")
    log.debug(
        "store_checked", path=str(path), elapsed_ms=round((time.monotonic() - started) * 1000)
    )


async def _setup_writer(
    db: aiosqlite.Connection, path: Path, *, synchronous: str, budget: DiskBudget
) -> None:
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    version = int(next(iter(await db.execute_fetchall("PRAGMA user_version")))[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this valmi-sidecar knows "
            f"({SCHEMA_VERSION}); run a newer valmi-sidecar or choose another --data-dir"
        )
    if version == 0:
        # Must precede the first table; it is a no-op on a database that has tables.
        await db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = next(iter(await db.execute_fetchall("PRAGMA journal_mode = WAL")))[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"{path}: the file system does not support WAL (journal_mode={mode})")
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    # The disk budget: the file never grows past its share (a database already larger
    # keeps its size and takes no new events until it has room again), and the WAL is
    # checkpointed and cut back to its soft bound.
    await db.execute(f"PRAGMA max_page_count = {max(MIN_PAGES, budget.max_pages)}")
    await db.execute(f"PRAGMA journal_size_limit = {budget.wal_soft_bytes}")
    # SQLite's own checkpoints (SQLite's default interval, or sooner on a small budget)
    # keep the WAL within half its soft bound; after a commit, one over the bound is cut.
    pages = min(WAL_AUTOCHECKPOINT_PAGES, budget.wal_soft_bytes // budget.page_size // 2)
    await db.execute(f"PRAGMA wal_autocheckpoint = {max(1, pages)}")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        script = MIGRATIONS[target - 1]
        try:
            await db.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;"
            )
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise
        log.info("store_migrated", path=str(path), version=target)
    await db.executescript(_GROUP_WRITE_DDL)  # TEMP: this connection only, not in the file


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Accepted",
    "CorruptDatabaseError",
    "Counts",
    "DataDirLockedError",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterRecord",
    "Delivered",
    "DiskUsage",
    "IdempotencyConflictError",
    "ImportResult",
    "LedgerRow",
    "OutcomeUnknownError",
    "QueueFullError",
    "QueuedEvent",
    "ReadOnlyDatabase",
    "Retry",
    "SalvageReport",
    "Settlement",
    "Store",
    "StoreError",
    "StoreStats",
    "UnreadableRow",
]
