"""The SQLite queue: schema and migrations, the group-commit writer, lease / settle, counts.

INTERFACE STUB: the signatures below are the contract other modules code against.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .events import Kind, NewEvent


class StoreError(Exception):
    """A write failed (disk full, I/O error, database closed). Nothing of it was committed."""


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


class Store:
    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        durability: Literal["full", "normal"] = "full",
        max_queue_bytes: int = 1024**3,
        max_queue_events: int = 5_000_000,
        dedup_window_s: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> Store:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def submit(self, events: Sequence[NewEvent]) -> list[Accepted]:
        raise NotImplementedError

    async def lease(self, limit: int, exclude: Collection[int]) -> list[QueuedEvent]:
        raise NotImplementedError

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        raise NotImplementedError

    async def next_due_at(self, exclude: Collection[int]) -> float | None:
        raise NotImplementedError

    def counts(self) -> Counts:
        raise NotImplementedError

    async def wait_for_events(self) -> None:
        raise NotImplementedError

    async def prune(self) -> int:
        raise NotImplementedError

    async def dead_letters(self, limit: int = 100) -> list[DeadLetterRecord]:
        raise NotImplementedError

    @property
    def writable(self) -> bool:
        raise NotImplementedError
