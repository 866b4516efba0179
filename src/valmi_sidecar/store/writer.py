"""The group-commit writer: one task, one connection, one transaction at a time.

``submit()``, ``settle()`` and the operator actions put an operation with a future on the
writer's queue; the writer takes everything pending (up to ``MAX_GROUP_EVENTS``), runs
one transaction on its thread (``writes``) and resolves the futures only after ``COMMIT``
returned. If the transaction fails (disk full, I/O error) it is rolled back and every
operation in it fails with ``StoreError``; the writer keeps running, ``writable`` is
``False`` until a commit succeeds again (it probes every ``PROBE_INTERVAL_S`` while idle).

If the writer task itself dies of an unexpected exception, every pending operation fails
with ``StoreError`` and the task ends with that exception: the service watches the task
and stops, as for any background task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import structlog

from ..disk import SETTLE_DEAD_BYTES
from .actions import prune_keys, purge, requeue, vacuum
from .handoff import Handoff
from .mirror import Mirror
from .plan import SOLO, Fail, Limits, Op, Plan, Prune, Purge, Requeue, Settle, Submit
from .records import OutcomeUnknownError, StoreError
from .space import Space
from .sql import PROBE
from .thread import SqliteThread
from .writes import GroupWriter

log = structlog.get_logger("valmi_sidecar.store")

#: Events (submitted or settled) in one group-commit transaction, at most (a single
#: submission is never split, so a group may exceed it by one submission).
MAX_GROUP_EVENTS: Final = 2_000
#: While a commit has failed and nothing else is written, how often the writer tries a
#: tiny transaction to find out whether the disk is writable again.
PROBE_INTERVAL_S: Final = 1.0


class Writer:
    """Runs every write of one store, in group transactions (see the module's text)."""

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
        self._wakeup = asyncio.Event()
        #: Told of every commit that added events to the queue.
        self._listeners: list[Callable[[], None]] = []
        self._stopping = False
        self._writable = True
        self.failure: BaseException | None = None
        #: The operations of the transaction in progress.
        self._group: list[Op] = []
        # While the task waits with nothing pending, a rider does not wake it: a timer
        # does at the rider's deadline, unless a submission comes first.
        self._idle_forever = False
        self._ride_timer: asyncio.TimerHandle | None = None
        #: Transactions committed (probes not counted), and probes run while not writable.
        self.commits = 0
        self.probes = 0

    @property
    def writable(self) -> bool:
        return self._writable and self.failure is None

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is in progress (a seam for tests of a stop in its middle)."""
        return bool(self._group)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def enqueue(self, op: Op) -> None:
        self._pending.append(op)
        if self._idle_forever and isinstance(op, Settle) and op.ride_until:
            if self._ride_timer is None:
                wait_s = max(0.0, op.ride_until - time.monotonic())
                loop = asyncio.get_running_loop()
                self._ride_timer = loop.call_later(wait_s, self._wakeup.set)
            return
        self._wakeup.set()

    def listen(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after each commit that adds events; returns its removal."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def stop(self) -> None:
        """End the task once what is pending is committed."""
        self._stopping = True
        self._wakeup.set()

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
        try:
            while True:
                if not self._pending:
                    if self._stopping:
                        return
                    await self._idle()
                    continue
                riding_s = self._riders_wait_s()
                if riding_s is not None:
                    await self._idle(riding_s)
                    continue
                if self._ride_timer is not None:
                    self._ride_timer.cancel()
                    self._ride_timer = None
                group = self._group = self._take_group()
                if group:
                    await self._commit(group)
                self._group = []
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.failure = exc
                log.error("store_writer_crashed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.fail_all(StoreError("the store's writer stopped"))

    def _riders_wait_s(self) -> float | None:
        """How long to wait before the next transaction, when only riders are pending
        (settlements waiting to join submissions); ``None``: no wait."""
        if self._stopping or not self._writable:
            return None
        first = 0.0
        for op in self._pending:
            if not isinstance(op, Settle) or not op.ride_until:
                return None
            first = op.ride_until if not first else min(first, op.ride_until)
        wait_s = first - time.monotonic()
        # Within a millisecond: a timer set for the deadline may fire that much early.
        return wait_s if wait_s > 0.001 else None

    async def _idle(self, timeout_s: float | None = None) -> None:
        self._wakeup.clear()
        if self._writable:
            if timeout_s is None:  # the usual wait: no timer to make and cancel
                self._idle_forever = True
                try:
                    await self._wakeup.wait()
                finally:
                    self._idle_forever = False
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._wakeup.wait()
            return
        try:
            await asyncio.wait_for(self._wakeup.wait(), PROBE_INTERVAL_S)
        except TimeoutError:
            await self._probe()

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
        while pending and n < MAX_GROUP_EVENTS:
            op = pending[0]
            if isinstance(op, SOLO):
                if group:
                    break
                pending.popleft()
                if not op.future.done():
                    return [op]
                continue
            if isinstance(op, Submit):
                size = sum(len(e.body) for e in op.events)
                if group and body_bytes + size > self._space.budget.group_body_bytes:
                    break
            else:
                size = 0
            pending.popleft()
            if op.future.done():
                continue  # cancelled by its caller: not stored, nobody waits for it
            assert isinstance(op, Submit | Settle)
            group.append(op)
            body_bytes += size
            n += len(op.events) if isinstance(op, Submit) else len(op.settlements)
        return group

    def fail_all(self, error: StoreError) -> None:
        """Fail every operation still waiting: with ``error`` those never written, with
        ``OutcomeUnknownError`` those of the transaction in progress (its thread may
        still commit it)."""
        unknown = OutcomeUnknownError(f"{error} in the middle of a commit")
        for op in self._group:
            if not op.future.done():
                op.future.set_exception(unknown)
        for op in self._pending:
            if not op.future.done():
                op.future.set_exception(error)
        self._group = []
        self._pending.clear()

    async def _commit(self, group: list[Op]) -> None:
        first = group[0]
        started = time.monotonic()
        try:
            plan = await self.conn.call(self._transaction(first, group))
        except sqlite3.Error as exc:
            if not isinstance(first, Prune):  # maintenance failing is not a commit failing
                self._mirror.stats.commit_failures += 1
            await self._rollback(exc, len(group))
            error = StoreError(f"could not {_WHAT[type(first)]} {self._path}: {exc}")
            error.__cause__ = exc
            for op in group:
                if not op.future.done():
                    op.future.set_exception(error)
            return
        solo = isinstance(first, SOLO)
        if isinstance(first, Requeue | Purge):
            result = plan.results[0][1]
            if isinstance(result, Fail) or result == 0:  # no transaction was made
                if not first.future.done():
                    _resolve(first, result)
                return
        self._committed()
        if not solo:
            stats = self._mirror.stats
            stats.commit_seconds.observe(time.monotonic() - started)
            stats.commit_events.observe(plan.events)
        self._apply(plan)
        if solo:
            await self._after_solo()
        for op, result in plan.results:
            if not op.future.done():
                _resolve(op, result)

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

    async def _after_solo(self) -> None:
        """After a transaction of its own (maintenance, an operator's), committed: bound
        the WAL and measure the database again (nothing of it may fail the operation)."""
        space = self._space

        def run(db: sqlite3.Connection) -> None:
            space.checkpoint_if_big(db)
            space.measure_now(db)

        was_full = space.full
        try:
            await self.conn.call(run)
        except sqlite3.Error as exc:
            log.warning("checkpoint_failed", error=str(exc))
            return
        space.log_change(was_full, self._mirror.dead_letter_disk_bytes())

    async def _rollback(self, exc: sqlite3.Error, ops: int) -> None:
        self._writable = False
        log.error("commit_failed", error=str(exc), ops=ops, path=str(self._path))
        try:
            await self.conn.call(lambda db: db.rollback())
        except sqlite3.Error as rb_exc:
            log.error("rollback_failed", error=str(rb_exc))

    def _committed(self) -> None:
        self.commits += 1
        self._mirror.sample()
        if not self._writable:
            self._writable = True
            log.info("store_writable_again", path=str(self._path))

    async def _probe(self) -> None:
        def run(db: sqlite3.Connection) -> None:
            try:
                db.executescript(PROBE)
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    db.rollback()
                raise

        try:
            await self.conn.call(run)
        except sqlite3.Error as exc:
            self.probes += 1
            log.debug("store_probe_failed", error=str(exc))
            return
        self.probes += 1
        self._writable = True
        log.info("store_writable_again", path=str(self._path))


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
