"""Operator actions and maintenance, each a transaction of its own on the writer's thread:
re-queue and purge dead letters, forget expired keys, give free pages back."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Final

from ..disk import DEAD_LETTER_OVERHEAD_BYTES
from .plan import (
    IN_DEAD,
    IN_RECEIVED,
    PRUNE_CHUNK,
    Fail,
    LedgerDelta,
    Plan,
    Purge,
    Requeue,
    Snapshot,
    bump,
)
from .records import DeadLetterFilter, DeadLetterRecord, QueueFullError, utc_day
from .sql import (
    BUMP_OPERATOR,
    DL_COLUMNS,
    INSERT_REQUEUED,
    PRUNE,
    REQUEUE_KEY,
    UPSERT_LEDGER,
    dead_letter_where,
)

#: Free pages released per ``incremental_vacuum`` step, and free pages kept for reuse (at
#: most; fewer with a small disk budget). Every step goes through the WAL.
VACUUM_STEP_PAGES: Final = 64
VACUUM_KEEP_PAGES: Final = 1_024


def _select_dead_letters(
    db: sqlite3.Connection, flt: DeadLetterFilter, limit: int
) -> list[DeadLetterRecord]:
    where, params = dead_letter_where(flt)
    sql = f"SELECT {DL_COLUMNS} FROM dead_letters WHERE {where} ORDER BY seq LIMIT ?"  # noqa: S608 - constant SQL; values are bound
    return [DeadLetterRecord(*r) for r in db.execute(sql, (*params, limit))]


def _within_bytes(rows: list[DeadLetterRecord], limit: int) -> list[DeadLetterRecord]:
    """The first dead letters whose bytes fit in ``limit``; one at least."""
    total = 0
    for i, r in enumerate(rows):
        total += len(r.body) + DEAD_LETTER_OVERHEAD_BYTES
        if total > limit and i:
            return rows[:i]
    return rows


def purge(db: sqlite3.Connection, op: Purge, max_bytes: int) -> Plan:
    """Delete the first dead letters ``op`` selects (at most ``max_bytes`` of them) and
    commit. The counts and the ledger still count them as dead-lettered."""
    plan = Plan()
    rows = _within_bytes(_select_dead_letters(db, op.filter, op.limit), max_bytes)
    if rows:
        db.executemany("DELETE FROM dead_letters WHERE seq = ?", [(r.seq,) for r in rows])
        db.execute(BUMP_OPERATOR, (len(rows), "purged"))
        db.commit()
    plan.purged = len(rows)
    plan.dead_removed_bytes = sum(len(r.body) for r in rows)
    plan.results.append((op, len(rows)))
    return plan


def requeue(
    db: sqlite3.Connection,
    op: Requeue,
    start: Snapshot,
    max_bytes: int,
    refusal: Callable[[sqlite3.Connection, int], QueueFullError | None],
) -> Plan:
    """Move the first dead letters ``op`` selects back to the queue and commit.

    A re-queued dead letter keeps its id, idempotency key and receipt time, gets a new
    place at the end of the queue, and its age restarts (``requeued_at``). It moves from
    dead-lettered to queued in the ledger (the counts are its totals): out of the ledger
    table, received and dead-lettered, since the table counts queued events apart (schema
    version 5); the ledger's received, table and queue together, is unchanged, so the
    counts still reconcile. ``refusal(db, n)`` says whether ``n`` fit."""
    plan = Plan(next_seq=start.next_seq, oldest=start.oldest)
    rows = _within_bytes(_select_dead_letters(db, op.filter, op.limit), max_bytes)
    failure = refusal(db, len(rows)) if rows else None
    if failure is not None:
        plan.results.append((op, Fail(failure)))
        return plan
    now, seq = start.now, start.next_seq
    delta: LedgerDelta = {}
    for r in rows:
        line = (r.agent_key, r.kind, r.event_type, utc_day(r.received_at))
        bump(delta, line, IN_RECEIVED, r.value, -1)
        bump(delta, line, IN_DEAD, r.value, -1)
    # Deleted first: the events reuse the pages the dead letters leave.
    db.executemany("DELETE FROM dead_letters WHERE seq = ?", [(r.seq,) for r in rows])
    db.executemany(
        INSERT_REQUEUED,
        [
            (seq + i, r.id, r.idem_key, r.kind, r.body, len(r.body), r.agent_key, r.event_type,
             r.value, r.received_at, r.created_at, now)
            for i, r in enumerate(rows)
        ],
    )  # fmt: skip
    db.executemany(REQUEUE_KEY, [(r.idem_key, r.id, r.created_at, r.received_at) for r in rows])
    db.executemany(UPSERT_LEDGER, [(*key, *map(int, d[:3]), *d[3:]) for key, d in delta.items()])
    db.execute(BUMP_OPERATOR, (len(rows), "requeued"))
    db.commit()
    n = len(rows)
    plan.requeued = n
    plan.dead_removed_bytes = sum(len(r.body) for r in rows)
    plan.next_seq = seq + n
    if n and plan.oldest is None:
        plan.oldest, plan.oldest_changed = (seq, now), True
    plan.results.append((op, n))
    return plan


def prune_keys(db: sqlite3.Connection, cutoff: float) -> int:
    """Delete up to ``PRUNE_CHUNK`` keys whose de-dup window ended before ``cutoff``."""
    n = db.execute(PRUNE, (cutoff, PRUNE_CHUNK)).rowcount
    db.commit()
    return n


def vacuum(db: sqlite3.Connection, max_pages: int, stopping: Callable[[], bool]) -> int:
    """Give free pages beyond ``VACUUM_KEEP_PAGES`` back to the file system, in small
    steps (one big ``incremental_vacuum`` pushes far more pages through the WAL). Returns
    the pages released. Each step is its own transaction."""
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    released = 0
    keep = min(VACUUM_KEEP_PAGES, max_pages // 16)
    while free - released > keep and not stopping():
        step = min(VACUUM_STEP_PAGES, free - released - keep)
        # executescript, not execute: the pragma frees one page per step of the
        # statement, and sqlite3's execute() steps a column-less statement only once.
        db.executescript(f"PRAGMA incremental_vacuum({step});")
        released += step
    return released
