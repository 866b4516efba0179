"""The forwarding loop: lease, rate limit, send, settle, back off.

One lease loop takes the oldest due events from the store (never one already in flight),
passes each through the global gates (a hold set by backoff, ``429``/``Retry-After``,
``X-RateLimit-*`` or a pause; then the token bucket) and hands it to one of
``upstream_concurrency`` sender tasks, each sending one event at a time (one in all while
backing off or paused: a probe). Sender outcomes are collected and settled in batches,
one store transaction each; an event leaves the in-flight set only once its settlement
is committed, or at once when nothing is to be recorded for it (a pause, a ``429``, a
cancelled request), so it is never leased twice concurrently and never lost.

What upstream's answers mean (the state, the holds, the rate budget, the refusals held
until a delivery judges them) is decided by ``UpstreamPolicy`` (``policy.py``, no I/O);
the outcomes are recorded by ``Settler`` (``settler.py``); this module does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Final

import structlog

from .config import Settings
from .policy import Decision, Note, UpstreamPolicy, UpstreamState
from .settler import SETTLE_RETRY_S, Settler
from .short_lease import ShortLease
from .store import DeadLetter, Delivered, QueuedEvent, Retry, Settlement, Store
from .upstream import Answer, Upstream

#: Events sent (or being sent) whose outcome is not yet committed, at most, per sender:
#: ``UNSAVED_PER_SENDER * upstream_concurrency`` is how many events a crash can make the
#: sidecar send twice. At the bound, leasing waits for a settle commit.
UNSAVED_PER_SENDER: Final = 4
#: How long drain() waits for the loop to wind down after its deadline.
STOP_GRACE_S: Final = 5.0
#: How often (at most) a forwarding summary is logged at info.
SUMMARY_EVERY_S: Final = 10.0
#: The shortest wait for a time the lease loop asks of the event loop. uvloop keeps its
#: timers in whole milliseconds: a wait under half of one fires at once, and a longer one
#: can fire up to a millisecond early. Waiting for a token a fraction of a millisecond
#: away made the lease loop spin until it was due, several passes per event sent.
MIN_WAIT_S: Final = 0.001
#: The shortest sleep while waiting for backed-off events, so a clock skew cannot spin.
MIN_IDLE_S: Final = 0.01

log = structlog.get_logger("valmi_sidecar.flusher")


class FlusherError(Exception):
    """A flusher task failed unexpectedly; the cause is chained. The queue is intact."""


class Flusher:
    """Forwards the queue upstream; see the module docstring for the design, and
    ``UpstreamPolicy`` for ``state``. ``in_flight`` is the number of upstream requests
    outstanding."""

    def __init__(
        self,
        store: Store,
        upstream: Upstream | None,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """``clock`` gives the Unix time (events' due times and ages); ``rng`` draws the
        backoff's jitter."""
        self._store = store
        self._upstream = upstream
        self._settings = settings
        self._clock = clock
        self._policy: UpstreamPolicy[QueuedEvent] = UpstreamPolicy(
            settings, enabled=upstream is not None, rng=rng
        )
        self._concurrency = max(1, settings.upstream_concurrency)
        self._batch = max(1, settings.flush_batch_size)
        self._max_unsaved = UNSAVED_PER_SENDER * self._concurrency
        # Seqs leased and not yet settled (buffered, being sent, or awaiting commit).
        self._in_flight: set[int] = set()
        self._buffer: deque[QueuedEvent] = deque()
        self._sending = 0
        #: The sender tasks: a fixed pool, made by ``_run`` (a task per send cost more).
        self._senders: set[asyncio.Task[None]] = set()
        #: Senders waiting for an event, and events handed over before a sender waited.
        self._idle: deque[asyncio.Future[tuple[QueuedEvent, int]]] = deque()
        self._to_send: deque[tuple[QueuedEvent, int]] = deque()
        self._settler = Settler(store, self._batch, self._settled)

        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        # Whether new events would give the lease loop work: only then does a commit of
        # received events wake it (otherwise it waits for a token, a sender or a hold, and
        # woke for nothing at every group commit).
        self._wants_events = False
        # Whether the lease loop waits for a sender to finish or for outcomes to be
        # saved: only then does the end of every send, or every settle commit, wake it.
        self._wants_room = False
        # Whether the lease loop is parked waiting for new events (or the next due time),
        # with nothing else to do: then a commit hands its events to the senders itself.
        self._parked = False
        self._missed = 0
        self._short = ShortLease()

        self._summary_at = time.monotonic()
        self._summary = {"delivered": 0, "retried": 0, "dead_lettered": 0}

    # -- public surface ------------------------------------------------------------------

    @property
    def state(self) -> UpstreamState:
        return self._policy.state

    @property
    def last_error(self) -> str | None:
        return self._policy.last_error

    @property
    def last_error_at(self) -> float | None:
        """Unix time of ``last_error``."""
        return self._policy.last_error_at

    @property
    def answered(self) -> bool:
        """Whether the upstream has answered (or failed) since start: until then ``ok``
        only means "nothing went wrong yet"."""
        return self._policy.answered

    @property
    def next_attempt_in_s(self) -> float | None:
        """While backing off, paused or rate-limited: seconds until the next request."""
        return self._policy.next_attempt_in_s

    @property
    def in_flight(self) -> int:
        return self._sending

    @property
    def max_unsaved(self) -> int:
        """Events sent whose outcome is not yet saved, at most: after a crash, at most this
        many can be sent twice (with the same key)."""
        return self._max_unsaved

    def _unsaved(self) -> int:
        return self._sending + self._settler.unsaved

    async def run(self) -> None:
        """Forward until ``drain()`` stops the loop (or until cancelled).

        With no upstream, idle as ``disabled``. Raises ``FlusherError`` if a task of the
        flusher or the store fails; events are never lost by that (they stay queued).
        """
        if self._running:
            raise RuntimeError("Flusher.run() is already running")
        self._running = True
        self._done.clear()
        try:
            if self._upstream is None:
                log.info("flusher_disabled", reason="no API key configured")
                await self._stop.wait()
                return
            await self._run(self._upstream)
        finally:
            self._buffer.clear()
            self._in_flight.clear()
            self._policy.forget_held()  # not judged: they stay queued, sent again next time
            self._short.forget()
            self._running = False
            self._done.set()

    async def drain(self, timeout_s: float) -> None:
        """The final flush: forward until the queue is empty, ``timeout_s`` passes, or
        forwarding is paused or disabled; then stop the loop. Requests still running at the
        deadline are cancelled and their events stay queued (same key next time)."""
        started = time.monotonic()
        deadline = started + max(0.0, timeout_s)
        reason = "not_running"
        if not self._running:
            await asyncio.sleep(0)  # let a run() task created just before us begin
        try:
            if self._running:
                reason = await self._wait_drained(deadline)
        finally:
            self._stop.set()
            self._wake.set()
        if self._running:
            try:
                async with asyncio.timeout(STOP_GRACE_S):
                    await self._done.wait()
            except TimeoutError:
                log.warning("flusher_stop_slow", waited_s=STOP_GRACE_S)
        log.info(
            "drain_finished",
            reason=reason,
            queued=self._queued(),
            elapsed_ms=round((time.monotonic() - started) * 1000),
        )

    # -- the loop ------------------------------------------------------------------------

    async def _run(self, upstream: Upstream) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._settler.run(), name="flusher-settle")
                for i in range(self._concurrency):
                    self._senders.add(tg.create_task(self._sender(upstream), name=f"send-{i}"))
                self._store.take_fresh(0)  # from now on committed events are held for us
                self._missed = self._store.missed
                unlisten = self._store.on_new_events(self._on_new_events)
                try:
                    await self._lease_loop()
                finally:
                    unlisten()
                    for task in self._senders:
                        task.cancel()
                    self._release_buffer()
                    self._settler.close()
        except ExceptionGroup as group:
            first = group.exceptions[0]
            log.error("flusher_failed", error=f"{type(first).__name__}: {first}")
            raise FlusherError(f"the flusher stopped: {type(first).__name__}: {first}") from first
        finally:
            # Every sender has ended: what was handed over and not sent stays queued.
            self._senders.clear()
            self._idle.clear()
            self._to_send.clear()
            self._sending = 0
            self._settler.reopen()

    async def _lease_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._wants_events = self._wants_room = False
            wait_s = self._gate()
            if wait_s != 0.0:
                await self._wait_wake(wait_s)
                continue
            # Set before the lease: events committed after it was read still wake the wait.
            self._wants_events = True
            event = await self._next_event()
            if event is None:
                await self._wait_for_events()
                continue
            self._wants_events = False
            if not self._try_send(event):
                continue  # the world changed while leasing: ask the gate again
            if (
                not self._buffer
                and not self._store.fresh
                and self._short.known_empty(self._clock())
            ):
                # Nothing else to send: wait for new events (or the next due time) now.
                # Another pass would ask the policy, the tokens and the store again only
                # to come here; at a low rate that was every other pass.
                self._wants_events = True
                await self._wait_for_events()

    def _gate(self) -> float | None:
        """What must pass before the next event goes: ``0.0`` when it may go now, else
        the seconds to wait (``None``: until woken)."""
        hold_s = self._policy.wait_s()
        if hold_s > 0:
            return hold_s
        if self._sending >= self._policy.send_limit(self._concurrency):
            self._wants_room = True
            return None
        if not self._store.writable or self._unsaved() >= self._max_unsaved:
            # Nothing is sent that cannot be recorded: a crash now re-sends only what is
            # unsaved, and the disk being full must not make that grow.
            self._settler.hurry()
            self._wants_room = True
            return SETTLE_RETRY_S
        return self._policy.token_wait_s()

    def _try_send(self, event: QueuedEvent) -> bool:
        """Hand ``event`` to a sender, or dead-letter it as expired; ``False`` when it was
        put back first in the buffer (a hold, no sender free, no token)."""
        if (
            self._stop.is_set()
            or self._policy.hold_until > time.monotonic()
            or self._sending >= self._policy.send_limit(self._concurrency)
        ):
            self._buffer.appendleft(event)
            return False
        return self._send_now(event)

    def _send_now(self, event: QueuedEvent) -> bool:
        """``_try_send`` once the gate was asked with nothing awaited since: only the
        event's age and the token are left to check."""
        if event.attempts and self._policy.expired(
            event.attempts, self._clock() - event.received_at
        ):  # an event never tried gets its chance: asked only of one tried before
            self._expire(event)
            return True
        taken, notes = self._policy.take()
        if notes:
            _log(notes)
        if not taken:
            self._buffer.appendleft(event)
            return False
        self._sending += 1
        self._hand_over(event, self._policy.generation)
        return True

    async def _wait_for_events(self) -> None:
        timeout = await self._idle_timeout()
        self._parked = True
        try:
            await self._wait_wake(timeout)
        finally:
            self._parked = False

    def _expire(self, event: QueuedEvent) -> None:
        max_age_s = self._settings.max_event_age_s
        detail = f"not delivered within max_event_age_s={max_age_s:g}"
        self._settler.add(DeadLetter(event.seq, "expired", None, detail, len(event.body)))
        self._summary["dead_lettered"] += 1
        log.debug("event_dead_lettered", id=event.id, reason="expired")

    async def _next_event(self) -> QueuedEvent | None:
        if not self._buffer:
            limit = self._policy.send_limit(self._batch)
            if self._short.known_empty(self._clock()):
                # Nothing else is due in the database: what was committed since is handed
                # over in memory, not read back.
                self._buffer_events(self._store.take_fresh(limit))
            else:
                seen = self._short.changes
                events = await self._lease(limit)
                self._buffer_events(events)
                if len(events) < limit:
                    self._short.came_back_short(seen)
        return self._buffer.popleft() if self._buffer else None

    def _buffer_events(self, events: list[QueuedEvent]) -> None:
        for event in events:
            if event.seq not in self._in_flight:
                self._in_flight.add(event.seq)
                self._buffer.append(event)

    async def _lease(self, limit: int) -> list[QueuedEvent]:
        probed = self._policy.probed
        if probed:
            events = await self._store.lease(limit, frozenset(self._in_flight | probed))
            if events:
                return events
            self._policy.forget_probes()
        return await self._store.lease(limit, frozenset(self._in_flight))

    def _unlease(self, seq: int) -> None:
        """An event back out of flight, still queued: it can be leased again."""
        self._in_flight.discard(seq)
        self._short.changed()

    async def _idle_timeout(self) -> float | None:
        known, due = self._short.known_due()
        if not known:
            seen = self._short.changes
            due = await self._store.next_due_at(frozenset(self._in_flight))
            self._short.note_due(seen, due)
        if due is None:
            return None  # woken by new events, a settlement or stop
        return max(MIN_IDLE_S, due - self._clock())

    async def _wait_wake(self, wait_s: float | None) -> None:
        if self._wake.is_set():
            return
        if wait_s is None:  # no timer to make and cancel
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(wait_s, MIN_WAIT_S)):
                await self._wake.wait()

    def _on_new_events(self) -> None:
        """The store committed events to the queue (called from its writer)."""
        if self._store.missed != self._missed:
            # Events were committed that the store could not hand over: read them.
            self._missed = self._store.missed
            self._short.changed()
        if not self._wants_events:
            return
        if self._parked:
            try:
                if self._send_fresh():
                    return
            except Exception:
                # A bug, met in the store's writer, whose callback this is: the store
                # goes on, and the lease loop, woken, meets the bug in its own task.
                log.exception("flusher_hand_over_failed")
        self._wake.set()

    def _send_fresh(self) -> bool:
        """With the lease loop parked, hand the events just committed to the senders here,
        as its next pass would: waking it for each cost a loop iteration and a pass per
        event. ``False`` when the loop has to run (something holds the events back, or
        more are due than go now); they wait in the buffer for it."""
        if self._buffer or self._stop.is_set() or not self._short.known_empty(self._clock()):
            return False
        if self._gate() != 0.0:
            return False
        events = self._store.take_fresh(self._policy.send_limit(self._batch))
        in_flight = self._in_flight
        for i, event in enumerate(events):
            # As _buffer_events and the lease loop's pass would, without the buffer's
            # round trip for each event (every event comes this way at a steady pace).
            if event.seq in in_flight:
                continue
            in_flight.add(event.seq)
            # The gate was asked with nothing awaited since: what _try_send would ask
            # again cannot have changed (a send's answer comes in a later callback).
            if not self._send_now(event) or (i + 1 < len(events) and self._gate() != 0.0):
                self._buffer_events(events[i + 1 :])
                return False
        return not self._store.fresh  # more than one take: the loop takes the rest

    # -- senders -------------------------------------------------------------------------

    def probe_now(self) -> None:
        """While paused, send the next probe now rather than at the end of the backoff
        (the key was just replaced)."""
        if self._policy.probe_now():
            self._wake.set()

    def _hand_over(self, event: QueuedEvent, generation: int) -> None:
        while self._idle:
            waiting = self._idle.popleft()
            if not waiting.done():  # else its sender was cancelled
                waiting.set_result((event, generation))
                return
        self._to_send.append((event, generation))

    async def _sender(self, upstream: Upstream) -> None:
        """One of the pool: send what the lease loop hands over, one event at a time (in
        this coroutine, not one of its own: every event paid for one)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._to_send:
                event, generation = self._to_send.popleft()
            else:
                waiting: asyncio.Future[tuple[QueuedEvent, int]] = loop.create_future()
                self._idle.append(waiting)
                event, generation = await waiting
            sent_at = time.monotonic()
            try:
                if self._policy.refresh_key_first:
                    # A rotated key (a Kubernetes Secret updated in place) resumes delivery
                    # without a restart, which for an emptyDir queue would lose it.
                    await upstream.refresh_key()
                answer = await upstream.send(event)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    self._unlease(event.seq)  # stays queued; same key next time
                self._wake.set()
                raise
            finally:
                self._sending -= 1
            self._on_answer(event, answer, generation, sent_at)

    def _on_answer(
        self, event: QueuedEvent, answer: Answer, generation: int, sent_at: float
    ) -> None:
        policy = self._policy
        if policy.on_quiet_delivery(answer):
            # What on_answer would decide, with nothing to ask it: the usual answer.
            self._settler.add(Delivered(event.seq))
            self._summary["delivered"] += 1
            self._progress.set()
            if self._wants_room:
                self._wake.set()
            return
        before = (policy.state, policy.hold_until)
        d = policy.on_answer(event, answer, generation, sent_at, sending=self._sending)
        self._apply(event, answer, d)
        self._progress.set()
        plain = d.action == "delivered" and not (d.release or d.release_buffer or d.dead_letters)
        if self._wants_room or not plain or (policy.state, policy.hold_until) != before:
            # A delivery that changed nothing wakes the lease loop only when it waits for a
            # sender; waking it after every send cost a loop iteration per event.
            self._wake.set()

    def _apply(self, event: QueuedEvent, answer: Answer, d: Decision[QueuedEvent]) -> None:
        """Do what the policy decided after ``answer`` to ``event``."""
        if d.action == "delivered":
            self._settler.add(Delivered(event.seq))
            self._summary["delivered"] += 1
        elif d.action == "dead_letter":
            self._dead_letter(event, answer)
        elif d.action == "retry":
            self._settler.add(Retry(event.seq, self._clock() + d.retry_in_s, answer.error))
            self._summary["retried"] += 1
        for held, refusal in d.dead_letters:
            self._dead_letter(held, refusal)  # refused while upstream delivered another
        for seq in d.release:
            self._unlease(seq)
        if d.release_buffer:
            self._release_buffer()
        if d.notes:
            _log(d.notes)

    def _dead_letter(self, event: QueuedEvent, answer: Answer) -> None:
        self._settler.add(
            DeadLetter(event.seq, "rejected", answer.status, answer.error, len(event.body))
        )
        self._summary["dead_lettered"] += 1
        log.warning(
            "event_dead_lettered",
            id=event.id,
            reason="rejected",
            status=answer.status,
            detail=answer.error,  # Valmi's answer, cut short, the API key redacted
        )

    def _release_buffer(self) -> None:
        for event in self._buffer:
            self._unlease(event.seq)
        self._buffer.clear()

    # -- settling ------------------------------------------------------------------------

    def _settled(self, batch: list[Settlement]) -> None:
        """``batch`` is committed: its events leave the in-flight set."""
        retried = False
        expired = 0
        for settlement in batch:
            self._in_flight.discard(settlement.seq)
            if isinstance(settlement, Delivered):
                continue
            if isinstance(settlement, Retry):
                retried = True
                self._short.changed()  # queued again, due at its time (delivered or dead: gone)
            elif isinstance(settlement, DeadLetter) and settlement.reason == "expired":
                expired += 1
        if expired:  # one line per batch, not per event: a long outage can expire many
            log.warning("events_expired", n=expired, max_event_age_s=self._settings.max_event_age_s)
        if retried or self._wants_room:
            self._wake.set()
        self._progress.set()
        self._log_summary()

    def _log_summary(self) -> None:
        now = time.monotonic()
        if now - self._summary_at < SUMMARY_EVERY_S:
            return
        log.info(
            "batch_forwarded",
            n=self._summary["delivered"],
            retried=self._summary["retried"],
            dead_lettered=self._summary["dead_lettered"],
            elapsed_ms=round((now - self._summary_at) * 1000),
        )
        self._summary = dict.fromkeys(self._summary, 0)
        self._summary_at = now

    # -- drain ---------------------------------------------------------------------------

    def _queued(self) -> int:
        return self._store.counts().queued

    async def _wait_drained(self, deadline: float) -> str:
        while True:
            self._progress.clear()
            if self._policy.stopped:
                return self._policy.state
            if not self._running:
                return "stopped"
            if self._settler.unsaved:
                # Outcomes riding would wait up to ``settler.RIDE_S`` for received events,
                # which a stopping sidecar no longer takes: record them now.
                self._settler.hurry()
            if not self._settler.waiting and self._sending == 0:
                queued = self._queued()
                if queued == 0:
                    return "empty"
                if queued == self._policy.held and not self._buffer:
                    return "refusals_held"  # only a delivery could judge them; kept queued
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            if await self._nothing_due_before(deadline):
                return "nothing_due"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(deadline - now, 0.1)):
                    await self._progress.wait()

    async def _nothing_due_before(self, deadline: float) -> bool:
        """True when no request is running or waiting and none can start before deadline."""
        if self._sending or self._settler.waiting or self._buffer:
            return False
        if self._policy.hold_until >= deadline:
            return True
        due = await self._store.next_due_at(frozenset(self._in_flight))
        if due is None:
            return False
        return due - self._clock() > deadline - time.monotonic()


def _log(notes: list[Note]) -> None:
    for note in notes:
        getattr(log, note.level)(note.event, **note.fields)


__all__ = ["Flusher", "FlusherError"]
