"""What one group transaction (submissions and settlements) does, on the writer's thread.

Every function here takes the writer's ``sqlite3.Connection`` and runs on its thread, in
one trip from the event loop. Nothing here touches the event loop or the store: what a
transaction changed comes back as a ``Plan`` that the writer applies, after ``COMMIT``,
to the mirror of the committed state (``mirror.Mirror``) and the disk (``space.Space``).
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from ..disk import event_disk_bytes
from ..events import NewEvent
from .plan import (
    IN_DEAD,
    IN_DELIVERED,
    IN_RECEIVED,
    Fail,
    Limits,
    Op,
    Plan,
    Settle,
    Snapshot,
    Submit,
    bump,
    count,
)
from .records import (
    DEAD,
    DELIVERED,
    QUEUED,
    Accepted,
    Delivered,
    IdempotencyConflictError,
    QueueFullError,
    Retry,
    utc_day,
)
from .space import QUEUE_FULL_RETRY_AFTER_S, Space
from .sql import (
    BUMP_COUNTER,
    DELETE_EVENT,
    DELETE_EVENTS,
    EVENT_ROW_VALUES,
    GROUP_WRITE,
    GROUP_WRITE_COLUMNS,
    GROUP_WRITE_VIEW,
    INSERT_DEAD,
    INSERT_EVENT,
    INSERT_KEY,
    KEY_CREATED_AT,
    KEY_ID,
    KEY_ROW_VALUES,
    LEDGER_ROW_VALUES,
    OLDEST,
    REMEMBERED_SINCE,
    RESERVE_SEQS,
    RETRY,
    SETTLE_KEYS,
    UPSERT_LEDGER_ROWS,
    bind_list,
    columns,
    row_chunks,
    with_rows,
)

# -- the rows a transaction reads ----------------------------------------------------------


class _KnownKey(msgspec.Struct, frozen=True):
    """A stored key, as the de-duplication of new events needs it."""

    idem_key: str
    id: str
    fingerprint: bytes
    created_at: str
    since: float
    state: int


class _Settled(msgspec.Struct, frozen=True):
    """A queued event, as settling it needs it."""

    seq: int
    idem_key: str
    size: int
    agent_key: str
    kind: str
    event_type: str
    value: float | None
    received_at: float


_SELECT_KEYS: Final = (
    f"SELECT {columns(_KnownKey, id=KEY_ID, created_at=KEY_CREATED_AT, since=REMEMBERED_SINCE)}"  # noqa: S608 - constant SQL; values are bound
    " FROM keys WHERE idem_key IN {list}"
)
_SELECT_SETTLED: Final = (
    f"SELECT {columns(_Settled)} FROM events"  # noqa: S608 - constant SQL; values are bound
    " WHERE seq IN {list}"
)
#: Deliveries alone (the usual batch): their rows deleted and read back in one statement.
_DELETE_SETTLED: Final = (
    "DELETE FROM events WHERE seq IN {list}"  # noqa: S608 - constant SQL; values are bound
    f" RETURNING {columns(_Settled)}"
)


def _records(
    db: sqlite3.Connection, factory: Callable[..., Any], sql: str, params: Sequence[Any]
) -> list[Any]:
    return [factory(*r) for r in db.execute(sql, params)]


# -- submits and settlements: one group transaction ---------------------------------------


class GroupWriter:
    """Writes one group of submissions and settlements and commits (writer thread)."""

    def __init__(self, limits: Limits, space: Space, clock: Callable[[], float]) -> None:
        self._limits = limits
        self._space = space
        self._clock = clock

    def write(self, group: list[Op], start: Snapshot, db: sqlite3.Connection) -> Plan:
        """Run the statements of one group and commit; return what they changed."""
        plan = Plan(next_seq=start.next_seq, oldest=start.oldest)
        submits = [op for op in group if isinstance(op, Submit)]
        settles = [op for op in group if isinstance(op, Settle)]
        if submits:
            # Only a client's own key can be stored already: a key the sidecar made is the
            # event's new id (time plus 64 random bits), so looking it up finds nothing;
            # unless the event comes back (salvage) with the key it was given then.
            keys = [
                e.idem_key for op in submits for e in op.events if op.all_keys or e.idem_key != e.id
            ]
            known: dict[str, _KnownKey] = {}
            if keys:
                rows = _records(db, _KnownKey, *bind_list(_SELECT_KEYS, keys))
                known = {r.idem_key: r for r in rows}
            if self._space.wal_over:  # the last checkpoint could not finish: try again first
                self._space.checkpoint_if_big(db)
            if keys or not self._plan_own_keys(db, submits, start, plan):
                self._plan_submits(db, submits, start, plan, known=known)
        for op in settles:
            plan.results.append((op, None))
        if settles:
            _write_settles(db, settles, plan, self._clock(), queued=start.queued)
        # After the settlements, which may have removed every older event: the new events
        # are written last, so they are the oldest only when nothing older is left.
        if plan.fresh and plan.oldest is None:
            seq, first = plan.fresh[0]
            plan.oldest = (seq, first.received_at)
            plan.oldest_changed = True
        last = plan.next_seq - 1
        reserve_to = last + SEQ_RESERVE if plan.fresh and last > start.seq_reserved else 0
        one_call = len(submits) >= ONE_CALL_MIN_SUBMITS and not reserve_to
        _write_and_commit(db, plan, one_call=one_call, reserve_to=reserve_to)
        # Committed: from here on nothing may fail the group's operations.
        try:
            self._space.checkpoint_if_big(db, group=True)
            if plan.removed and (self._space.full or plan.disk_full):
                plan.disk_after = self._space.measure(db)  # room again for new events?
        except sqlite3.Error as exc:
            self._space.checkpoint_failed(exc)
        return plan

    def _plan_submits(
        self,
        db: sqlite3.Connection,
        submits: list[Submit],
        start: Snapshot,
        plan: Plan,
        *,
        known: dict[str, _KnownKey],
    ) -> None:
        cutoff = self._clock() - self._limits.dedup_window_s
        # Keys stored by earlier submissions of this group: key -> (id, fingerprint, created_at).
        group_keys: dict[str, tuple[str, bytes, str]] = {}
        queued, queued_bytes, seq = start.queued, start.queued_bytes, plan.next_seq
        for op in submits:
            outcome = _dedupe(op.events, group_keys, known, cutoff)
            if isinstance(outcome, Fail):
                plan.results.append((op, outcome))
                continue
            accepted, mine, new, dups = outcome
            failure = self._refusal(db, plan, new, queued) if new else None
            if failure is not None:
                plan.results.append((op, Fail(failure)))
                continue
            group_keys.update(mine)
            queued += len(new)
            queued_bytes += sum(len(e.body) for e in new)
            plan.duplicates += len(dups)
            plan.events += len(op.events)
            for kind in dups:
                count(plan.duplicate_kinds, kind)
            seq = _add_fresh(plan, new, seq)
            plan.results.append((op, accepted))
        plan.received = queued - start.queued
        plan.queued_bytes = queued_bytes - start.queued_bytes
        plan.next_seq = seq

    def _plan_own_keys(
        self, db: sqlite3.Connection, submits: list[Submit], start: Snapshot, plan: Plan
    ) -> bool:
        """Plan submissions whose every key is the sidecar's own in one pass, when the
        queue's limits take them all; else plan nothing and say so (``False``).

        Such a key is the event's new id, stored nowhere yet and unique in the group: no
        event can repeat one or conflict, so each submission is refused only by the limits.
        Those only ever tighten as submissions are accepted in order, so when the whole
        group fits, each of them would have: the same plan as ``_plan_submits`` gives,
        without the work of de-duplication and of a check per submission (a busy
        sidecar's every group, the writer's thread holding the GIL meanwhile)."""
        # Passes over the whole group (its events, their sizes, their seqs in one
        # ``enumerate``), not a call per event: the writer's thread holds the GIL here,
        # which a busy event loop waits for.
        events = [e for op in submits for e in op.events]
        sizes = [len(e.body) for e in events]
        n = len(events)
        if start.queued + n > self._limits.max_events:
            return False
        if self._space.room_for(db, plan, sum(map(event_disk_bytes, sizes))) is not None:
            # Submission by submission instead: the first of them may fit, and each check
            # there decides ``plan.disk_full`` anew (a measurement of the database made
            # here stays in the plan: nothing was written since).
            return False
        plan.results += [
            (op, [Accepted(e.id, e.created_at, False) for e in op.events]) for op in submits
        ]
        plan.next_seq = _add_fresh(plan, events, plan.next_seq)
        plan.received = n
        plan.queued_bytes = sum(sizes)
        plan.events += n
        return True

    def _refusal(
        self, db: sqlite3.Connection, plan: Plan, new: list[NewEvent], queued: int
    ) -> QueueFullError | None:
        max_events = self._limits.max_events
        if queued + len(new) > max_events:
            return QueueFullError(
                f"{queued} events queued, limit max_queue_events={max_events}",
                QUEUE_FULL_RETRY_AFTER_S,
            )
        return self._space.room_for(db, plan, sum(event_disk_bytes(len(e.body)) for e in new))


def _add_fresh(plan: Plan, events: Sequence[NewEvent], seq: int) -> int:
    """Add accepted new ``events`` to ``plan`` (their rows and counts; the ledger table
    counts them once they are settled), the first at ``seq``; the next seq."""
    for e in events:
        count(plan.received_kinds, e.kind)
    plan.fresh += enumerate(events, seq)
    return seq + len(events)


_Dedupe = tuple[list[Accepted], dict[str, tuple[str, bytes, str]], list[NewEvent], list[str]]


def _dedupe(
    events: Sequence[NewEvent],
    group_keys: dict[str, tuple[str, bytes, str]],
    known: dict[str, _KnownKey],
    cutoff: float,
) -> _Dedupe | Fail:
    """One submission against the keys known: what it adds, what repeats an event stored
    before (a duplicate), or the conflict (a key reused with another body)."""
    accepted: list[Accepted] = []
    mine: dict[str, tuple[str, bytes, str]] = {}
    new: list[NewEvent] = []
    dups: list[str] = []
    for e in events:
        k = e.idem_key
        prior = mine.get(k) or group_keys.get(k)
        if prior is None and k in known:
            row = known[k]
            if row.state == QUEUED or row.since >= cutoff:
                prior = (row.id, row.fingerprint, row.created_at)
        if prior is None:
            mine[k] = (e.id, e.fingerprint, e.created_at)
            new.append(e)
            accepted.append(Accepted(e.id, e.created_at, duplicate=False))
        elif prior[1] == e.fingerprint:
            dups.append(e.kind)
            accepted.append(Accepted(prior[0], prior[2], duplicate=True))
        else:
            return Fail(IdempotencyConflictError(k))
    return accepted, mine, new, dups


# Python's ``sqlite3`` binds an int, a float, a str and a bytearray as they are, but runs
# its adaptation protocol for any other type, ``bytes`` included: a tuple, a dictionary
# lookup and two failed attribute lookups, one of which formats an AttributeError's
# message, all with the GIL held (about 0.5 µs a value, against 0.07 to copy a 280-byte
# body). So the blobs the writer binds for each event, its body and its fingerprint, go
# as bytearrays; SQLite stores the same blob either way. An action has no value: ``None``
# goes through the same protocol, so it is bound as a NaN, which SQLite stores as NULL
# (it keeps no NaN: binding one binds NULL). No event's value is a NaN (``events``
# refuses a value that is not finite), so the two cannot be confused.
def _event_values(e: NewEvent) -> tuple[Any, ...]:
    """A new event's values in ``INSERT_EVENT`` order (``EVENT_FIELDS``), after ``seq``
    and ``size``, its body as a bytearray and no value as a NaN."""
    value = e.value
    return (
        e.id,
        e.idem_key,
        e.kind,
        bytearray(e.body),
        e.agent_key,
        e.event_type,
        _NO_VALUE if value is None else value,
        e.received_at,
        e.created_at,
    )


#: What an event without a value binds: SQLite stores a NaN as NULL.
_NO_VALUE: Final = math.nan


#: How far past the seqs it writes a transaction moves the events table's
#: ``sqlite_sequence`` (``AUTOINCREMENT``'s record of the highest seq), once it reaches
#: them. SQLite rewrites that row, a page of its own, only when an insert goes past it:
#: moved ahead a block at a time, it is written once a block instead of in every commit
#: (one WAL frame of a one-event commit's five). Seqs are still never reused: after a
#: restart they go on past the block, so a restart may leave a gap of this many at most,
#: and salvage, which reads the value as the highest seq held, looks that much further.
SEQ_RESERVE: Final = 1024


#: A group of at least this many submissions (and nothing else to write) is written in
#: one call to SQLite (``GROUP_WRITE``), not one per table. Python's ``sqlite3`` lets go
#: of the GIL around every step of every statement, and that many requests stored at
#: once means the event loop is busy serving them: each time, the writer's thread then
#: waits for the loop to run out of work before it can go on, and the loop waits for
#: that commit (docs/PERFORMANCE.md, "One call to SQLite for a large group"). The view's
#: triggers cost more CPU per row than the statements, off the GIL: worth it only when
#: the loop is what limits. A quiet sidecar's groups, and a batch (one submission of
#: many events, little work on the loop), keep the statements.
ONE_CALL_MIN_SUBMITS: Final = 8
#: Events of one such call at most: a larger group, which only a backlog of waiting
#: requests makes, is written as statements.
ONE_CALL_MAX_ROWS: Final = 1024
_GROUP_WRITE_WIDTH: Final = len(GROUP_WRITE_COLUMNS)
#: ``op`` of a row that the trigger does not write (``sql.GROUP_WRITE``).
_PAD_OP: Final = 1
# A padding row's other columns are bound as 0, not NULL: Python's ``sqlite3`` looks for
# an adapter for every ``None`` it binds (see ``_event_values``), for an int it does not.
#: A padding row, which writes nothing.
_PAD_ROW: Final[tuple[int, ...]] = (_PAD_OP,) + (0,) * (_GROUP_WRITE_WIDTH - 1)


def prepare_group_writes(db: sqlite3.Connection) -> None:
    """Make the writer connection's TEMP view for ``GROUP_WRITE`` (once, at open). The
    TEMP schema is kept in memory: nothing is written to a temporary file, which a
    read-only root file system would refuse."""
    db.execute("PRAGMA temp_store = MEMORY")
    db.executescript(GROUP_WRITE_VIEW)


def _one_call(db: sqlite3.Connection, plan: Plan) -> bool:
    """Write the group's events and keys in one statement and commit, when it writes
    nothing else; else leave it to the statements (``False``)."""
    rows = len(plan.fresh)
    if (
        not plan.fresh
        or rows > ONE_CALL_MAX_ROWS
        or plan.duplicates
        or plan.ledger  # settlements counted (and written: the next condition)
        or db.in_transaction  # settlements were written: the statements' transaction
    ):
        return False
    values: list[Any] = []
    for seq, e in plan.fresh:
        values += (0, seq, len(e.body), *_event_values(e), bytearray(e.fingerprint))
    # Padded to a multiple of 8 rows: each size is a statement of its own, prepared once
    # and cached (``opening._WRITER_CACHED_STATEMENTS``); 8 keeps the padding small.
    size = -(-rows // 8) * 8
    values += _PAD_ROW * (size - rows)
    # Outside a transaction the statement is its own, committed within the same call: the
    # writer's thread keeps off the GIL from the first row to the end of the commit. It
    # is the only connection that writes, so no other commit can come between its read
    # and its write.
    level = db.isolation_level
    db.isolation_level = None
    try:
        db.execute(with_rows(GROUP_WRITE, _GROUP_WRITE_WIDTH, size), values)
    finally:
        db.isolation_level = level
    return True


def _write_and_commit(
    db: sqlite3.Connection, plan: Plan, *, one_call: bool, reserve_to: int = 0
) -> None:
    """Write the group's new events and keys, its ledger and duplicates, and commit; in
    one call to SQLite when ``one_call`` and nothing else is to be written. With
    ``reserve_to``, ``sqlite_sequence`` is moved ahead to it (``SEQ_RESERVE``)."""
    if one_call and _one_call(db, plan):
        return
    if plan.fresh:
        keys = [
            (e.idem_key, e.id, bytearray(e.fingerprint), e.created_at, e.received_at)
            for _, e in plan.fresh
        ]
        _insert_rows(db, INSERT_KEY, KEY_ROW_VALUES, keys)
        rows = [(seq, len(e.body), *_event_values(e)) for seq, e in plan.fresh]
        _insert_rows(db, INSERT_EVENT, EVENT_ROW_VALUES, rows)
        if reserve_to:
            db.execute(RESERVE_SEQS, (reserve_to,))
            plan.seq_reserved = reserve_to
    if plan.ledger:
        rows = [(*k, *d) for k, d in plan.ledger.items()]
        _insert_rows(db, UPSERT_LEDGER_ROWS, LEDGER_ROW_VALUES, rows)
    if plan.duplicates:  # the rest of the counts are the ledger's totals (``sql.COUNTS``)
        db.execute(BUMP_COUNTER, (plan.duplicates, "duplicates"))
    db.commit()


def _insert_rows(
    db: sqlite3.Connection, statement: str, width: int, rows: list[tuple[Any, ...]]
) -> None:
    """``rows`` through the multi-row ``statement``, in chunks (``sql.row_chunks``)."""
    if len(rows) == 1:  # a quiet sidecar's every commit: no chunks to plan or values to join
        db.execute(with_rows(statement, width, 1), rows[0])
        return
    start = 0
    for n in row_chunks(len(rows)):
        values = [v for row in rows[start : start + n] for v in row]
        db.execute(with_rows(statement, width, n), values)
        start += n


def _write_settles(
    db: sqlite3.Connection, settles: list[Settle], plan: Plan, now: float, *, queued: int
) -> None:
    """Record ``settles`` in the open transaction; ``queued``: events queued before it."""
    seqs = [s.seq for op in settles for s in op.settlements]
    only_delivered = all(isinstance(s, Delivered) for op in settles for s in op.settlements)
    select = _DELETE_SETTLED if only_delivered else _SELECT_SETTLED
    rows = _records(db, _Settled, *bind_list(select, seqs))
    plan.events += len(seqs)
    s = _plan_settles(settles, {r.seq: r for r in rows}, plan, now)
    if s.retry_rows:
        db.executemany(RETRY, s.retry_rows)
    if s.delivered and not only_delivered:
        # One statement (not one per row): the writer thread takes the GIL back after
        # every SQLite step, and each time it may have to wait for the loop.
        db.execute(*bind_list(DELETE_EVENTS, s.delivered))
    for row in s.dead_rows:
        # One at a time, after the deliveries: each dead letter reuses the pages the
        # ones before it freed, so the database grows by one event at most, within the
        # disk budget's reserve, even when it is full.
        db.execute(INSERT_DEAD, row)
        db.execute(DELETE_EVENT, (row[-1],))
    if s.deleted:
        for state, keys in s.keys.items():
            if keys:
                statement, listed = bind_list(SETTLE_KEYS, keys)
                db.execute(statement, (state, now, *listed))
        plan.removed = len(s.deleted)
        if plan.oldest is not None and plan.oldest[0] in s.deleted:
            plan.oldest = None
            if queued > len(s.deleted):  # else none is left to read (a quiet queue's usual)
                for seq, age_from in db.execute(OLDEST):
                    plan.oldest = (int(seq), float(age_from))
            plan.oldest_changed = True


@dataclass(slots=True)
class _Settling:
    """What one group's settlements write besides the plan's counts."""

    retry_rows: list[tuple[Any, ...]] = field(default_factory=list)
    dead_rows: list[tuple[Any, ...]] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    keys: dict[int, list[str]] = field(default_factory=lambda: {DELIVERED: [], DEAD: []})


def _plan_settles(
    settles: list[Settle], present: dict[int, _Settled], plan: Plan, now: float
) -> _Settling:
    """Count ``settles`` of the events ``present`` (still queued) into ``plan``."""
    out = _Settling()
    for op in settles:
        for s in op.settlements:
            found = present.get(s.seq)
            if found is None:
                continue  # no longer queued (settled before, or settled twice here)
            if isinstance(s, Retry):
                out.retry_rows.append((s.next_attempt_at, s.error, s.seq))
                continue
            del present[s.seq]
            # In Python, cached per day: cheaper than SQLite's strftime on every row.
            day = utc_day(found.received_at)
            ledger_key = (found.agent_key, found.kind, found.event_type, day)
            if isinstance(s, Delivered):
                out.delivered.append(s.seq)
                plan.delivered += 1
                out.keys[DELIVERED].append(found.idem_key)
                # Its receipt too: the ledger table counts an event once it is settled
                # (the events table is its record until then; schema version 5).
                bump(plan.ledger, ledger_key, IN_RECEIVED, found.value)
                bump(plan.ledger, ledger_key, IN_DELIVERED, found.value)
                count(plan.delivered_kinds, found.kind)
            else:
                plan.dead_lettered += 1
                out.keys[DEAD].append(found.idem_key)
                out.dead_rows.append((now, s.reason, s.status, s.detail, s.seq))
                plan.dead_bytes += found.size
                bump(plan.ledger, ledger_key, IN_RECEIVED, found.value)
                bump(plan.ledger, ledger_key, IN_DEAD, found.value)
                count(plan.dead_by, (found.kind, s.reason))
            out.deleted.append(s.seq)
            plan.removed_bytes += found.size
    return out
