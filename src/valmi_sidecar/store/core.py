"""The store's public face: ``Store``, the durable queue of one data directory.

One ``Store`` owns one data directory: an exclusive ``flock`` on ``DIR/lock`` (so two
sidecars never send the same queue twice) and the database ``DIR/queue.db`` (WAL).

Writes go through the group-commit writer (``writer.Writer``). Reads (``lease()``,
``next_due_at()``, the dead letters, the ledger) use a second, query-only connection on a
thread of its own: under WAL it sees committed data only, so the flusher never sends an
event whose commit then failed. ``counts()`` is the mirror of the committed state
(``mirror.Mirror``), no I/O.

``max_queue_bytes`` bounds every file in the data directory (``disk.DiskBudget``):
``space.Space`` refuses a submission with ``QueueFullError`` before its commit would pass it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from ..disk import DiskBudget, data_dir_bytes, fs_free_bytes
from ..events import NewEvent
from . import files, opening, reads
from .handoff import Handoff
from .mirror import Mirror
from .plan import PRUNE_CHUNK, Limits, Prune, Purge, Requeue, Settle, Submit
from .records import (
    Accepted,
    CorruptDatabaseError,
    Counts,
    DeadLetterFilter,
    DeadLetterRecord,
    DiskUsage,
    IdempotencyConflictError,
    ImportResult,
    LedgerRow,
    QueuedEvent,
    QueueFullError,
    Settlement,
    StoreError,
    StoreStats,
    Unwritable,
)
from .schema import DB_NAME
from .space import Space
from .thread import ConnectionClosedError, SqliteThread
from .writer import Writer

log = structlog.get_logger("valmi_sidecar.store")

#: How long ``close()`` lets the writer commit what is pending before it gives up (with
#: ``opening.CONNECTION_CLOSE_S`` for each connection, all of ``close()`` stays under 10 s).
CLOSE_DRAIN_S: Final = 5.0
#: A rider (``settle_soon`` with ``ride_s``) sits out the transactions of submissions that
#: come sooner than this (or half its ``ride_s``) after it, to gather company; then the
#: riders board one together (the writer lets them on sooner when ``writer.RIDERS_FULL``
#: ride, or with a settlement that does not ride). At 10 events/s a transaction then
#: records five deliveries with every fifth event, and at 100 eight with every eighth,
#: instead of one with every event: the settlement's statements and pages (the events'
#: delete, the keys' update, the ledger row), and the start of the writing that its first
#: statement pays, once for several. A crash in between re-sends what was delivered and
#: not yet recorded, with the same key, at most the flusher's bound on unsaved outcomes.
RIDERS_GATHER_S: Final = 0.5


class Store:
    """The durable queue of one data directory. Build it with ``await Store.open(...)``."""

    def __init__(
        self,
        *,
        data_dir: Path,
        lock_fd: int,
        conns: opening.Connections,
        options: opening.Options,
    ) -> None:
        budget = conns.budget
        self._data_dir = data_dir
        self._path = data_dir / DB_NAME
        self._lock_fd: int | None = lock_fd
        # Opened on the loop that uses it. Held, not asked for each submission: asking
        # (``asyncio.get_running_loop``) makes a ``getpid`` system call every time.
        self._loop = asyncio.get_running_loop()
        self._reader = conns.reader
        self._ledger_lock = asyncio.Lock()
        self._clock = options.clock
        self._window_s = options.dedup_window_s
        self._durability = options.durability
        self._mirror = Mirror(budget.max_bytes)
        self._space = Space(budget, self._path)
        self._handoff = Handoff()
        self._writer = Writer(
            conns.writer,
            path=self._path,
            mirror=self._mirror,
            space=self._space,
            handoff=self._handoff,
            limits=Limits(options.max_queue_events, options.dedup_window_s),
            clock=options.clock,
        )
        self._closing = False
        self._closed = False
        #: What start-up did about integrity: "passed" (``PRAGMA quick_check``), "skipped"
        #: (closed cleanly last time, the file unchanged since) or "off" (not asked).
        self.startup_check = "off"
        self._writer_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        durability: Literal["full", "normal"] = "full",
        max_queue_bytes: int = 1024**3,
        max_queue_events: int = 5_000_000,
        max_body_bytes: int = 1024 * 1024,
        dedup_window_s: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
        prune_interval_s: float | None = 600.0,
        recover_corrupt: bool = False,
    ) -> Store:
        """Lock ``data_dir``, open (or create and migrate) its database, start the writer.

        Raises ``DataDirLockedError`` when another sidecar uses the directory and
        ``StoreError`` when the database cannot be used (newer schema, no WAL, I/O;
        ``CorruptDatabaseError`` when the file is damaged).
        ``prune_interval_s=None`` turns the periodic prune off (call ``prune()`` yourself).

        ``max_queue_bytes`` bounds every file in ``data_dir`` (``disk.DiskBudget``; the
        largest submission, ``max_body_bytes``, sizes the WAL's share).

        ``recover_corrupt=True`` (the service) first runs ``PRAGMA quick_check``; a damaged
        file is moved aside to ``queue.db.corrupt-<UTC time>`` (with its WAL) and the store
        starts with an empty queue, so that a corrupt disk never makes a crash loop
        (``valmi-sidecar salvage FILE`` re-queues what can be read of it).
        """
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        data_dir = Path(data_dir)
        options = opening.Options(
            durability, max_queue_bytes, max_body_bytes, max_queue_events, dedup_window_s, clock
        )
        lock_fd = await asyncio.to_thread(files.lock_data_dir, data_dir)
        try:
            clean = await asyncio.to_thread(files.take_clean_record, data_dir)
            check = recover_corrupt and clean is None
            try:
                store = await cls._open_database(data_dir, lock_fd, options, check, clean)
                moved = None
            except CorruptDatabaseError as exc:
                if not recover_corrupt:
                    raise
                moved = await opening.move_aside(data_dir / DB_NAME, exc)
                store = await cls._open_database(data_dir, lock_fd, options, True, None)
            store.stats.corrupt_moved_aside = int(moved is not None)
            aside = await asyncio.to_thread(files.moved_aside_files, data_dir)
            store.stats.corrupt_files = len(aside)
            room = await asyncio.to_thread(_room, data_dir)
        except BaseException:
            os.close(lock_fd)
            raise
        store._start(prune_interval_s, *room)
        return store

    @classmethod
    async def _open_database(
        cls,
        data_dir: Path,
        lock_fd: int,
        options: opening.Options,
        check: bool,
        clean: tuple[int, int] | None,
    ) -> Store:
        """Connect, check, migrate and load; on failure close the connections (not the lock).

        ``clean``: the queue's size from the clean-shutdown record, when it matched."""
        conns = await opening.connect(data_dir, options, check=check)
        try:
            store = cls(data_dir=data_dir, lock_fd=lock_fd, conns=conns, options=options)
            store.startup_check = "passed" if check else "skipped" if clean else "off"
            await conns.reader.call(lambda db: store._mirror.load(db, clean))
            await conns.writer.call(store._space.measure_now)
        except BaseException as exc:
            await conns.close()
            if isinstance(exc, sqlite3.Error):
                raise opening.open_error(data_dir / DB_NAME, exc) from exc
            raise
        return store

    def _start(self, prune_interval_s: float | None, dir_bytes: int, fs_free: int | None) -> None:
        self._writer_task = asyncio.create_task(self._writer.run(), name="store-writer")
        if prune_interval_s is not None:
            self._prune_task = asyncio.create_task(
                self._run_pruner(prune_interval_s), name="store-prune"
            )
        c = self.counts()
        log.info(
            "store_opened",
            path=str(self._path),
            durability=self._durability,
            integrity_check=self.startup_check,
            queued=c.queued,
            queued_bytes=c.queued_bytes,
            received=c.received,
            delivered=c.delivered,
            dead_lettered=c.dead_lettered,
            disk_bytes=dir_bytes,
            max_queue_bytes=self._space.budget.max_bytes,
        )
        self._space.warn_if_short(self._mirror.dead_letter_disk_bytes())
        self._space.warn_if_disk_smaller(dir_bytes, fs_free)

    async def close(self) -> None:
        """Refuse new writes, commit what is pending (bounded by ``CLOSE_DRAIN_S``), stop
        the writer and the pruner, close both connections and release the lock."""
        if self._closing:
            return
        self._closing = True
        writer = self._writer
        try:
            if self._prune_task is not None:
                self._prune_task.cancel()
                await asyncio.wait({self._prune_task})
            clean = await writer.finish(self._writer_task, CLOSE_DRAIN_S)
            clean = await opening.close_all((self._reader, writer.conn)) and clean
            if clean and writer.writable:
                m = self._mirror
                await opening.record_clean_close(self._data_dir, m.queued, m.queued_bytes)
            await asyncio.to_thread(files.give_files, self._data_dir)
        finally:
            self._closed = True
            for conn in (self._reader, writer.conn):
                conn.stop()  # a close cancelled before its turn: the thread ends anyway
            if self._lock_fd is not None:
                fd, self._lock_fd = self._lock_fd, None
                os.close(fd)  # releases the flock
        log.info("store_closed", path=str(self._path), queued=self._mirror.queued)

    # -- state ---------------------------------------------------------------------------

    def received_within(self, seconds: float) -> bool:
        """Whether received events went into a transaction in the last ``seconds``."""
        return time.monotonic() - self._writer.submitted_at < seconds

    @property
    def writable(self) -> bool:
        """False after a failed commit (or once the writer stopped) until a commit succeeds."""
        return self._writer.writable and not self._closed

    def unwritable(self) -> Unwritable | None:
        """While commits fail (``writable`` is False for that): since when, how many, and
        the last error; ``None`` otherwise."""
        return self._writer.unwritable()

    @property
    def writer_task(self) -> asyncio.Task[None]:
        """The task that owns the writer (which itself runs from callbacks). It ends only
        in ``close()``; if it ends otherwise (an unexpected exception, which it carries),
        the store can no longer write: stop the service."""
        assert self._writer_task is not None
        return self._writer_task

    @property
    def in_transaction(self) -> bool:
        """Whether the writer is in the middle of a transaction."""
        return self._writer.in_transaction

    @property
    def riders_waiting(self) -> bool:
        """Whether settlements that ride wait in the writer, with its wake-up set."""
        return self._writer.riders_waiting

    @property
    def commits(self) -> int:
        """Transactions committed (submits, settles, maintenance; probes not counted)."""
        return self._writer.commits

    @property
    def probes(self) -> int:
        """Probe transactions finished (failed or not) while not ``writable``."""
        return self._writer.probes

    @property
    def stats(self) -> StoreStats:
        """What the store did since it opened, for ``/metrics``."""
        return self._mirror.stats

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def budget(self) -> DiskBudget:
        """How ``max_queue_bytes`` is shared between the files of the data directory."""
        return self._space.budget

    @property
    def full(self) -> bool:
        """Whether new events are refused for want of room in the disk budget."""
        return self._space.full

    def disk(self) -> DiskUsage:
        """The data directory against the disk budget (a few ``stat`` calls, no I/O wait)."""
        return DiskUsage(
            bytes=data_dir_bytes(self._data_dir),
            max_bytes=self._space.budget.max_bytes,
            full=self._space.full,
            dead_letters=self._mirror.dead_stored,
            dead_letter_bytes=self._mirror.dead_letter_disk_bytes(),
        )

    def database_bytes(self) -> int:
        """Bytes of the database file and its WAL (two ``stat`` calls, no I/O wait)."""
        total = 0
        for p in (self._path, self._path.with_name(self._path.name + "-wal")):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def counts(self) -> Counts:
        """The committed counts (in memory, no I/O)."""
        return self._mirror.counts()

    def rates(self) -> dict[str, float | None]:
        """Events a second over about the last minute (received, delivered, dead-lettered);
        ``None`` until two samples a second apart exist."""
        return self._mirror.rates()

    # -- writes --------------------------------------------------------------------------

    async def submit(self, events: Sequence[NewEvent]) -> list[Accepted]:
        """Make ``events`` durable, all or nothing; one ``Accepted`` per event, same order.

        Returns after the commit. Raises ``IdempotencyConflictError`` (a key reused with a
        different body), ``QueueFullError`` or ``StoreError``; then nothing was stored.
        """
        if not events:
            return []
        return await self._submit_future(events)

    def submit_soon(self, events: Sequence[NewEvent]) -> asyncio.Future[list[Accepted]]:
        """What ``submit`` does, without a task: the future resolves after the commit (or
        with the same errors). For callers that submit many at once (the ingest workers'
        channel); raises ``StoreError`` at once if the store is closing or stopped."""
        if events and not self._closing and self._writer.failure is None:
            # ``_submit_future`` written out for the usual case: every event takes it.
            future: asyncio.Future[list[Accepted]] = self._loop.create_future()
            self._writer.enqueue(Submit(events, future))
            return future
        return self._submit_future(events)

    def _submit_future(
        self, events: Sequence[NewEvent], *, all_keys: bool = False
    ) -> asyncio.Future[list[Accepted]]:
        future: asyncio.Future[list[Accepted]] = self._loop_future()
        if events:
            self._writer.enqueue(Submit(events, future, all_keys))
        else:
            future.set_result([])
        return future

    async def settle(self, settlements: Sequence[Settlement], *, ride_s: float = 0.0) -> None:
        """Record the outcome of sending leased events, in one transaction. A settlement
        for an event no longer queued is ignored. With ``ride_s``, the settlements wait up
        to that long to join the transaction of the next submission instead of making one
        of their own (which costs the writer several times more)."""
        if not settlements:
            return
        await self.settle_soon(settlements, ride_s=ride_s)

    def settle_soon(
        self, settlements: Sequence[Settlement], *, ride_s: float = 0.0
    ) -> asyncio.Future[None]:
        """What ``settle`` does, without a task: the future resolves after the commit (or
        fails with the same errors); raises ``StoreError`` at once if the store is closing
        or stopped. For the flusher, which records most outcomes this way."""
        if ride_s > 0 and settlements:
            return self.ride_soon(list(settlements), ride_s=ride_s).future
        future: asyncio.Future[None] = self._loop_future()
        if not settlements:
            future.set_result(None)
        else:
            self._writer.enqueue(Settle(list(settlements), future))
        return future

    def ride_soon(self, settlements: list[Settlement], *, ride_s: float) -> Settle:
        """``settle_soon`` of ``settlements`` that ride (``ride_s`` > 0), as the writer's
        operation: its ``future``, and ``join`` for more settlements to ride with them
        until the writer takes it (one future and one callback for all of them). Raises
        ``StoreError`` as ``settle_soon`` does."""
        op = Settle(settlements, self._loop_future())
        now = time.monotonic()
        op.ride_until = now + ride_s
        op.boards_at = now + min(RIDERS_GATHER_S, ride_s / 2)
        self._writer.enqueue(op)
        return op

    def board_riders(self) -> None:
        """Record the riding settlements now, alone if no submission comes, instead of
        letting them wait for company: for a caller that waits for them to be saved."""
        self._writer.board_riders()

    async def prune(self) -> int:
        """Forget the idempotency keys older than the de-dup window whose events left the
        queue, then give free pages back to the file system. Returns the keys deleted."""
        total = 0
        while True:
            n = await self._maintain(self._clock() - self._window_s)
            total += n
            if n < PRUNE_CHUNK:
                break
        await self._maintain(None)
        if total:
            log.info("keys_pruned", n=total)
        return total

    async def _maintain(self, cutoff: float | None) -> int:
        future: asyncio.Future[int] = self._loop_future()
        self._writer.enqueue(Prune(cutoff, future))
        return await future

    async def requeue_dead_letters(self, flt: DeadLetterFilter, limit: int) -> int:
        """Move up to ``limit`` matching dead letters back to the queue, with their original
        id and idempotency key; returns how many. Each transaction moves a bounded number
        of bytes (the disk budget's bound on the WAL); raises ``QueueFullError`` when not
        even the first would fit (nothing moved), or returns what moved before one did not."""
        return await self._change_dead_letters(Requeue, flt, limit)

    async def purge_dead_letters(self, flt: DeadLetterFilter, limit: int) -> int:
        """Delete up to ``limit`` matching dead letters; returns how many. The counts (and
        the ledger) still count them as dead-lettered: only the stored events go."""
        return await self._change_dead_letters(Purge, flt, limit)

    async def _change_dead_letters(
        self, kind: type[Requeue | Purge], flt: DeadLetterFilter, limit: int
    ) -> int:
        done = 0
        while done < limit:
            future: asyncio.Future[int] = self._loop_future()
            self._writer.enqueue(kind(flt, limit - done, future))
            try:
                n = await future
            except QueueFullError:
                if done:
                    break
                raise
            if n == 0:
                break
            done += n
        return done

    async def import_events(self, events: Sequence[NewEvent]) -> ImportResult:
        """Queue events that keep their id, key and receipt time (``salvage``). An event
        whose key is known with the same body is a duplicate (not stored again); with a
        different body, a conflict (skipped). Raises ``QueueFullError``/``StoreError``."""
        try:
            accepted = await self._submit_future(events, all_keys=True) if events else []
        except IdempotencyConflictError:
            # One at a time decides which ones conflict; they still share group commits.
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(self._import_one(e)) for e in events]
            except ExceptionGroup as group:
                raise group.exceptions[0] from group
            outcomes = [t.result() for t in tasks]
        else:
            outcomes = ["duplicate" if a.duplicate else "imported" for a in accepted]
        result = ImportResult(
            imported=outcomes.count("imported"),
            duplicates=outcomes.count("duplicate"),
            conflicts=outcomes.count("conflict"),
        )
        self.stats.salvaged += result.imported
        return result

    async def _import_one(self, event: NewEvent) -> str:
        try:
            (accepted,) = await self._submit_future([event], all_keys=True)
        except IdempotencyConflictError:
            return "conflict"
        return "duplicate" if accepted.duplicate else "imported"

    def _loop_future(self) -> asyncio.Future[Any]:
        if self._closing:
            raise StoreError("the store is closing")
        if self._writer.failure is not None:
            raise StoreError(f"the store's writer stopped: {self._writer.failure!r}")
        return self._loop.create_future()

    @property
    def writer_connection(self) -> SqliteThread:
        """The writer's connection: a seam for tests and benchmarks, which run statements
        on it between transactions (a full disk is ``PRAGMA max_page_count``) or close it
        (the writer's next call then fails unexpectedly). The sidecar never uses it."""
        return self._writer.conn

    # -- reads ---------------------------------------------------------------------------

    async def lease(self, limit: int, exclude: Collection[int]) -> list[QueuedEvent]:
        """Up to ``limit`` due events, oldest first, skipping the seqs in ``exclude``.

        Nothing is marked in the database: an event leased when the process dies is still
        queued at restart and is sent again with the same key.
        """
        if limit <= 0:
            return []
        events = await self._reader.call(reads.lease(self._clock(), limit, exclude))
        self._handoff.drop(events)
        return events

    def take_fresh(self, limit: int) -> list[QueuedEvent]:
        """Up to ``limit`` events committed since the last call (or lease), oldest first,
        without reading the database (``handoff``). Nothing is held for it until its first
        call. Events committed and not handed are counted in ``missed``: a caller that
        relies on this must lease when it grows."""
        return self._handoff.take(limit)

    @property
    def fresh(self) -> int:
        """Events committed that ``take_fresh`` would give now."""
        return len(self._handoff)

    @property
    def missed(self) -> int:
        """Events committed to the queue that ``take_fresh`` will not give (see there)."""
        return self._handoff.missed

    async def next_due_at(self, exclude: Collection[int]) -> float | None:
        """The earliest ``next_attempt_at`` of the queued events not in ``exclude``."""
        return await self._reader.call(reads.next_due_at(exclude))

    def on_new_events(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` on the loop after every commit that added events to the
        queue (received or re-queued), from inside the writer: it must be quick and must
        not raise. Returns the function that removes it."""
        return self._writer.listen(listener)

    async def dead_letters(
        self, limit: int = 100, flt: DeadLetterFilter | None = None
    ) -> list[DeadLetterRecord]:
        """Up to ``limit`` dead letters that match ``flt``, oldest event first."""
        return await self._reader.call(reads.dead_letters(flt or DeadLetterFilter(), limit))

    async def count_dead_letters(self, flt: DeadLetterFilter) -> int:
        """How many stored dead letters match ``flt``."""
        return await self._reader.call(reads.count_dead_letters(flt))

    async def dead_letter_summary(self) -> list[dict[str, Any]]:
        """Stored dead letters by reason: count, first and last ``dead_at``."""
        return await self._reader.call(reads.dead_letter_summary)

    async def ledger(
        self, agent_key: str | None = None, since: str | None = None, until: str | None = None
    ) -> list[LedgerRow]:
        """The ledger lines, filtered by agent key and UTC day (``YYYY-MM-DD``, inclusive).

        On a connection of its own, one read at a time: it reads the whole queue (about a
        second under a backlog of 1,000,000 events), and the flusher's reads on the
        reader's connection must not wait for that."""
        if self._closed:  # as for the reads on the reader's connection
            raise ConnectionClosedError("the database connection is closed")
        async with self._ledger_lock:
            conn = await opening.open_reader(self._path, "store-ledger")
            try:
                return await conn.call(reads.ledger(agent_key, since, until))
            finally:
                # Within its bound, and never in place of the read's own outcome: a caller
                # that gave up (cancelled) during a long read gets its cancellation, and
                # the connection closes once that read ends.
                await opening.close_all([conn])

    async def _run_pruner(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.prune()
            except StoreError as exc:
                log.error("prune_failed", error=str(exc))
            except Exception as exc:  # a bug in one prune must not end pruning; logged
                log.error("prune_crashed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)


def _room(data_dir: Path) -> tuple[int, int | None]:
    """What the data directory's files take, and what its file system has left."""
    return data_dir_bytes(data_dir), fs_free_bytes(data_dir)
