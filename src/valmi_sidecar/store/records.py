"""What the store takes and gives: its errors and its records, each defined once.

A record's fields are the columns it is read from (``queries`` derives its ``SELECT``
lists from them), so a field added here is read everywhere or fails a test.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Final

import msgspec

from ..events import Kind, NewEvent, check_idempotency_key
from ..histogram import COMMIT_EVENTS_BUCKETS, COMMIT_SECONDS_BUCKETS, Histogram

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


class Accepted(msgspec.Struct, frozen=True):
    """The answer for one submitted event: its id and receipt time; ``duplicate`` when the
    idempotency key was seen before with the same body (then id and created_at are the
    original's, and nothing new was stored)."""

    id: str
    created_at: str
    duplicate: bool


class QueuedEvent(msgspec.Struct, frozen=True):
    seq: int
    id: str
    idem_key: str
    kind: Kind
    body: bytes
    #: When the event was received, or re-queued from the dead letters if later: the
    #: start of its age for ``max_event_age_s``.
    received_at: float
    attempts: int


class Delivered(msgspec.Struct, frozen=True):
    seq: int


class Retry(msgspec.Struct, frozen=True):
    seq: int
    next_attempt_at: float
    error: str


class DeadLetter(msgspec.Struct, frozen=True):
    seq: int
    reason: str
    status: int | None
    detail: str
    #: The event's body bytes, when the caller knows them: the flusher keeps the dead
    #: letters of one settlement within ``disk.SETTLE_DEAD_BYTES``.
    size: int = 0


Settlement = Delivered | Retry | DeadLetter


class Counts(msgspec.Struct, frozen=True):
    received: int
    queued: int
    queued_bytes: int
    delivered: int
    dead_lettered: int
    duplicates: int
    oldest_queued_at: float | None


class DiskUsage(msgspec.Struct, frozen=True):
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


#: Dead letters taking this share of the disk budget or more are reported (status, log).
DEAD_LETTER_WARN_SHARE: Final = 0.25


class Unwritable(msgspec.Struct, frozen=True):
    """Why the store takes no writes now: since a commit failed, until one succeeds."""

    #: Seconds since the first commit that failed.
    for_s: float
    #: Commits failed since (each request's, and maintenance's).
    failed_commits: int
    #: SQLite's message of the last failure (``database or disk is full``).
    error: str
    #: What the file system had left when SQLite last found no room; else ``None``.
    fs_free_bytes: int | None


class DeadLetterRecord(msgspec.Struct, frozen=True):
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


class DeadLetterFilter(msgspec.Struct, frozen=True):
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


class LedgerRow(msgspec.Struct, frozen=True):
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


class ImportResult(msgspec.Struct, frozen=True):
    imported: int
    duplicates: int
    conflicts: int


class CorruptDatabaseError(StoreError):
    """The database file is damaged (SQLITE_CORRUPT, SQLITE_NOTADB, or an integrity check
    that found problems)."""


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


class UnreadableRow(msgspec.Struct, frozen=True):
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
