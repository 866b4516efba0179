"""The group-commit writer: one connection, one transaction at a time.

``submit()``, ``settle()`` and the operator actions put an operation with a future on the
writer's queue. When no transaction is running, the writer at once takes everything
pending (up to ``MAX_GROUP_EVENTS``) and hands one transaction to its thread (``writes``);
what arrives meanwhile waits and goes in the next, started from the callback that reports
the commit; but a submission made after the transaction was handed over and before the
thread began it joins that transaction (``_join_late``): the thread waits for the GIL
while the event loop is busy, and such a submission would otherwise wait for a whole
commit more. Futures resolve only after ``COMMIT`` returned. If the transaction fails (disk
full, I/O error) it is rolled back on the thread and every operation in it fails with
``StoreError``; the writer keeps going, ``writable`` is ``False`` until a commit succeeds
again (it probes every ``PROBE_INTERVAL_S`` while idle).

The writer runs from callbacks, not a task of its own that would wake for every commit
(two loop iterations more for each). ``run()`` is the task that owns it: it ends when the
writer stopped, or with the exception of an unexpected failure, after failing every
pending operation with ``StoreError``; the service watches that task and stops, as for
any background task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeGuard

import structlog

from ..disk import SETTLE_DEAD_BYTES
from .actions import prune_keys, purge, requeue, vacuum
from .handoff import Handoff
from .mirror import Mirror
from .plan import SOLO, Fail, Limits, Op, Plan, Prune, Purge, Requeue, Settle, Submit
from .records import OutcomeUnknownError, StoreError, Unwritable
from .space import Space
from .sql import PROBE
from .thread import SqliteThread
from .writes import GroupWriter

log = structlog.get_logger("valmi_sidecar.store")

#: Events (submitted or settled) in one group-commit transaction, at most (a single
#: submission is never split, so a group may exceed it by one submission).
MAX_GROUP_EVENTS: Final = 2_000
#: Riders sit out transactions of submissions until they board (``Settle.boards_at``,
#: ``core.RIDERS_GATHER_S``), or this many settlements ride, or one that does not ride is
#: pending: then all board together.
RIDERS_FULL: Final = 8
#: While a commit has failed and nothing else is written, how often the writer tries a
#: tiny transaction to find out whether the disk is writable again.
PROBE_INTERVAL_S: Final = 1.0


class Writer:
    """Runs every write of one store, in group transactions (see the module's text)."""

    #: When (``time.monotonic``) the thread was last handed submissions: riders wait for
    #: company only while events are being received (``Store.received_within``).
    submitted_at: float = float("-inf")

    def __init__(
        self,
        conn: SqliteThread,
        *,
        path: Path,
        mirror: Mirror,
        space: Space,
        handoff: Handoff,
        limits: Limits,
        clock: Callable[[], float],
    ) -> None:
        self.conn = conn
        self._path = path
        self._mirror = mirror
        self._space = space
        self._handoff = handoff
        self._limits = limits
        self._clock = clock
        self._groups = GroupWriter(limits, space, clock)
        self._pending: deque[Op] = deque()
        #: Settlements that ride (``Settle.ride_until``), apart from ``_pending``: the
        #: scheduler asks about them after every enqueue, and a scan for them among the
        #: submissions cost a type check per operation pending each time.
        self._riders: deque[Settle] = deque()
        #: Told of every commit that added events to the queue.
        self._listeners: list[Callable[[], None]] = []
        self._stopping = False
        # The flusher waits for outcomes to be saved: riders go in the next transaction.
        self._boarding = False
        self._writable = True
        #: While not writable: since when, the commits failed meanwhile, and the last
        #: error (a different one is logged again; the same one, only counted).
        self._unwritable_since = 0.0
        self._failed_commits = 0
        self._last_error = ""
        self.failure: BaseException | None = None
        #: The operations of the transaction in progress.
        self._group: list[Op] = []
        #: Whether the thread runs something of the writer's (a transaction, a probe, the
        #: checkpoint after a transaction of its own): then nothing else is handed to it.
        self._busy = False
        self._kick_soon = False
        #: Submissions that join the transaction handed to the thread, which has not
        #: begun it yet (``_join_late``); while ``_late_open``, under ``_late_lock``.
        self._late: list[Op] = []
        self._late_lock = threading.Lock()
        self._late_open = False
        #: The events and body bytes of the group ``_take_group`` took last, with ``_late``:
        #: what joining counts against the group's bounds; whether it holds a submission.
        self._late_events, self._late_bytes, self._took_submits = 0, 0, False
        #: The wake-up for riders waiting for company, or for the next probe.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        #: Resolved when the writer stopped (``run`` returns), failed with a crash.
        self._stopped: asyncio.Future[None] | None = None
        self._ended = False
        #: Transactions committed (probes not counted), and probes run while not writable.
        self.commits = 0
        self.probes = 0

    @property
    def writable(self) -> bool:
        return self._writable and self.failure is None

    def unwritable(self) -> Unwritable | None:
        """Why no commit succeeds now, while one has failed and none succeeded since."""
        if self._writable:
            return None
        return Unwritable(
            for_s=round(time.monotonic() - self._unwritable_since, 1),
            failed_commits=self._failed_commits,
            error=self._last_error,
            fs_free_bytes=self._space.failed_free,
        )

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is in progress (a seam for tests of a stop in its middle)."""
        return bool(self._group)

    @property
    def riders_waiting(self) -> bool:
        """Whether riders wait with a wake-up set for them (a seam for tests of riding)."""
        return bool(self._riders) and self._timer is not None

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._riders)

    def enqueue(self, op: Op) -> None:
        if type(op) is Settle and op.ride_until > 0:  # ``_rides``, written out: every event
            self._riders.append(op)
            if self._timer is not None and self._timer_at <= op.ride_until and not self._boarding:
                # The wake-up set for the riders before it comes first: nothing to decide
                # now (a kick would find only riders, and set the same wake-up).
                return
        else:
            if self._late_open and isinstance(op, Submit) and self._join_late(op):
                return
            self._pending.append(op)
        if not self._kick_soon and not self._busy:
            # After the callbacks of this loop iteration: what the other requests served
            # in it enqueue goes in the same transaction.
            self._kick_soon = True
            asyncio.get_running_loop().call_soon(self._kick_now)

    def _join_late(self, op: Submit) -> bool:
        """Whether ``op`` joins the transaction handed to the thread and not begun yet.

        The thread needs the GIL to begin it, and the event loop keeps the GIL until it
        runs out of work: the submissions it serves meanwhile would wait for that commit,
        then for one of their own. Joining costs nothing more to write, makes fewer
        commits under load, and takes that wait out of their latency. The thread takes
        them when it begins (``_late_joined``). One that would take the group past its
        bounds (those of ``_take_group``) waits for the next transaction, and so does
        every submission after it, in order."""
        size = 0
        for e in op.events:
            size += len(e.body)
        with self._late_lock:
            if not self._late_open:
                return False  # the thread began meanwhile
            if (
                self._late_events >= MAX_GROUP_EVENTS
                or self._late_bytes + size > self._space.budget.group_body_bytes
            ):
                self._late_open = False
                return False
            self._late.append(op)
            self._late_events += len(op.events)
            self._late_bytes += size
            return True

    def _late_joined(
        self, group: list[Op], fn: Callable[[sqlite3.Connection], Plan]
    ) -> Callable[[sqlite3.Connection], Plan]:
        """``fn``, which writes ``group``, with the submissions that joined it first added
        to ``group`` (on the thread, as it begins). ``group`` is the list the loop holds
        as the transaction's operations (``_group``, ``_done``), so the loop resolves or
        fails them with the rest."""
        lock = self._late_lock

        def run(db: sqlite3.Connection) -> Plan:
            with lock:
                self._late_open = False
                if self._late:
                    group.extend(self._late)
                    self._late = []
            return fn(db)

        return run

    def _close_late(self) -> list[Op]:
        """Close the way to join; the submissions that joined and were not taken."""
        with self._late_lock:
            self._late_open = False
            late, self._late = self._late, []
        return late

    def _kick_now(self) -> None:
        self._kick_soon = False
        self._kick()

    def listen(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after each commit that adds events; returns its removal."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def board_riders(self) -> None:
        """Let the riders pending go in the next transaction, alone if need be, instead
        of waiting for company (the flusher waits for their outcomes to be saved)."""
        if self._riders:
            self._boarding = True
            self._kick()

    def stop(self) -> None:
        """End ``run`` once what is pending is committed."""
        self._stopping = True
        self._kick()

    async def finish(self, task: asyncio.Task[None] | None, drain_s: float) -> bool:
        """Let ``task`` (running ``run``) commit what is pending within ``drain_s``, else
        cancel it; then fail whatever still waits. Whether it finished in time."""
        clean = True
        if task is not None:
            self.stop()
            await asyncio.wait({task}, timeout=drain_s)
            if not task.done():
                clean = False
                log.error("store_close_timeout", pending=self.pending, bound_s=drain_s)
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        self.fail_all(StoreError("the store is closed"))
        return clean

    async def run(self) -> None:
        """Own the writer until it stops (or fails, or this task is cancelled)."""
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            self._kick()
            await self._stopped
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("store_writer_crashed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._ended = True
            self._cancel_timer()
            self.fail_all(StoreError("the store's writer stopped"))

    # -- what to do next ---------------------------------------------------------------

    def _kick(self) -> None:
        """Hand the thread the next transaction, when it is free and one is due; or set
        the timer for when one will be (riders, probes); or end ``run`` when stopping."""
        if self._busy or self._ended or self._stopped is None or self.failure is not None:
            return
        try:
            while self._pending or self._riders:
                # Riders wait only when nothing else is pending (asked here: every commit).
                riding_s = None if self._pending else self._riders_wait_s()
                if riding_s is not None:
                    self._wake_in(riding_s)
                    return
                # A wake-up already set is left to fire (it finds nothing to do, or the
                # riders of then): cancelling it for every transaction and setting it again
                # after cost a timer per event.
                group = self._take_group()
                if group:
                    self._dispatch(group)
                    return
            if self._stopping:
                if not self._stopped.done():
                    self._stopped.set_result(None)
            elif not self._writable:
                self._wake_in(PROBE_INTERVAL_S, probe=True)
            else:
                self._cancel_timer()
        except Exception as exc:  # noqa: BLE001 - a bug or a closed connection: stop
            self._crash(exc)

    def _crash(self, exc: BaseException) -> None:
        self.failure = exc
        self._cancel_timer()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_exception(exc)

    def _wake_in(self, wait_s: float, *, probe: bool = False) -> None:
        at = time.monotonic() + wait_s
        if self._timer is not None and self._timer_at <= at:
            return  # an earlier wake-up is set
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(wait_s, self._on_timer, probe)
        self._timer_at = at

    def _on_timer(self, probe: bool) -> None:
        self._timer = None
        if probe:
            self._probe()
        else:
            self._kick()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _riders_wait_s(self) -> float | None:
        """How long to wait before the next transaction, when only riders are pending
        (settlements waiting to join submissions); ``None``: no wait."""
        if self._pending or self._stopping or not self._writable or self._boarding:
            return None
        first = self._riders[0].ride_until
        for op in self._riders:  # no generator: called after every enqueue
            first = min(first, op.ride_until)
        wait_s = first - time.monotonic()
        # Within a millisecond: a timer set for the deadline may fire that much early.
        return wait_s if wait_s > 0.001 else None

    def _take_group(self) -> list[Op]:
        """Pending operations for one transaction: one of ``SOLO`` alone, else submits and
        settles up to ``MAX_GROUP_EVENTS`` events. Operations whose caller gave up are
        dropped."""
        group: list[Op] = []
        n = 0
        # Body bytes of the group's submissions: one transaction's WAL stays within the
        # disk budget's bound (a single submission is never split).
        body_bytes = 0
        pending = self._pending
        riders = self._riders
        if not riders:
            self._boarding = False
        elif not (pending and isinstance(pending[0], SOLO)) and not self._riders_gather():
            # They board first: they waited longest, and a submission may not fit after.
            # (An operation that runs alone, first in line, goes first; they wait on.)
            while riders and n < MAX_GROUP_EVENTS:
                rider = riders.popleft()
                rider.boarded = True  # none joins it from here: its thread reads it
                if not rider.future.done():
                    group.append(rider)
                    n += len(rider.settlements)
            self._boarding = False
        submits = False
        while pending and n < MAX_GROUP_EVENTS:
            op = pending[0]
            if type(op) is Submit:  # nearly every operation: asked first
                size = 0
                for e in op.events:
                    size += len(e.body)
                if group and body_bytes + size > self._space.budget.group_body_bytes:
                    break
                pending.popleft()
                if op.future.done():
                    continue  # cancelled by its caller: not stored, nobody waits for it
                group.append(op)
                body_bytes += size
                n += len(op.events)
                submits = True
                continue
            if isinstance(op, SOLO):
                if group:
                    break
                pending.popleft()
                if not op.future.done():
                    self._took_submits = False
                    return [op]
                continue
            assert isinstance(op, Settle)
            pending.popleft()
            if not op.future.done():
                group.append(op)
                n += len(op.settlements)
        # What submissions that join this group count against its bounds (``_join_late``).
        self._late_events = n
        self._late_bytes = body_bytes
        self._took_submits = submits
        return group

    def _riders_gather(self) -> bool:
        """Whether the riders pending sit out the transaction of submissions taken now
        (``core.RIDERS_GATHER_S``)."""
        if self._stopping or not self._writable or self._boarding:
            return False
        now = time.monotonic()
        riding = 0
        for rider in self._riders:
            if rider.boards_at <= now:
                return False  # one is due: they all board
            riding += len(rider.settlements)
        if riding >= RIDERS_FULL:
            return False
        submits = False
        for op in self._pending:
            if isinstance(op, Settle):
                return False  # they board with a settlement that does not ride
            submits = submits or isinstance(op, Submit)
        return submits

    def fail_all(self, error: StoreError) -> None:
        """Fail every operation still waiting: with ``error`` those never written, with
        ``OutcomeUnknownError`` those of the transaction in progress (its thread may
        still commit it)."""
        unknown = OutcomeUnknownError(f"{error} in the middle of a commit")
        # Those that joined the transaction in progress are in ``_group`` once its thread
        # took them; the rest were never written.
        never = self._close_late()
        for op in never:
            if not op.future.done():
                op.future.set_exception(error)
        for op in self._group:
            if not op.future.done():
                op.future.set_exception(unknown)
        for op in (*self._riders, *self._pending):
            if not op.future.done():
                op.future.set_exception(error)
        self._group = []
        self._riders.clear()
        self._pending.clear()

    # -- one transaction -----------------------------------------------------------------

    def _dispatch(self, group: list[Op]) -> None:
        started = time.monotonic()
        try:
            fn = _rolled_back_on_error(self._transaction(group[0], group), self._space)
            if not isinstance(group[0], SOLO):
                self._late_open = True  # counted from ``_take_group``'s bounds
                fn = self._late_joined(group, fn)
            if self._took_submits:
                self.submitted_at = started
            self.conn.submit(fn, functools.partial(self._done, group, started))
        except BaseException:
            # Never written: back in line, to be failed as pending.
            for op in reversed([*group, *self._close_late()]):
                if _rides(op):
                    self._riders.appendleft(op)
                else:
                    self._pending.appendleft(op)
            raise
        self._group = group
        self._busy = True

    def _done(
        self, group: list[Op], started: float, plan: Plan | None, exc: BaseException | None
    ) -> None:
        """On the loop, once the thread ran ``group``'s transaction (or failed it)."""
        if self._ended:
            return  # run() ended meanwhile and failed the group's operations
        if exc is not None and not isinstance(exc, sqlite3.Error):
            self._busy = False  # a bug, or the connection closed under the writer: stop
            self._crash(exc)
            return
        try:
            if isinstance(exc, sqlite3.Error):
                self._failed_group(group, exc)
            elif plan is None:
                raise RuntimeError("a transaction gave no plan")  # noqa: TRY301 - a bug: stop
            else:
                self._committed_group(group, started, plan)
        except Exception as error:  # noqa: BLE001 - a bug or a closed connection: stop
            self._busy = False
            self._crash(error)
            return
        if exc is not None or not isinstance(group[0], SOLO):
            self._release()  # else released once its after-work is done

    def _release(self) -> None:
        self._group = []
        self._busy = False
        self._kick()

    def _failed_group(self, group: list[Op], exc: sqlite3.Error) -> None:
        first = group[0]
        if not isinstance(first, Prune):  # maintenance failing is not a commit failing
            self._mirror.stats.commit_failures += 1
        if self._writable:
            self._unwritable_since = time.monotonic()
            self._failed_commits = 0
            self._last_error = ""
        self._writable = False
        self._failed_commits += 1
        if str(exc) != self._last_error:
            # Once for each error while it lasts: a full disk fails every request, and a
            # line for each would fill the disk the logs share.
            self._last_error = str(exc)
            log.error(
                "commit_failed",
                error=str(exc),
                ops=len(group),
                path=str(self._path),
                **self._space.failure_hint(),
            )
        error = StoreError(f"could not {_WHAT[type(first)]} {self._path}: {exc}")
        error.__cause__ = exc
        for op in group:
            if not op.future.done():
                op.future.set_exception(error)

    def _committed_group(self, group: list[Op], started: float, plan: Plan) -> None:
        first = group[0]
        solo = isinstance(first, SOLO)
        if solo and isinstance(first, Requeue | Purge):
            result = plan.results[0][1]
            if isinstance(result, Fail) or result == 0:  # no transaction was made
                if not first.future.done():
                    _resolve(first, result)
                self._release()
                return
        self._committed()
        if not solo:
            stats = self._mirror.stats
            stats.commit_seconds.observe(time.monotonic() - started)
            stats.commit_events.observe(plan.events)
        self._apply(plan)
        if solo:
            self._after_solo(plan)  # resolves the operation once the WAL is bounded
            return
        _resolve_all(plan)

    def _transaction(self, first: Op, group: list[Op]) -> Callable[[sqlite3.Connection], Plan]:
        """The function that runs ``group`` on the writer's thread."""
        if isinstance(first, Prune):
            return functools.partial(self._prune, first)
        if isinstance(first, Purge):
            return functools.partial(purge, op=first, max_bytes=SETTLE_DEAD_BYTES)
        start = self._mirror.snapshot(self._clock())
        if isinstance(first, Requeue):
            max_events = self._limits.max_events

            def refusal(db: sqlite3.Connection, n: int) -> Any:
                return self._space.requeue_refusal(db, n, start.queued, max_events)

            # One transaction's WAL within the disk budget's bound: the rest of the
            # request goes in the next (the store's caller loops).
            return functools.partial(
                requeue, op=first, start=start, max_bytes=SETTLE_DEAD_BYTES, refusal=refusal
            )
        return functools.partial(self._groups.write, group, start)

    def _prune(self, op: Prune, db: sqlite3.Connection) -> Plan:
        plan = Plan()
        if op.cutoff is None:
            max_pages = self._space.budget.max_pages
            n = vacuum(db, max_pages, lambda: self._stopping)
            if n:
                log.info("store_vacuumed", pages=n)
        else:
            n = prune_keys(db, op.cutoff)
        plan.results.append((op, n))
        return plan

    def _apply(self, plan: Plan) -> None:
        mirror = self._mirror
        mirror.apply(plan)
        if not (plan.requeued or plan.purged):
            self._space.apply(plan, mirror.dead_letter_disk_bytes())
        if plan.fresh:
            self._handoff.put(plan.fresh)
        if plan.requeued:
            self._handoff.miss(plan.requeued)
        if plan.received or plan.requeued:
            # Called, not an Event set: waking a task to wake the flusher cost a loop
            # iteration per commit.
            for listener in self._listeners:
                listener()
        if plan.requeued:
            log.info("dead_letters_requeued", n=plan.requeued)
        if plan.purged:
            log.info("dead_letters_purged", n=plan.purged)

    def _after_solo(self, plan: Plan) -> None:
        """After a transaction of its own (maintenance, an operator's), committed: bound
        the WAL and measure the database again (nothing of it may fail the operation),
        then resolve it."""
        space = self._space
        was_full = space.full

        def run(db: sqlite3.Connection) -> None:
            space.checkpoint_if_big(db)
            space.measure_now(db)

        def done(_: None, exc: BaseException | None) -> None:
            if self._ended:
                return
            if isinstance(exc, sqlite3.Error):
                log.warning("checkpoint_failed", error=str(exc))
            elif exc is not None:
                self._busy = False
                self._crash(exc)
                return
            else:
                space.log_change(was_full, self._mirror.dead_letter_disk_bytes())
            _resolve_all(plan)
            self._release()

        self.conn.submit(run, done)

    def _committed(self) -> None:
        self.commits += 1
        self._mirror.sample()
        if not self._writable:
            self._writable_again()

    def _writable_again(self) -> None:
        self._writable = True
        log.info(
            "store_writable_again",
            path=str(self._path),
            failed_commits=self._failed_commits,
            unwritable_s=round(time.monotonic() - self._unwritable_since, 1),
        )

    def _probe(self) -> None:
        """While not writable and idle: a tiny transaction, to learn whether the disk
        takes writes again."""
        if self._busy or self._ended or self._pending or self._riders or self._writable:
            self._kick()
            return

        def run(db: sqlite3.Connection) -> None:
            try:
                db.executescript(PROBE)
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    db.rollback()
                raise

        def done(_: None, exc: BaseException | None) -> None:
            self.probes += 1
            if isinstance(exc, sqlite3.Error):
                log.debug("store_probe_failed", error=str(exc))
            elif exc is not None:
                self._busy = False
                self._crash(exc)
                return
            else:
                self._writable_again()
            self._busy = False
            self._kick()

        self._busy = True
        try:
            self.conn.submit(run, done)
        except Exception as exc:  # noqa: BLE001 - a closed connection: stop
            self._busy = False
            self._crash(exc)


def _rolled_back_on_error(
    fn: Callable[[sqlite3.Connection], Plan], space: Space
) -> Callable[[sqlite3.Connection], Plan]:
    """``fn``, rolling its transaction back on the thread when it fails (before the loop
    hears of it, so that the next transaction never starts inside a failed one), and
    telling ``space`` of the failure there (its file system's room is read off the loop)."""

    def run(db: sqlite3.Connection) -> Plan:
        try:
            return fn(db)
        except sqlite3.Error as exc:
            try:
                db.rollback()
            except sqlite3.Error as rb_exc:
                log.error("rollback_failed", error=str(rb_exc))
            space.note_failure(exc)
            raise

    return run


def _rides(op: Op) -> TypeGuard[Settle]:
    """Whether ``op`` is a settlement that rides: it waits in ``Writer._riders``."""
    return isinstance(op, Settle) and op.ride_until > 0


def _resolve_all(plan: Plan) -> None:
    for op, result in plan.results:
        # ``_resolve``, written out: every event's operation is resolved here.
        future = op.future
        if future.done():
            continue
        if isinstance(result, Fail):
            future.set_exception(result.error)
        else:
            future.set_result(result)


def _resolve(op: Op, result: Any) -> None:
    if isinstance(result, Fail):
        op.future.set_exception(result.error)
    else:
        op.future.set_result(result)


_WHAT: Final[dict[type, str]] = {
    Submit: "commit to",
    Settle: "commit to",
    Prune: "prune",
    Requeue: "change the dead letters in",
    Purge: "change the dead letters in",
}
