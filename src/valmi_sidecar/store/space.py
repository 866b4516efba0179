"""The database against its disk budget: how much is in use, and whether events fit.

``Space`` keeps a mirror of the bytes the database uses that errs high (measured, plus
what was added since), so that a submission is refused before its commit would pass the
budget without measuring the file for every commit. It measures the database (pages less
free pages, one statement) only when the mirror says a submission does not fit. After a
commit it cuts the WAL once past its soft bound. Settlements are never refused: they move
dead letters one at a time into pages freed before, within the reserve.

The methods that take a connection run on the writer's thread; ``apply`` and the
properties on the event loop (the writer never runs both at once).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog

from ..disk import EVENT_OVERHEAD_BYTES, DiskBudget, file_bytes, fs_free_bytes
from .records import QueueFullError
from .schema import BUSY_TIMEOUT_MS, DB_NAME, is_full
from .sql import MEASURE

if TYPE_CHECKING:
    from .plan import Plan

log = structlog.get_logger("valmi_sidecar.store")

#: The ``Retry-After`` given with ``QueueFullError``.
QUEUE_FULL_RETRY_AFTER_S: Final = 30
#: Below this much room for events in the database, ``/readyz`` says the queue is full,
#: and says so until this much is free again.
FULL_ROOM_BYTES: Final = 4 * 1024
ROOM_AGAIN_BYTES: Final = 64 * 1024


class Space:
    """The bytes of the database in use, and whether new events are refused for room."""

    def __init__(self, budget: DiskBudget, path: Path) -> None:
        self.budget = budget
        # Read for every group and every commit: the budget's properties derive it anew.
        self._intake_bytes = budget.intake_bytes
        self._path = path
        # A string: ``os.stat`` after every commit, without ``pathlib`` around it.
        self._wal_path = str(path.with_name(DB_NAME + "-wal"))
        #: Bytes of the database in use as last measured plus what was added since.
        self.used = 0
        #: Whether new events are refused for want of room.
        self.full = False
        #: Writer thread only: the last checkpoint left the WAL past its soft bound.
        self.wal_over = False
        # Writer thread only: group commits that may pass before the WAL is measured
        # again. A commit adds at most ``txn_bytes`` to it, so while the last size plus
        # that many transactions stays within the soft bound, no commit can pass it.
        self._wal_unmeasured = 0
        #: What the file system had left when a transaction last failed for want of room
        #: (written on the writer's thread, read on the loop after it reported the failure).
        self.failed_free: int | None = None

    # -- on the writer's thread ------------------------------------------------------------

    def measure(self, db: sqlite3.Connection) -> int:
        """Bytes of the database in use now: its pages less the free ones."""
        pages, free = db.execute(MEASURE).fetchone()
        return (int(pages) - int(free)) * self.budget.page_size

    def measure_now(self, db: sqlite3.Connection) -> None:
        """Measure and set the mirror (at open, and after a transaction of its own)."""
        self.used = self.measure(db)
        self.full = self._full_after(self.full, refused=False)

    def checkpoint_if_big(self, db: sqlite3.Connection, *, group: bool = False) -> None:
        """Checkpoint and truncate the WAL once a commit left it past its soft bound (a
        reader in the middle of a long read can hold it; then ``wal_over`` stays set and
        new events wait, see ``room_for``).

        After a ``group`` commit the WAL is measured only when it could be past the bound:
        its size was last read as at most the bound less as many ``txn_bytes`` as group
        commits came since. Any other transaction (maintenance, an operator's) measures."""
        if group and self._wal_unmeasured > 0:
            self._wal_unmeasured -= 1
            return
        bound = self.budget.wal_soft_bytes
        size = file_bytes(self._wal_path)
        if size <= bound:
            self.wal_over = False
            self._wal_unmeasured = (bound - size) // self.budget.txn_bytes
            return
        self._wal_unmeasured = 0
        # Without waiting for readers: a long read (a 'check' of the file) must not stall
        # every commit behind it; new events wait instead until the WAL can be cut.
        db.execute("PRAGMA busy_timeout = 0")
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        size = file_bytes(self._wal_path)
        self.wal_over = size > bound
        if self.wal_over:
            log.warning("wal_checkpoint_blocked", wal_bytes=size, bound=bound)
        else:
            self._wal_unmeasured = (bound - size) // self.budget.txn_bytes

    def note_failure(self, exc: BaseException) -> None:
        """After a transaction failed (on the writer's thread): when SQLite found no room,
        how much the file system holding the database has left, for the log to say which
        was full, the file system or the database's share of the budget."""
        self.failed_free = fs_free_bytes(self._path.parent) if is_full(exc) else None

    def checkpoint_failed(self, exc: sqlite3.Error) -> None:
        self.wal_over = True
        self._wal_unmeasured = 0
        log.warning("checkpoint_failed", error=str(exc))

    def room_for(self, db: sqlite3.Connection, plan: Plan, need: int) -> QueueFullError | None:
        """Whether events that may take ``need`` bytes fit in the disk budget after what
        this group accepted so far: ``None`` (then counted in the plan) or the refusal. The
        database is measured only when the mirror, which errs high, says they do not fit."""
        budget = self.budget
        used = self.used if plan.disk_measured is None else plan.disk_measured
        intake = self._intake_bytes
        if used + plan.disk_added + need > intake and plan.disk_measured is None:
            used = plan.disk_measured = self.measure(db)
        if self.wal_over:
            plan.disk_full = True
            return QueueFullError(
                f"the WAL of {self._path} could not be checkpointed (a long read holds it), "
                f"and max_queue_bytes={budget.max_bytes} leaves it no more room; retry later",
                QUEUE_FULL_RETRY_AFTER_S,
            )
        if used + plan.disk_added + need > intake:
            plan.disk_full = True
            return QueueFullError(
                f"the data directory is at its disk budget, max_queue_bytes={budget.max_bytes}: "
                f"{used + plan.disk_added} of the {intake} bytes the database "
                "keeps for events, keys and dead letters are in use; retry later (forwarding "
                "frees room; dead letters keep theirs until re-queued or purged)",
                QUEUE_FULL_RETRY_AFTER_S,
            )
        plan.disk_added += need
        plan.disk_full = False
        return None

    def requeue_refusal(
        self, db: sqlite3.Connection, n: int, queued: int, max_events: int
    ) -> QueueFullError | None:
        """A re-queued dead letter leaves its row for an event row of about the same size:
        it needs little room, and may use half the reserve (an operator freeing room)."""
        used = self.measure(db)
        budget = self.budget
        room = budget.intake_bytes + budget.reserve_bytes // 2 - used
        if queued + n > max_events or n * EVENT_OVERHEAD_BYTES > room:
            return QueueFullError(
                f"re-queueing {n} dead letters would pass the queue's limit "
                f"({queued} of {max_events} events queued; {used} bytes of the "
                f"database in use, max_queue_bytes={budget.max_bytes}); retry fewer or later",
                QUEUE_FULL_RETRY_AFTER_S,
            )
        return None

    def warn_if_short(self, dead_letter_bytes: int) -> None:
        """Say at start-up when the budget is too small for anything, or already full."""
        problem = self.budget.problem()
        if problem is not None:
            log.error(
                "disk_budget_too_small",
                problem=problem,
                other_files_bytes=self.budget.other_bytes,
                action="raise max_queue_bytes, or remove what else is in the data directory "
                "(salvage, then delete, moved-aside databases)",
            )
        elif self.full:
            self.log_change(False, dead_letter_bytes)

    # -- on the event loop -----------------------------------------------------------------

    def failure_hint(self) -> dict[str, object]:
        """What the log of a failed transaction says of the room (``note_failure``)."""
        free = self.failed_free
        if free is None:
            return {}
        hint: dict[str, object] = {"reason": "disk_full", "fs_free_bytes": free}
        if free < self.budget.txn_bytes:
            hint["action"] = (
                f"the file system holding {self._path.parent} is full before "
                f"max_queue_bytes={self.budget.max_bytes} is reached: free space on it, or "
                "lower max_queue_bytes to what it can hold; new events get 503 until a "
                "commit succeeds, and nothing queued is lost"
            )
        return hint

    def warn_if_disk_smaller(self, dir_bytes: int, fs_free: int | None) -> None:
        """Say at start-up when the file system cannot hold the budget: the files in the
        data directory (``dir_bytes``) and the file system's room (``fs_free``) together
        are less than ``max_queue_bytes``. The disk would then fill before the sidecar
        refuses events for its budget, and they would get ``503 store_unavailable``
        instead of ``queue_full``."""
        if fs_free is None or dir_bytes + fs_free >= self.budget.max_bytes:
            return
        most = dir_bytes + fs_free
        log.warning(
            "disk_smaller_than_budget",
            max_queue_bytes=self.budget.max_bytes,
            fs_free_bytes=fs_free,
            data_dir_bytes=dir_bytes,
            action=f"lower max_queue_bytes to at most {most} (less what else on this file "
            "system grows), or give the data directory's file system more room; until then "
            "the disk fills before the budget, and new events get 503 store_unavailable "
            "instead of queue_full",
        )

    def apply(self, plan: Plan, dead_letter_bytes: int) -> None:
        """The mirror of the disk after a group commit."""
        was_full = self.full
        if plan.disk_after is not None:
            self.used = plan.disk_after
        else:
            if plan.disk_measured is not None:
                self.used = plan.disk_measured
            self.used += plan.disk_added
        refused = plan.disk_full if plan.disk_after is None else None
        self.full = self._full_after(was_full, refused=bool(refused))
        self.log_change(was_full, dead_letter_bytes)

    def log_change(self, was_full: bool, dead_letter_bytes: int) -> None:
        if self.full and not was_full:
            log.warning(
                "disk_budget_full",
                max_queue_bytes=self.budget.max_bytes,
                database_in_use=self.used,
                dead_letter_bytes=dead_letter_bytes,
            )
        elif was_full and not self.full:
            log.info("disk_budget_room_again", database_in_use=self.used)

    def _full_after(self, was_full: bool, *, refused: bool) -> bool:
        """Whether the store is full now (``/readyz``): a submission was just refused for
        room, or too little is left; once full, until a fair amount is free again, so that
        it does not flap while small events still fit between refused large ones."""
        room = self._intake_bytes - self.used
        return refused or room < (ROOM_AGAIN_BYTES if was_full else FULL_ROOM_BYTES)
