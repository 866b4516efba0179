"""The operations the writer takes, and the plan a transaction returns.

A plan says what one committed transaction changed; the writer applies it to the mirror
of the committed state and to the disk after ``COMMIT``, on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..events import NewEvent
from .records import Accepted, DeadLetterFilter, Settlement

#: ``keys`` rows deleted per prune transaction (the writer interleaves other work; each
#: transaction stays within the disk budget's bound on one transaction's WAL).
PRUNE_CHUNK: Final = 2_000


# -- the operations the writer takes ----------------------------------------------------


@dataclass(slots=True, eq=False)
class Submit:
    events: Sequence[NewEvent]
    future: asyncio.Future[list[Accepted]]
    #: Look up every key, the sidecar's own too: events that come back (salvage) keep
    #: the keys they were given, and those may be stored already.
    all_keys: bool = False


@dataclass(slots=True, eq=False)
class Settle:
    settlements: list[Settlement]
    future: asyncio.Future[None]
    #: A rider waits, until this ``time.monotonic()``, for a transaction of submissions to
    #: join rather than making one of its own (0: no wait).
    ride_until: float = 0.0
    #: Before this ``time.monotonic()`` a rider sits out transactions of submissions, to
    #: gather company (``core.RIDERS_GATHER_S``).
    boards_at: float = 0.0
    #: Taken by the writer for a transaction: from then on its thread reads
    #: ``settlements``, and none may join.
    boarded: bool = False

    def join(self, settlement: Settlement) -> bool:
        """Add ``settlement`` to this rider while it waits (on the event loop, as the
        writer takes riders): recorded in the same transaction, its future resolved with
        this one's. ``False`` once the writer took it, or it ended."""
        if self.boarded or self.future.done():
            return False
        self.settlements.append(settlement)
        return True


@dataclass(slots=True, eq=False)
class Prune:
    """Maintenance, run alone in the writer: delete up to ``PRUNE_CHUNK`` expired keys
    (``cutoff`` is a time), or with ``cutoff=None`` release free pages."""

    cutoff: float | None
    future: asyncio.Future[int]


@dataclass(slots=True, eq=False)
class Requeue:
    """Operator action, run alone: move up to ``limit`` dead letters back to the queue."""

    filter: DeadLetterFilter
    limit: int
    future: asyncio.Future[int]


@dataclass(slots=True, eq=False)
class Purge:
    """Operator action, run alone: delete up to ``limit`` dead letters (counts stay)."""

    filter: DeadLetterFilter
    limit: int
    future: asyncio.Future[int]


Op = Submit | Settle | Prune | Requeue | Purge
#: Operations that run in a transaction of their own.
SOLO: Final = (Prune, Requeue, Purge)


# -- the plan ----------------------------------------------------------------------------

#: ``(agent_key, kind, event_type, day)`` -> ``[received, delivered, dead_lettered,
#: received_value, delivered_value, dead_lettered_value]``.
LedgerDelta = dict[tuple[str, str, str, str], list[float]]
#: Ledger columns.
IN_RECEIVED, IN_DELIVERED, IN_DEAD = 0, 1, 2


class Fail:
    """A planned failure of one operation (raised to its caller after the commit)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The committed state a transaction starts from (read on the event loop before it)."""

    next_seq: int
    oldest: tuple[int, float] | None
    queued: int
    queued_bytes: int
    #: The time a re-queue gives its events as the start of their age.
    now: float
    #: The events table's ``sqlite_sequence`` value: seqs up to it need no write of it.
    seq_reserved: int


@dataclass(frozen=True, slots=True)
class Limits:
    max_events: int
    dedup_window_s: float


@dataclass(slots=True)
class Plan:
    """What one transaction changes, applied to the mirror after ``COMMIT``."""

    results: list[tuple[Op, Any]] = field(default_factory=list)
    received: int = 0
    queued_bytes: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    removed: int = 0
    removed_bytes: int = 0
    next_seq: int = 0
    #: The ``sqlite_sequence`` value this transaction stored ahead (0: none).
    seq_reserved: int = 0
    oldest: tuple[int, float] | None = None
    oldest_changed: bool = False
    ledger: LedgerDelta = field(default_factory=dict)
    events: int = 0
    received_kinds: dict[str, int] = field(default_factory=dict)
    delivered_kinds: dict[str, int] = field(default_factory=dict)
    duplicate_kinds: dict[str, int] = field(default_factory=dict)
    dead_by: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Body bytes of the events dead-lettered.
    dead_bytes: int = 0
    #: Dead letters re-queued (they leave the dead letters for the queue) or purged.
    requeued: int = 0
    purged: int = 0
    #: Body bytes of the dead letters that left (re-queued or purged).
    dead_removed_bytes: int = 0
    #: The events this transaction added to the queue, with their seqs.
    fresh: list[tuple[int, NewEvent]] = field(default_factory=list)
    #: What the accepted events may add to the database (``disk.event_disk_bytes``).
    disk_added: int = 0
    #: Bytes of the database in use, when measured during this group (before its writes).
    disk_measured: int | None = None
    #: Whether new events are refused for want of room, when this group decided it.
    disk_full: bool | None = None
    #: Bytes of the database in use after the commit, when measured (room freed).
    disk_after: int | None = None


def bump(
    delta: LedgerDelta,
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


def count(counts: dict[Any, int], key: Any, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n
