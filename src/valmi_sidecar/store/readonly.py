"""Read-only access to a database file: the command line when no sidecar runs, and
``check`` and ``salvage`` at any time. Blocking (the CLI, or ``asyncio.to_thread``)."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..events import NewEvent
from .files import private_copy
from .records import (
    CorruptDatabaseError,
    Counts,
    DeadLetterFilter,
    DeadLetterRecord,
    LedgerRow,
    SalvageReport,
    StoreError,
)
from .salvage import Salvage
from .schema import (
    BUSY_TIMEOUT_MS,
    COUNTS_FROM_LEDGER,
    DB_NAME,
    QUEUE_APART,
    integrity_check,
    is_corruption,
)
from .sql import (
    AGE_FROM,
    COUNT_DEAD,
    COUNTS,
    COUNTS_V1,
    SUMMARY,
    dead_letter_where,
    dead_letters_query,
    ledger_query,
    summary_row,
)


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
        if self.path.is_dir() and (self.path / DB_NAME).is_file():
            # The data directory, where the file was meant: name the file to pass.
            raise StoreError(
                f"{self.path} is a directory; pass its database, {self.path / DB_NAME}"
            )
        if not self.path.is_file():
            raise StoreError(f"no database at {self.path}")
        self._copy_dir: Path | None = None
        uri = self.path.resolve().as_uri() + "?mode=ro"
        if untouched:
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.is_file() and wal.stat().st_size > 0:
                self._copy_dir = private_copy(self.path, wal)
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
        counts = COUNTS if self.version >= COUNTS_FROM_LEDGER else COUNTS_V1
        values = {str(r[0]): int(r[1]) for r in self._rows(counts)}
        queued, size = self._rows("SELECT count(*), coalesce(sum(size), 0) FROM events")[0]
        age_from = AGE_FROM if self.version >= 2 else "received_at"
        oldest = self._rows(f"SELECT {age_from} FROM events ORDER BY seq LIMIT 1")  # noqa: S608 - constant SQL; values are bound
        received = values.get("received", 0)
        if self.version >= QUEUE_APART:
            received += int(queued)  # the ledger table counts them once settled
        return Counts(
            received=received,
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
        sql, params = ledger_query(agent_key, since, until, queue_apart=self.version >= QUEUE_APART)
        return [LedgerRow(*r) for r in self._rows(sql, params)]

    def dead_letters(
        self, limit: int = 100, flt: DeadLetterFilter | None = None
    ) -> list[DeadLetterRecord]:
        self._need(2, "dead-letter filters")
        sql, params = dead_letters_query(flt or DeadLetterFilter(), limit)
        return [DeadLetterRecord(*r) for r in self._rows(sql, params)]

    def dead_letter_summary(self) -> list[dict[str, Any]]:
        return [summary_row(r) for r in self._rows(SUMMARY)]

    def count_dead_letters(self, flt: DeadLetterFilter) -> int:
        where, params = dead_letter_where(flt)
        return int(self._rows(COUNT_DEAD + where, params)[0][0])

    def integrity_check(self) -> list[str]:
        return integrity_check(self._conn)

    def salvage(self, report: SalvageReport, chunk: int = 500) -> Iterator[list[NewEvent]]:
        """Every queued event that can be read and validated, in chunks (see
        ``salvage.Salvage.events``)."""
        return Salvage(self._conn).events(report, chunk)
