"""The reads of a running store, as functions its reader thread runs: each takes the
query-only connection and returns records. Under WAL they see committed data only."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection
from typing import Any

from .records import DeadLetterFilter, DeadLetterRecord, LedgerRow, QueuedEvent
from .sql import (
    COUNT_DEAD,
    LEASE,
    SUMMARY,
    dead_letter_where,
    dead_letters_query,
    ledger_query,
    summary_row,
)


def lease(now: float, limit: int, exclude: Collection[int]) -> Callable[..., list[QueuedEvent]]:
    """Up to ``limit`` events due at ``now``, oldest first, not in ``exclude``."""

    def run(db: sqlite3.Connection) -> list[QueuedEvent]:
        out: list[QueuedEvent] = []
        for row in db.execute(LEASE, (now, limit + len(exclude))):
            event = QueuedEvent(*row)
            if event.seq in exclude:
                continue
            out.append(event)
            if len(out) == limit:
                break
        return out

    return run


def next_due_at(exclude: Collection[int]) -> Callable[..., float | None]:
    """The earliest ``next_attempt_at`` of the queued events not in ``exclude``."""

    def run(db: sqlite3.Connection) -> float | None:
        sql = "SELECT seq, next_attempt_at FROM events ORDER BY next_attempt_at LIMIT ?"
        for seq, due in db.execute(sql, (len(exclude) + 1,)):
            if seq not in exclude:
                return float(due)
        return None

    return run


def dead_letters(flt: DeadLetterFilter, limit: int) -> Callable[..., list[DeadLetterRecord]]:
    sql, params = dead_letters_query(flt, limit)
    return lambda db: [DeadLetterRecord(*r) for r in db.execute(sql, params)]


def count_dead_letters(flt: DeadLetterFilter) -> Callable[..., int]:
    where, params = dead_letter_where(flt)
    return lambda db: int(db.execute(COUNT_DEAD + where, params).fetchone()[0])


def dead_letter_summary(db: sqlite3.Connection) -> list[dict[str, Any]]:
    return [summary_row(r) for r in db.execute(SUMMARY)]


def ledger(
    agent_key: str | None, since: str | None, until: str | None
) -> Callable[..., list[LedgerRow]]:
    sql, params = ledger_query(agent_key, since, until)
    return lambda db: [LedgerRow(*r) for r in db.execute(sql, params)]
