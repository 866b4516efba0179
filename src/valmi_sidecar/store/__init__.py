"""The durable queue: SQLite in WAL mode, one group-commit writer, a mirror of its counts.

The modules, each owning one thing (``docs/ARCHITECTURE.md`` has the whole map):

- ``records``: the errors and the records the store takes and gives, each defined once;
- ``sql``: the statements, with ``SELECT`` lists derived from the records;
- ``schema``: the file's schema and migrations, and how a connection is set up;
- ``thread``: one connection on one thread of its own (one trip per transaction);
- ``writes``: what one transaction does, on the writer's thread, returned as a plan;
- ``writer``: the group-commit loop that runs them and applies each plan;
- ``mirror`` and ``space``: the committed counts, and the bytes against the disk budget;
- ``core``: ``Store``, the public face;
- ``readonly`` and ``salvage``: reading a file without a running store;
- ``files``: the lock, the clean-shutdown record, moving a damaged file aside.

Everything a caller needs is importable from here.
"""

from . import handoff
from .core import Store
from .files import moved_aside_files
from .mirror import RATE_WINDOW_S
from .plan import Settle
from .readonly import ReadOnlyDatabase
from .records import (
    DEAD_LETTER_WARN_SHARE,
    Accepted,
    CorruptDatabaseError,
    Counts,
    DataDirLockedError,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterRecord,
    Delivered,
    DiskUsage,
    IdempotencyConflictError,
    ImportResult,
    LedgerRow,
    OutcomeUnknownError,
    QueuedEvent,
    QueueFullError,
    Retry,
    SalvageReport,
    Settlement,
    StoreError,
    StoreStats,
    UnreadableRow,
    Unwritable,
    salvage_problem,
    utc_day,
)
from .schema import CLEAN_NAME, DB_NAME, LOCK_NAME, MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "CLEAN_NAME",
    "DB_NAME",
    "DEAD_LETTER_WARN_SHARE",
    "LOCK_NAME",
    "MIGRATIONS",
    "RATE_WINDOW_S",
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
    "Settle",
    "Settlement",
    "Store",
    "StoreError",
    "StoreStats",
    "UnreadableRow",
    "Unwritable",
    "handoff",
    "moved_aside_files",
    "salvage_problem",
    "utc_day",
]
