"""The database file: its schema and migrations, and how a connection to it is set up."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Final

import structlog

from ..disk import DiskBudget
from .records import CorruptDatabaseError, StoreError

log = structlog.get_logger("valmi_sidecar.store")


#: SQLite's wait for a lock before ``SQLITE_BUSY``.
BUSY_TIMEOUT_MS: Final = 5_000
#: SQLite's default interval between its automatic checkpoints, in WAL pages.
WAL_AUTOCHECKPOINT_PAGES: Final = 1_000
#: The database may always grow to this many pages, whatever the budget: its schema
#: needs a few (a budget this small refuses every event; configuration refuses it first).
MIN_PAGES: Final = 64
DB_NAME: Final = "queue.db"
#: The database's own files: the budget measures them apart from the rest of the directory.
DB_FILES: Final = frozenset({DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"})
LOCK_NAME: Final = "lock"
#: Written by a clean close: the database file's identity and the queue's size then. A
#: start that finds it, with the file unchanged and no WAL, skips the integrity check and
#: the count of the queue (both read the whole file). Every open deletes it first.
CLEAN_NAME: Final = "clean-shutdown"

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
    # 4: received, delivered and dead-lettered are the ledger's totals (``sql.COUNTS``),
    # so that a commit writes no counter row beside the ledger's. The counters keep what
    # the ledger does not hold: the offset of what was counted before it (none in a file
    # made at version 2 or later), and the duplicates.
    """
    UPDATE counters SET value = value - (
        SELECT coalesce(CASE counters.name WHEN 'received' THEN sum(received)
                        WHEN 'delivered' THEN sum(delivered) ELSE sum(dead_lettered) END, 0)
        FROM ledger)
    WHERE name IN ('received', 'delivered', 'dead_lettered');
    """,
    # 5: the ledger table holds the receipt of an event once it is settled (delivered or
    # dead-lettered, in the settling transaction); until then the event's own row is its
    # record, and the ledger's readers add the queue (``sql.ledger_query``), so that a new
    # event's commit writes no ledger row. What the ledger counted of the queue moves out.
    """
    INSERT INTO ledger (agent_key, kind, event_type, day, received, received_value)
        SELECT agent_key, kind, event_type, strftime('%Y-%m-%d', received_at, 'unixepoch'),
               -count(*), -coalesce(sum(value), 0)
        FROM events WHERE true GROUP BY 1, 2, 3, 4
        ON CONFLICT (agent_key, kind, event_type, day) DO UPDATE SET
            received = received + excluded.received,
            received_value = received_value + excluded.received_value;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
#: From this version on, the counts are the ledger's totals (``sql.COUNTS``).
COUNTS_FROM_LEDGER: Final = 4
#: From this version on, the ledger table leaves out the queued events' receipt: its
#: readers add the queue (``sql.ledger_query``, ``received`` plus the events queued).
QUEUE_APART: Final = 5


#: SQLite's primary result codes that mean the file is damaged, not the disk busy or full.
_CORRUPT_CODES: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
MOVED_ASIDE_MARK: Final = ".corrupt-"


#: SQLite's result code for "database or disk is full": the file system, or the database
#: at its ``max_page_count``.
SQLITE_FULL: Final = 13


def _primary_code(exc: BaseException) -> int | None:
    """SQLite's primary result code of a ``sqlite3`` error (the extended code's low byte)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(exc, sqlite3.Error) and code is not None else None


def is_full(exc: BaseException) -> bool:
    """Whether a ``sqlite3`` error says there was no room to write."""
    return _primary_code(exc) == SQLITE_FULL


def is_corruption(exc: BaseException) -> bool:
    """Whether a ``sqlite3`` error says the file is damaged."""
    return isinstance(exc, sqlite3.DatabaseError) and _primary_code(exc) in _CORRUPT_CODES


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


def quick_check(db: sqlite3.Connection, path: Path) -> None:
    """Raise ``CorruptDatabaseError`` when ``PRAGMA quick_check`` finds the file damaged."""
    started = time.monotonic()
    rows = db.execute("PRAGMA quick_check").fetchall()
    problems = [str(r[0]) for r in rows]
    if problems != ["ok"]:
        raise CorruptDatabaseError(f"{path} is damaged: {'; '.join(problems[:5])}")
    log.debug(
        "store_checked", path=str(path), elapsed_ms=round((time.monotonic() - started) * 1000)
    )


def setup_writer(
    db: sqlite3.Connection, path: Path, *, synchronous: str, budget: DiskBudget
) -> None:
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this valmi-sidecar knows "
            f"({SCHEMA_VERSION}); run a newer valmi-sidecar or choose another --data-dir"
        )
    if version == 0:
        # Must precede the first table; it is a no-op on a database that has tables.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"{path}: the file system does not support WAL (journal_mode={mode})")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    # The disk budget: the file never grows past its share (a database already larger
    # keeps its size and takes no new events until it has room again), and the WAL is
    # checkpointed and cut back to its soft bound.
    db.execute(f"PRAGMA max_page_count = {max(MIN_PAGES, budget.max_pages)}")
    db.execute(f"PRAGMA journal_size_limit = {budget.wal_soft_bytes}")
    # SQLite's own checkpoints (SQLite's default interval, or sooner on a small budget)
    # keep the WAL within half its soft bound; after a commit, one over the bound is cut.
    pages = min(WAL_AUTOCHECKPOINT_PAGES, budget.wal_soft_bytes // budget.page_size // 2)
    db.execute(f"PRAGMA wal_autocheckpoint = {max(1, pages)}")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        script = MIGRATIONS[target - 1]
        try:
            db.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;"
            )
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        log.info("store_migrated", path=str(path), version=target)
