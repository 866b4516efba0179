"""The disk budget: how ``max_queue_bytes`` is shared between the files of the data directory.

``max_queue_bytes`` bounds every file the sidecar keeps in its data directory: the
database (queued events, remembered keys, dead letters, the ledger, indexes, free pages),
its WAL and shared-memory files, the lock and the clean-shutdown record, and anything
else found there at start-up (a moved-aside corrupt database). The store splits it:

``other``
    what the other files took at start-up, plus an allowance for the small ones the
    sidecar writes (lock, clean-shutdown record).
``wal``
    the WAL: checkpointed (and truncated) once it passes ``wal_soft_bytes`` after a
    commit, so it stays below that plus the largest transaction, which ``txn_bytes``
    bounds (groups are cut by bytes, settlements too).
``shm``
    the WAL's shared-memory index: 32 KiB for every 4,096 WAL pages.
``database``
    the rest. SQLite refuses to grow the file past it (``max_page_count``); new events
    are refused with ``queue_full`` once they would leave less than ``reserve_bytes``
    free in it, the room that settlements (dead letters are moved, one at a time),
    key pruning and the writer's probe need, so forwarding never stalls on a full disk.

Plain arithmetic, no I/O, except ``data_dir_bytes``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB

#: The lock file, the clean-shutdown record and its temporary: a block or two each.
SMALL_FILES_BYTES: Final = 64 * KiB
#: The WAL is checkpointed and truncated once a commit leaves it larger than this share
#: of the budget (within the bounds below).
WAL_SOFT_SHARE: Final = 32
WAL_SOFT_MIN: Final = 256 * KiB
WAL_SOFT_MAX: Final = 32 * MiB
#: The dead letters of one settlement transaction, in body bytes, at most (a single dead
#: letter may be larger: it goes alone).
SETTLE_DEAD_BYTES: Final = 256 * KiB
SHM_SEGMENT_BYTES: Final = 32 * KiB
SHM_SEGMENT_PAGES: Final = 4096
#: The least room the database keeps for writes that are not new events.
RESERVE_MIN: Final = 512 * KiB
#: The smallest share the database may have: below it the budget is refused.
DATABASE_MIN: Final = 1 * MiB
#: What a queued event may take in the database beyond its body, at most: its row, its
#: key row, their index entries. It errs high (docs/PERFORMANCE.md has the measured
#: cost), and the body is counted half again for pages that are not full.
EVENT_OVERHEAD_BYTES: Final = 640
#: What a dead letter takes beyond its body, at most (measured in the same place).
DEAD_LETTER_OVERHEAD_BYTES: Final = 300
DEFAULT_PAGE_SIZE: Final = 4096


def event_disk_bytes(body_bytes: int) -> int:
    """What one queued event of ``body_bytes`` may add to the database, erring high."""
    return body_bytes + body_bytes // 2 + EVENT_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class DiskBudget:
    """How ``max_bytes`` is shared (see the module docstring). Build it with ``plan``."""

    max_bytes: int
    page_size: int
    other_bytes: int
    wal_soft_bytes: int
    #: Body bytes of the submissions in one group transaction, at most (a single
    #: submission is never split, and is at most ``max_body_bytes``).
    group_body_bytes: int
    txn_bytes: int
    shm_bytes: int
    reserve_bytes: int

    @classmethod
    def plan(
        cls,
        max_bytes: int,
        *,
        max_body_bytes: int,
        other_bytes: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> DiskBudget:
        wal_soft = min(WAL_SOFT_MAX, max(WAL_SOFT_MIN, max_bytes // WAL_SOFT_SHARE))
        # One transaction: a group of submissions (up to max_body_bytes of bodies, more
        # on disk) and one settlement batch (SETTLE_DEAD_BYTES, or one larger dead
        # letter), with the pages their indexes and the ledger touch.
        txn = 2 * max_body_bytes + SETTLE_DEAD_BYTES + 512 * KiB
        wal_pages = (wal_soft + txn) // page_size + 1
        shm = SHM_SEGMENT_BYTES * (wal_pages // SHM_SEGMENT_PAGES + 2)
        return cls(
            max_bytes=max_bytes,
            page_size=page_size,
            other_bytes=other_bytes + SMALL_FILES_BYTES,
            wal_soft_bytes=wal_soft,
            group_body_bytes=max_body_bytes,
            txn_bytes=txn,
            shm_bytes=shm,
            reserve_bytes=max(RESERVE_MIN, max_body_bytes + 256 * KiB),
        )

    @property
    def wal_bytes(self) -> int:
        """The WAL's share: what it may reach before and during one transaction."""
        return self.wal_soft_bytes + self.txn_bytes

    @property
    def database_bytes(self) -> int:
        """The database file's share (its ``max_page_count`` times the page size)."""
        pages = (self.max_bytes - self.other_bytes - self.wal_bytes - self.shm_bytes) // (
            self.page_size
        )
        return max(0, pages) * self.page_size

    @property
    def max_pages(self) -> int:
        return self.database_bytes // self.page_size

    @property
    def intake_bytes(self) -> int:
        """Bytes of the database that queued events, keys and dead letters may use before
        new events are refused: its share less the reserve."""
        return max(0, self.database_bytes - self.reserve_bytes)

    def problem(self) -> str | None:
        """Why this budget cannot work, or ``None``."""
        if self.intake_bytes < DATABASE_MIN:
            least = (
                self.max_bytes - self.intake_bytes + DATABASE_MIN + MiB - 1
            ) // MiB  # whole MiB
            return (
                f"max_queue_bytes={self.max_bytes} leaves less than {DATABASE_MIN // MiB} MiB "
                f"for events once the WAL, its index, the reserve for forwarding and the "
                f"other files in the data directory ({self.other_bytes} bytes) are counted; "
                f"use at least {least} MiB ({least * MiB} bytes), or a smaller max_body_bytes"
            )
        return None


def minimum_queue_bytes(max_body_bytes: int) -> int:
    """The least ``max_queue_bytes`` that leaves room for events in an empty data directory."""
    budget = DiskBudget.plan(0, max_body_bytes=max_body_bytes)
    need = budget.other_bytes + budget.wal_bytes + budget.shm_bytes + budget.reserve_bytes
    return need + DATABASE_MIN + budget.page_size


def file_bytes(path: str | os.PathLike[str]) -> int:
    """What one file takes: its size, or its allocated blocks when more; 0 when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return max(st.st_size, st.st_blocks * 512)


def fs_free_bytes(path: Path) -> int | None:
    """What the file system holding ``path`` still gives a process that is not root (its
    free blocks less those kept for root); ``None`` when it cannot be read."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def data_dir_bytes(data_dir: Path, *, exclude: frozenset[str] = frozenset()) -> int:
    """What the regular files directly in ``data_dir`` take (``file_bytes`` each), the
    names in ``exclude`` left out. A handful of ``stat`` calls."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(data_dir) as entries:
        for entry in entries:
            if entry.name in exclude:
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    total += max(st.st_size, st.st_blocks * 512)
    return total


__all__ = [
    "DiskBudget",
    "data_dir_bytes",
    "event_disk_bytes",
    "file_bytes",
    "fs_free_bytes",
    "minimum_queue_bytes",
]
