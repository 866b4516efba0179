"""The forwarding loop: lease, rate limit, send, settle, back off.

One lease loop takes the oldest due events from the store (never one already in flight),
passes each through the global gates (a hold set by backoff, ``429``/``Retry-After``,
``X-RateLimit-*`` or a pause; then the token bucket) and hands it to a sender task, at
most ``upstream_concurrency`` at a time (one at a time while backing off or paused: a
probe). Sender outcomes are collected and settled in batches, one store transaction
each; an event leaves the in-flight set only once its settlement is committed, or at
once when nothing is to be recorded for it (a pause, a ``429``, a cancelled request),
so it is never leased twice concurrently and never lost.

A refusal (``400``, ``413``, ``422``) is about the event only if upstream delivers
something else meanwhile: it is dead-lettered once a delivery is answered after it was
sent (at once when one already was). Until then it stays queued, held out of the lease.
When ``pause_after_refusals`` different events are refused with the same status and no
delivery is answered after any of them was sent, upstream refuses everything: it is a
configuration problem (a wrong path on a gateway, plain HTTP to an HTTPS port, a proxy's
body limit), so forwarding pauses with every event kept. Its probes go one event at a
time on the backoff schedule, each to an event not yet tried in this pause; a refused
probe stays queued, and the first delivery resumes forwarding.

The pure parts (``full_jitter``, ``rate_budget``, ``TokenBucket``) are plain code with an
injectable clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, Literal

import structlog

from .config import Settings
from .disk import SETTLE_DEAD_BYTES
from .store import DeadLetter, Delivered, QueuedEvent, Retry, Settlement, Store, StoreError
from .upstream import Answer, Upstream

UpstreamState = Literal["ok", "backing_off", "rate_limited", "paused", "disabled"]

#: Consecutive retryable failures, across events, that put the whole flusher in backoff.
BACKOFF_AFTER_FAILURES: Final = 3
#: How long finished outcomes wait for company before one settle transaction (unless a
#: batch is full). A settle joins the group commit of the events being received, and a
#: group with settlements takes longer; at a rate limit of 10,000/min, 5 ms made nearly
#: every send its own settle, and 100 ms cut the p90 latency of events received meanwhile
#: (2,000/s over 64 connections) from 14-19 ms to 8-10 ms. The cost: an event's delivery
#: is recorded up to this much later, so a crash in between re-sends it (same key).
SETTLE_LINGER_S: Final = 0.1
#: After a failed settle (disk full or failing), wait this long before trying it again.
SETTLE_RETRY_S: Final = 1.0
#: Events sent (or being sent) whose outcome is not yet committed, at most, per sender:
#: ``UNSAVED_PER_SENDER * upstream_concurrency`` is how many events a crash can make the
#: sidecar send twice. At the bound, leasing waits for a settle commit.
UNSAVED_PER_SENDER: Final = 4
#: The longest a single upstream hint (Retry-After, X-RateLimit-Reset) may hold sending.
MAX_HOLD_S: Final = 24 * 3600.0
#: How long drain() waits for the loop to wind down after its deadline.
STOP_GRACE_S: Final = 5.0
#: How often (at most) a forwarding summary is logged at info.
SUMMARY_EVERY_S: Final = 10.0
#: The shortest sleep while waiting for backed-off events, so a clock skew cannot spin.
MIN_IDLE_S: Final = 0.01

#: Rounding slack for token counts, so a wait of exactly delay() always yields a token.
_EPSILON: Final = 1e-9

log = structlog.get_logger("valmi_sidecar.flusher")


@dataclass(slots=True)
class _Empty:
    """A lease came back short when ``Flusher._changes`` was ``changes``; then the next
    due time of the events out of flight, once read (``None``: nothing queued)."""

    changes: int
    due_read: bool = False
    due: float | None = None


class FlusherError(Exception):
    """A flusher task failed unexpectedly; the cause is chained. The queue is intact."""


def full_jitter(attempts: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full-jitter backoff: ``uniform(0, min(cap_s, base_s * 2**attempts))``."""
    exponent = min(max(attempts, 0), 64)
    return rng.uniform(0.0, min(cap_s, base_s * 2.0**exponent))


def rate_budget(limit_per_min: int) -> tuple[float, int]:
    """``(tokens per second, burst)`` for a limit of ``limit_per_min`` requests a minute.

    The burst is small and is taken out of the rate, with a 1 % margin for latency
    jitter, so that any 60-s window (a fixed window upstream included) sees at most
    ``burst + rate * 60 <= limit_per_min`` requests.
    """
    if limit_per_min < 1:
        raise ValueError(f"rate_limit_per_min: must be at least 1, not {limit_per_min}")
    burst = max(1, min(20, limit_per_min // 200))
    per_min = float(limit_per_min - burst - limit_per_min // 100)
    if per_min <= 0:  # a limit of 1/min: the burst is the whole budget; stay just under
        per_min = 0.9 * limit_per_min
    return per_min / 60.0, burst


class TokenBucket:
    """A token bucket on a monotonic clock: ``rate_per_s`` tokens a second, ``burst`` at most."""

    def __init__(
        self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def delay(self) -> float:
        """Seconds until a token is available (``0.0`` when one is available now)."""
        self._refill()
        if self._tokens >= 1.0 - _EPSILON:
            return 0.0
        return (1.0 - self._tokens) / self._rate

    def take(self) -> bool:
        """Take a token if one is available now; say whether one was taken."""
        self._refill()
        if self._tokens < 1.0 - _EPSILON:
            return False
        self._tokens -= 1.0
        return True


class Flusher:
    """Forwards the queue upstream; see the module docstring for the design.

    ``state`` is ``ok``, ``backing_off`` (consecutive failures: global full-jitter
    wait, then one probe at a time), ``rate_limited`` (a ``429`` or an exhausted
    ``X-RateLimit-Remaining``: nothing is sent until upstream said), ``paused``
    (``401``/``403``/``404``/unexpected answers: every event kept, one probe on the backoff
    schedule) or ``disabled`` (no upstream configured). ``in_flight`` is the number of
    upstream requests outstanding.
    """

    def __init__(
        self,
        store: Store,
        upstream: Upstream | None,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._settings = settings
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 (jitter, not secrets)
        self._concurrency = max(1, settings.upstream_concurrency)
        self._batch = max(1, settings.flush_batch_size)
        self._max_unsaved = UNSAVED_PER_SENDER * self._concurrency
        rate_per_s, burst = rate_budget(settings.rate_limit_per_min_effective)
        self._bucket = TokenBucket(rate_per_s, burst)

        self._state: UpstreamState = "disabled" if upstream is None else "ok"
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._answered = False
        # Seqs leased and not yet settled (buffered, being sent, or awaiting commit).
        self._in_flight: set[int] = set()
        self._buffer: deque[QueuedEvent] = deque()
        self._sending = 0
        self._senders: set[asyncio.Task[None]] = set()
        self._pending: list[Settlement] = []
        # Outcomes in the settle transaction running now.
        self._committing = 0
        # Global hold (monotonic time) set by backoff, rate limits and pauses.
        self._hold_until = 0.0
        # Requests upstream's X-RateLimit-Remaining still allows in this window (None: not
        # told), and when that window ends (monotonic).
        self._budget: int | None = None
        self._budget_reset_at = 0.0
        self._failures = 0
        self._pauses = 0
        # The status that paused forwarding: on 401/403 each probe reads the key file again.
        self._pause_status: int | None = None
        self._rate_limits = 0
        # Refused events not yet judged, by seq (still queued, held in flight): dead
        # letters once a delivery is answered after they were sent, back in the queue if
        # the refusals turn out to be systemic.
        self._refused: dict[int, tuple[QueuedEvent, Answer]] = {}
        # When the last delivery was answered (monotonic; -inf: none yet).
        self._delivered_at = float("-inf")
        # Refusals in a row that paused forwarding as systemic (0: not paused for that),
        # and the events its probes had refused, left out of the next leases so that
        # each probe tries another event.
        self._systemic = 0
        self._probed: set[int] = set()
        # Bumped whenever a global wait starts: answers to requests sent before it are
        # stale and do not stretch the wait further (16 failures at once count as one).
        self._generation = 0

        self._wake = asyncio.Event()
        self._settle_wake = asyncio.Event()
        # Set when leasing waits for outcomes to be saved: the settle loop stops lingering.
        self._settle_now = asyncio.Event()
        self._progress = asyncio.Event()
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        self._closing = False
        # Whether new events would give the lease loop work: only then does a commit of
        # received events wake it (otherwise it waits for a token, a sender or a hold, and
        # woke for nothing at every group commit).
        self._wants_events = False
        # What the last short lease saw: every due event out of flight was read, so until
        # something can have made another one due, the lease loop needs no query (at low
        # rates each event cost six reads without this). ``_changes`` counts those things:
        # new events, an event back out of flight, a retry recorded.
        self._changes = 0
        self._empty: _Empty | None = None

        self._summary_at = time.monotonic()
        self._summary = {"delivered": 0, "retried": 0, "dead_lettered": 0}

    # -- public surface ------------------------------------------------------------------

    @property
    def state(self) -> UpstreamState:
        if self._state == "rate_limited" and self._hold_until <= time.monotonic():
            return "ok"
        return self._state

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def last_error_at(self) -> float | None:
        """Unix time of ``last_error``."""
        return self._last_error_at

    @property
    def answered(self) -> bool:
        """Whether the upstream has answered (or failed) since start: until then ``ok``
        only means "nothing went wrong yet"."""
        return self._answered

    @property
    def next_attempt_in_s(self) -> float | None:
        """While backing off, paused or rate-limited: seconds until the next request."""
        if self.state not in ("backing_off", "paused", "rate_limited"):
            return None
        return max(0.0, self._hold_until - time.monotonic())

    @property
    def in_flight(self) -> int:
        return self._sending

    @property
    def max_unsaved(self) -> int:
        """Events sent whose outcome is not yet saved, at most: after a crash, at most this
        many can be sent twice (with the same key)."""
        return self._max_unsaved

    def _unsaved(self) -> int:
        return self._sending + len(self._pending) + self._committing

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
                self._state = "disabled"
                log.info("flusher_disabled", reason="no API key configured")
                await self._stop.wait()
                return
            await self._run(self._upstream)
        finally:
            self._buffer.clear()
            self._in_flight.clear()
            self._refused.clear()  # not judged: they stay queued, sent again next time
            self._probed.clear()
            self._empty = None
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
                watcher = tg.create_task(self._watch_new_events(), name="flusher-watch")
                tg.create_task(self._settle_loop(), name="flusher-settle")
                try:
                    await self._lease_loop(tg, upstream)
                finally:
                    for task in list(self._senders):
                        task.cancel()
                    watcher.cancel()
                    self._release_buffer()
                    self._closing = True
                    self._settle_wake.set()
        except ExceptionGroup as group:
            first = group.exceptions[0]
            log.error("flusher_failed", error=f"{type(first).__name__}: {first}")
            raise FlusherError(f"the flusher stopped: {type(first).__name__}: {first}") from first
        finally:
            self._closing = False

    async def _lease_loop(self, tg: asyncio.TaskGroup, upstream: Upstream) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._wants_events = False
            now = time.monotonic()
            if self._hold_until > now:
                await self._wait_wake(self._hold_until - now)
                continue
            if self._state == "rate_limited":
                self._state = "ok"
            if self._budget is not None and now >= self._budget_reset_at:
                self._budget = None  # a new window: upstream's next answer tells again
            if self._sending >= self._send_limit():
                await self._wait_wake(None)
                continue
            if not self._store.writable or self._unsaved() >= self._max_unsaved:
                # Nothing is sent that cannot be recorded: a crash now re-sends only
                # what is unsaved, and the disk being full must not make that grow.
                self._settle_now.set()
                await self._wait_wake(SETTLE_RETRY_S)
                continue
            delay = self._bucket.delay()
            if delay > 0:
                await self._wait_wake(delay)
                continue
            # Set before the lease: events committed after it was read still wake the wait.
            self._wants_events = True
            event = await self._next_event()
            if event is None:
                await self._wait_wake(await self._idle_timeout())
                continue
            self._wants_events = False
            if (
                self._stop.is_set()
                or self._hold_until > time.monotonic()
                or self._sending >= self._send_limit()
            ):
                self._buffer.appendleft(event)  # the world changed while leasing
                continue
            if self._expired(event):
                self._queue(
                    DeadLetter(
                        event.seq,
                        reason="expired",
                        status=None,
                        detail=f"not delivered within max_event_age_s={self._settings.max_event_age_s:g}",
                        size=len(event.body),
                    )
                )
                self._summary["dead_lettered"] += 1
                log.debug("event_dead_lettered", id=event.id, reason="expired")
                continue
            if not self._bucket.take():
                self._buffer.appendleft(event)
                continue
            self._spend_budget()
            self._sending += 1
            task = tg.create_task(self._send(upstream, event, self._generation))
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)

    def _expired(self, event: QueuedEvent) -> bool:
        """Whether to dead-letter ``event`` as expired instead of sending it: past
        ``max_event_age_s`` and it had its chance. Only an event tried before (a retryable
        failure), and never while paused: then the event is the probe, so a wrong key or
        URL for longer than the age limit expires nothing, one event per probe or all at once."""
        return (
            event.attempts > 0
            and self._state != "paused"
            and self._clock() - event.received_at > self._settings.max_event_age_s
        )

    def _send_limit(self) -> int:
        return 1 if self._state in ("backing_off", "paused") else self._concurrency

    async def _next_event(self) -> QueuedEvent | None:
        if not self._buffer and not self._known_empty():
            limit = 1 if self._state in ("backing_off", "paused") else self._batch
            seen = self._changes
            events = await self._lease(limit)
            for event in events:
                if event.seq not in self._in_flight:
                    self._in_flight.add(event.seq)
                    self._buffer.append(event)
            if len(events) < limit:
                self._empty = _Empty(seen)
        return self._buffer.popleft() if self._buffer else None

    async def _lease(self, limit: int) -> list[QueuedEvent]:
        if self._probed:
            exclude = frozenset(self._in_flight | self._probed)
            events = await self._store.lease(limit, exclude)
            if events:
                return events
            self._probed.clear()  # every due event was tried in this pause: start again
        return await self._store.lease(limit, frozenset(self._in_flight))

    def _known_empty(self) -> bool:
        """Whether a lease now would come back empty, as far as the loop knows without
        asking: nothing changed since a short lease, and its next due time (once read) has
        not come."""
        empty = self._empty
        if empty is None or empty.changes != self._changes:
            return False
        return not empty.due_read or empty.due is None or self._clock() < empty.due

    def _changed(self) -> None:
        self._changes += 1

    def _unlease(self, seq: int) -> None:
        """An event back out of flight, still queued: it can be leased again."""
        self._in_flight.discard(seq)
        self._changed()

    async def _idle_timeout(self) -> float | None:
        empty = self._empty
        if empty is not None and empty.changes == self._changes and empty.due_read:
            due = empty.due
        else:
            seen = self._changes
            due = await self._store.next_due_at(frozenset(self._in_flight))
            if empty is not None and empty.changes == seen == self._changes:
                empty.due_read, empty.due = True, due
        if due is None:
            return None  # woken by new events, a settlement or stop
        return max(MIN_IDLE_S, due - self._clock())

    async def _wait_wake(self, wait_s: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._wake.wait()

    async def _watch_new_events(self) -> None:
        while True:
            await self._store.wait_for_events()
            self._changed()
            if self._wants_events:
                self._wake.set()

    # -- senders -------------------------------------------------------------------------

    def probe_now(self) -> None:
        """While paused, send the next probe now rather than at the end of the backoff
        (the key was just replaced)."""
        if self._state == "paused":
            self._hold_until = 0.0
            self._wake.set()

    async def _send(self, upstream: Upstream, event: QueuedEvent, generation: int) -> None:
        sent_at = time.monotonic()
        try:
            if self._state == "paused" and self._pause_status in (401, 403):
                # A rotated key (a Kubernetes Secret updated in place) resumes delivery
                # without a restart, which for an emptyDir queue would lose it.
                await upstream.refresh_key()
            answer = await upstream.send(event)
        except asyncio.CancelledError:
            self._unlease(event.seq)  # stays queued; same key next time
            raise
        finally:
            self._sending -= 1
            self._wake.set()
        self._on_answer(event, answer, generation, sent_at)

    def _on_answer(
        self, event: QueuedEvent, answer: Answer, generation: int, sent_at: float
    ) -> None:
        now = time.monotonic()
        current = generation == self._generation
        self._answered = True
        if answer.verdict != "delivered":
            self._last_error = answer.error
            self._last_error_at = time.time()
        if answer.verdict == "delivered":
            self._queue(Delivered(event.seq))
            self._summary["delivered"] += 1
            self._delivered_at = now
            self._on_healthy()
            self._note_rate_limit(answer, now)
        elif answer.verdict == "dead_letter" and answer.status is None:
            self._dead_letter(event, answer)  # found unsendable here, without a request
        elif answer.verdict == "dead_letter":
            self._on_refused(event, answer, now, current, sent_at)
            self._note_rate_limit(answer, now)
        elif answer.verdict == "pause":
            self._unlease(event.seq)
            self._on_pause(answer, now, current)
        elif answer.status == 429:
            self._unlease(event.seq)  # not the event's fault: no attempt counted
            self._on_rate_limited(answer, now, current)
        else:
            wait = full_jitter(
                event.attempts,
                self._settings.backoff_base_s,
                self._settings.backoff_cap_s,
                self._rng,
            )
            if answer.retry_after_s is not None:
                wait = max(wait, min(answer.retry_after_s, MAX_HOLD_S))
            self._queue(Retry(event.seq, self._clock() + wait, answer.error))
            self._summary["retried"] += 1
            self._on_failure(answer, now, current)
            self._note_rate_limit(answer, now)
        self._progress.set()

    def _dead_letter(self, event: QueuedEvent, answer: Answer) -> None:
        self._queue(DeadLetter(event.seq, "rejected", answer.status, answer.error, len(event.body)))
        self._summary["dead_lettered"] += 1
        log.warning(
            "event_dead_lettered",
            id=event.id,
            reason="rejected",
            status=answer.status,
            detail=answer.error,  # Valmi's answer, cut short, the API key redacted
        )

    def _on_refused(
        self, event: QueuedEvent, answer: Answer, now: float, current: bool, sent_at: float
    ) -> None:
        """A permanent refusal: the event's fault when upstream delivers others meanwhile;
        a configuration problem when it refuses several different events in a row."""
        if self._state == "paused":
            # A probe, or an answer to a request sent before the pause: nothing can tell
            # a bad event from a bad configuration now. It stays queued, and the next
            # probe tries another event.
            self._probed.add(event.seq)
            self._unlease(event.seq)
            if self._systemic:
                self._systemic += 1
                self._last_error = self._systemic_error(answer, self._systemic)
            self._on_pause(replace(answer, error=self._last_error or answer.error), now, current)
            return
        if self._delivered_at >= sent_at:
            self._dead_letter(event, answer)  # upstream delivered another event meanwhile
            return
        self._refused[event.seq] = (event, answer)
        same = sum(a.status == answer.status for _, a in self._refused.values())
        if same < self._settings.pause_after_refusals:
            self._last_error = (
                f"{answer.error} (held, kept queued: {same} different events refused in a "
                "row; dead-lettered once another event is delivered, paused as a "
                f"configuration problem at {self._settings.pause_after_refusals})"
            )
            log.info(
                "event_refused_held",
                id=event.id,
                status=answer.status,
                refused_in_a_row=same,
                pause_after_refusals=self._settings.pause_after_refusals,
            )
            return
        held = list(self._refused)
        self._refused.clear()
        for seq in held:
            self._unlease(seq)
        self._systemic = same
        self._last_error = self._systemic_error(answer, same)
        self._on_pause(replace(answer, error=self._last_error), now, current=True)

    def _systemic_error(self, answer: Answer, n: int) -> str:
        return (
            f"HTTP {answer.status} for {n} requests in a row (at least "
            f"{self._settings.pause_after_refusals} different events), none delivered "
            "between: upstream refuses every event, so the cause is the "
            "configuration (api_url, or a proxy, gateway or firewall in between), not the "
            "events; forwarding is paused with every event kept, and resumes once a probe "
            f"is delivered; last answer: {answer.error}"
        )

    def _on_healthy(self) -> None:
        for event, answer in self._refused.values():
            self._dead_letter(event, answer)  # refused while upstream delivered another
        self._refused.clear()
        self._systemic = 0
        self._probed.clear()
        if self._state == "paused":
            log.info("upstream_resumed", probes=self._pauses)
        elif self._state == "backing_off":
            log.info("upstream_recovered", failures=self._failures)
        if self._state in ("backing_off", "paused"):
            self._state = "ok"
            self._hold_until = 0.0
            self._generation += 1
        self._failures = 0
        self._pauses = 0
        self._pause_status = None
        self._rate_limits = 0

    def _on_failure(self, answer: Answer, now: float, current: bool) -> None:
        if not current:
            return
        self._failures += 1
        hold: float | None = None
        if answer.retry_after_s is not None:
            hold = min(answer.retry_after_s, MAX_HOLD_S)
        if self._failures >= BACKOFF_AFTER_FAILURES:
            jitter = full_jitter(
                self._failures - BACKOFF_AFTER_FAILURES,
                self._settings.backoff_base_s,
                self._settings.backoff_cap_s,
                self._rng,
            )
            hold = jitter if hold is None else max(hold, jitter)
        if hold is None:
            return
        if self._state in ("ok", "rate_limited"):
            log.warning(
                "upstream_backing_off",
                failures=self._failures,
                status=answer.status,
                error=answer.error,
                wait_s=round(hold, 3),
            )
            self._state = "backing_off"
        self._hold_until = max(self._hold_until, now + hold)
        self._generation += 1

    def _on_pause(self, answer: Answer, now: float, current: bool) -> None:
        if self._state == "paused" and not current:
            return  # another answer to a request sent before the pause
        self._pauses += 1
        self._pause_status = answer.status
        hold = full_jitter(
            self._pauses - 1, self._settings.backoff_base_s, self._settings.backoff_cap_s, self._rng
        )
        if self._state != "paused":
            log.error("upstream_paused", status=answer.status, error=answer.error)
            self._state = "paused"
            self._release_buffer()
        self._hold_until = max(self._hold_until, now + hold)
        self._generation += 1

    def _on_rate_limited(self, answer: Answer, now: float, current: bool) -> None:
        if current:
            self._rate_limits += 1
        if answer.retry_after_s is not None:
            hold = min(answer.retry_after_s, MAX_HOLD_S)
        elif answer.rate_limit_reset_s is not None:
            hold = min(answer.rate_limit_reset_s, MAX_HOLD_S)
        else:
            hold = full_jitter(
                self._rate_limits,
                self._settings.backoff_base_s,
                self._settings.backoff_cap_s,
                self._rng,
            )
        if self._state == "ok":
            log.warning("upstream_rate_limited", status=429, wait_s=round(hold, 3))
            self._state = "rate_limited"
        self._release_buffer()  # lease again after the wait: the refused event goes first
        self._hold_until = max(self._hold_until, now + hold)
        self._generation += 1

    def _note_rate_limit(self, answer: Answer, now: float) -> None:
        remaining, reset_s = answer.rate_limit_remaining, answer.rate_limit_reset_s
        if remaining is None or reset_s is None or reset_s <= 0:
            return
        # What is left for new requests: the requests still in flight may not have been
        # counted upstream yet, so they are taken off (an estimate that errs low).
        self._budget = remaining - self._sending
        self._budget_reset_at = now + min(reset_s, MAX_HOLD_S)
        if self._budget <= 0:
            self._hold_for_budget(remaining)

    def _spend_budget(self) -> None:
        """One request is about to go: the last one upstream's budget allows holds the rest
        until the window resets, however many senders are free."""
        if self._budget is None:
            return
        self._budget -= 1
        if self._budget <= 0:
            self._hold_for_budget(0)

    def _hold_for_budget(self, remaining: int) -> None:
        if self._state == "ok":
            wait_s = max(0.0, self._budget_reset_at - time.monotonic())
            log.info("upstream_budget_exhausted", remaining=remaining, wait_s=round(wait_s, 3))
            self._state = "rate_limited"
        self._hold_until = max(self._hold_until, self._budget_reset_at)

    def _release_buffer(self) -> None:
        for event in self._buffer:
            self._unlease(event.seq)
        self._buffer.clear()

    # -- settling ------------------------------------------------------------------------

    def _queue(self, settlement: Settlement) -> None:
        self._pending.append(settlement)
        self._settle_wake.set()

    async def _settle_loop(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._settle_wake.clear()
                    await self._settle_wake.wait()
                    continue
                if len(self._pending) < self._batch and not self._closing:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SETTLE_LINGER_S):
                            await self._settle_now.wait()
                self._settle_now.clear()
                try:
                    await self._commit()
                except StoreError as exc:
                    # The disk is full or failing: keep the outcomes (their events stay in
                    # flight, so they are not sent again) and record them once it takes
                    # writes again. Meanwhile the events are still queued: a stop now
                    # re-sends them later with the same keys.
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

    async def _commit(self) -> None:
        n = _within_dead_bytes(self._pending)
        batch, self._pending = self._pending[:n], self._pending[n:]
        started = time.monotonic()
        self._committing = len(batch)
        try:
            await self._store.settle(batch)
        except BaseException:
            self._pending[:0] = batch  # not recorded: keep them, ahead of newer outcomes
            raise
        finally:
            self._committing = 0
        for settlement in batch:
            self._in_flight.discard(settlement.seq)
            if isinstance(settlement, Retry):
                self._changed()  # queued again, due at its time (delivered or dead: gone)
        log.debug(
            "batch_settled", n=len(batch), elapsed_ms=round((time.monotonic() - started) * 1000, 1)
        )
        expired = sum(isinstance(s, DeadLetter) and s.reason == "expired" for s in batch)
        if expired:  # one line per batch, not per event: a long outage can expire many
            log.warning("events_expired", n=expired, max_event_age_s=self._settings.max_event_age_s)
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
            if self._state in ("paused", "disabled"):
                return self._state
            if not self._running:
                return "stopped"
            if not self._pending and self._sending == 0:
                queued = self._queued()
                if queued == 0:
                    return "empty"
                if queued == len(self._refused) and not self._buffer:
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
        if self._sending or self._pending or self._buffer:
            return False
        if self._hold_until >= deadline:
            return True
        due = await self._store.next_due_at(frozenset(self._in_flight))
        if due is None:
            return False
        return due - self._clock() > deadline - time.monotonic()


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


__all__ = [
    "BACKOFF_AFTER_FAILURES",
    "Flusher",
    "FlusherError",
    "TokenBucket",
    "UpstreamState",
    "full_jitter",
    "rate_budget",
]
