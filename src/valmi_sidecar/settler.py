"""Recording the flusher's outcomes: delivered, retry, dead letter, in batches.

The senders' outcomes wait here until one store transaction records a batch of them. An
outcome the store could not record (disk full or failing) stays, ahead of newer ones,
and is tried again: its event stays in flight meanwhile, so it is never sent again
while its outcome is unsaved, and stays queued, so a stop re-sends it with the same key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Final

import structlog

from .disk import SETTLE_DEAD_BYTES
from .logs import debug_enabled
from .store import DeadLetter, Delivered, Settle, Settlement, Store, StoreError

#: How long finished outcomes wait for company before one settle transaction (unless a
#: batch is full). A settle joins the group commit of the events being received, and a
#: group with settlements takes longer: waiting gathers many outcomes into one group.
#: The cost: an event's delivery is recorded up to this much later, so a crash in
#: between re-sends it (same key).
SETTLE_LINGER_S: Final = 0.1
#: While events are being received, a batch stops lingering once this many outcomes
#: wait. It joins the group commit of the events being received, and a larger one makes
#: that commit, and the requests in it, take longer: forwarding 1,000 events a second,
#: 100 ms gathered about a hundred (docs/PERFORMANCE.md, "A settle batch lingers until
#: 32"). Forwarding at the default rate limit (10,000 a minute) gathers fewer in 100 ms,
#: so it never ends a wait there; nor does a backlog's drain with nothing received,
#: where larger batches cost the writer less and hold up no request.
LINGER_FULL: Final = 32
#: Fewer outcomes than this ride: they wait (up to ``RIDE_S``) in the writer for the next
#: transaction of received events instead of lingering here, since a settle transaction
#: of its own costs the writer several times what riding costs. More ride not: at high
#: rates they would make every ingest transaction a larger one.
RIDE_BELOW: Final = 8
#: How long a riding delivery waits in the writer for a transaction of received events
#: before it is recorded alone. Riders gather company for half of it
#: (``store.core.RIDERS_GATHER_S``), so at a few events a second one transaction records
#: several deliveries, and their statements and pages are written once for all of them.
#: It bounds nothing else: a crash re-sends at most ``Flusher.max_unsaved`` events (same
#: key) whatever it is, a drain boards the riders at once, and so does the flusher when
#: it waits for outcomes to be saved. A retry or a dead letter rides ``SETTLE_LINGER_S``
#: at most: its event is not sent again, nor its refusal shown, until it is recorded.
#: So do deliveries while no event is being received (none went into a transaction for
#: ``RIDE_S``, a backlog's drain): no company is coming, and waiting would only show
#: them queued longer.
RIDE_S: Final = 1.0
#: After a failed settle (disk full or failing), wait this long before trying it again.
SETTLE_RETRY_S: Final = 1.0

log = structlog.get_logger("valmi_sidecar.flusher")


class Settler:
    """Records outcomes in batches of at most ``batch``; ``on_settled`` is told each
    batch once it is committed."""

    def __init__(
        self, store: Store, batch: int, on_settled: Callable[[list[Settlement]], None]
    ) -> None:
        self._store = store
        self._batch = batch
        self._on_settled = on_settled
        self._pending: list[Settlement] = []
        # Outcomes in the settle transaction that ``run`` makes now.
        self._committing = 0
        # Outcomes riding from ``add``, waiting in the writer for a transaction.
        self._riding = 0
        # The deliveries riding from ``add`` that later ones join while the writer has not
        # taken it: one operation, one future and one callback for them all.
        self._ride: Settle | None = None
        self._wake = asyncio.Event()
        # Set to stop lingering: when leasing waits for outcomes to be saved, or once
        # enough wait (``_lingers``).
        self._now = asyncio.Event()
        self._closing = False

    @property
    def unsaved(self) -> int:
        """Outcomes not yet committed (waiting or being committed)."""
        return len(self._pending) + self._committing + self._riding

    @property
    def waiting(self) -> bool:
        """Whether outcomes wait for a transaction."""
        return bool(self._pending)

    def add(self, settlement: Settlement) -> None:
        if self._riding < RIDE_BELOW and not (
            self._pending or self._committing or self._closing or self._now.is_set()
        ):
            # Few and in no hurry: it rides at once, without waking the task below and
            # waiting for it to wake again after the commit (two loop iterations an event).
            # Riders join the same next transaction, as a batch made here would.
            delivered = type(settlement) is Delivered
            if delivered and self._ride is not None and self._ride.join(settlement):
                self._riding += 1
                return
            try:
                ride_s = self._deliveries_ride_s() if delivered else SETTLE_LINGER_S
                ride = self._store.ride_soon([settlement], ride_s=ride_s)
            except StoreError:
                pass  # closing or stopped: the task meets the same error and retries
            else:
                self._riding += 1
                if delivered:
                    self._ride = ride
                started = time.monotonic()
                ride.future.add_done_callback(
                    functools.partial(self._rode, ride.settlements, started)
                )
                return
        self._pending.append(settlement)
        self._wake.set()
        if len(self._pending) >= LINGER_FULL and not self._lingers():
            self._now.set()  # enough company

    def _rode(self, batch: list[Settlement], started: float, future: asyncio.Future[None]) -> None:
        """A riding batch's transaction ended (``add``'s fast path); ``batch`` holds
        the settlements that joined it too."""
        if self._ride is not None and self._ride.future is future:
            self._ride = None
        self._riding -= len(batch)
        error = asyncio.CancelledError() if future.cancelled() else future.exception()
        if error is not None:
            self._pending[:0] = batch  # not recorded: kept, ahead of newer outcomes
            log.warning("settle_failed", n=len(batch), error=f"{type(error).__name__}: {error}")
        else:
            self._recorded(batch, started)
        if self._pending or self._closing:
            self._wake.set()  # the task takes what waits (and retries a failed batch)

    def _recorded(self, batch: list[Settlement], started: float) -> None:
        if debug_enabled():
            elapsed_ms = round((time.monotonic() - started) * 1000, 1)
            log.debug("batch_settled", n=len(batch), elapsed_ms=elapsed_ms)
        self._on_settled(batch)

    def hurry(self) -> None:
        """Commit what waits without lingering, the riders in the writer too."""
        self._now.set()
        self._store.board_riders()

    def close(self) -> None:
        """Commit what waits and end ``run``."""
        self._closing = True
        self._wake.set()

    def reopen(self) -> None:
        """``run`` ended: the next one runs until ``close()`` again."""
        self._closing = False

    async def run(self) -> None:
        """Commit outcomes until ``close()`` and none is left (or until cancelled: then
        once more, best effort)."""
        try:
            while True:
                if not self._pending or self._committing or self._riding:
                    if self._closing and not (self._committing or self._riding or self._pending):
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                ride = len(self._pending) < RIDE_BELOW and not self._closing
                if ride and self._now.is_set():
                    ride = False  # leasing waits for these outcomes to be saved
                elif not ride and not self._closing and self._lingers():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SETTLE_LINGER_S):
                            await self._now.wait()
                self._now.clear()
                try:
                    await self._commit(self._ride_s() if ride else 0.0)
                except StoreError as exc:
                    log.warning(
                        "settle_failed",
                        n=len(self._pending),
                        error=f"{type(exc).__name__}: {exc}",
                        retry_in_s=SETTLE_RETRY_S,
                    )
                    await asyncio.sleep(SETTLE_RETRY_S)
        except asyncio.CancelledError:
            try:  # best effort; unsettled events are re-sent with the same key
                while self._pending:
                    await self._commit()
            except StoreError as exc:
                log.warning("final_settle_failed", error=f"{type(exc).__name__}: {exc}")
            raise

    def _lingers(self) -> bool:
        """Whether the outcomes pending wait for company: fewer than a batch, and fewer
        than ``LINGER_FULL`` while events are being received."""
        n = len(self._pending)
        if n >= self._batch:
            return False
        return n < LINGER_FULL or not self._store.received_within(RIDE_S)

    def _ride_s(self) -> float:
        """How long the outcomes pending, riding, wait for received events."""
        if all(type(s) is Delivered for s in self._pending):
            return self._deliveries_ride_s()
        return SETTLE_LINGER_S

    def _deliveries_ride_s(self) -> float:
        """How long deliveries ride: ``RIDE_S`` while events are being received, else
        ``SETTLE_LINGER_S`` (see ``RIDE_S``)."""
        if self._store.received_within(RIDE_S):
            return RIDE_S
        return SETTLE_LINGER_S

    async def _commit(self, ride_s: float = 0.0) -> None:
        n = _within_dead_bytes(self._pending)
        batch, self._pending = self._pending[:n], self._pending[n:]
        started = time.monotonic()
        self._committing = len(batch)
        try:
            await self._store.settle(batch, ride_s=ride_s)
        except BaseException:
            self._pending[:0] = batch  # not recorded: keep them, ahead of newer outcomes
            raise
        finally:
            self._committing = 0
        self._recorded(batch, started)


def _within_dead_bytes(pending: list[Settlement]) -> int:
    """How many of the first outcomes one settle transaction takes: its dead letters (whose
    bodies it copies) within ``SETTLE_DEAD_BYTES``, the disk budget's bound; one at least."""
    total = 0
    for i, s in enumerate(pending):
        if isinstance(s, DeadLetter):
            total += s.size
            if total > SETTLE_DEAD_BYTES and i:
                return i
    return len(pending)


__all__ = ["LINGER_FULL", "RIDE_S", "SETTLE_LINGER_S", "SETTLE_RETRY_S", "Settler"]
