"""The flusher's upstream policy: what upstream's answers mean for what is sent next.

No I/O: the policy is told each answer and the time (its ``clock``, monotonic), and says
what to do (a ``Decision``); ``Flusher`` does it (leases, settles, logs). It owns the
upstream state, the hold (backoff, ``429``/``Retry-After``, ``X-RateLimit-*``, a pause),
the token bucket, the refusals held until a delivery judges them, and ``last_error``.

The rules (guarantee 6):

* A delivery makes upstream healthy: every refusal held meanwhile is the event's fault
  (dead letters), and a backoff or a pause ends.
* ``BACKOFF_AFTER_FAILURES`` retryable failures in a row, across events, hold all sending
  for a full-jitter wait; then one request at a time (a probe) until one is delivered.
  Each failed event is retried after its own full-jitter wait.
* ``401``/``403``/``404`` (and unexpected answers) pause: every event kept, one probe at
  a time on the backoff schedule.
* A refusal (``400``, ``413``, ``422``) is held, the event kept queued, until a delivery
  answered after it was sent makes it a dead letter; ``pause_after_refusals`` different
  events refused with the same status and no delivery between is a configuration
  problem: forwarding pauses with every event kept, and each probe tries another event.
* A ``429`` holds sending for ``Retry-After``, else ``X-RateLimit-Reset``, else a
  full-jitter wait; an exhausted ``X-RateLimit-Remaining`` holds until its window resets.
* Answers to requests sent before a global wait started are stale: they do not stretch
  it (16 failures at once count as one).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from .config import Settings
from .pacing import TokenBucket, full_jitter, rate_budget
from .upstream import Answer

UpstreamState = Literal["ok", "backing_off", "rate_limited", "paused", "disabled"]

#: Consecutive retryable failures, across events, that put the whole flusher in backoff.
BACKOFF_AFTER_FAILURES: Final = 3
#: The longest a single upstream hint (Retry-After, X-RateLimit-Reset) may hold sending.
MAX_HOLD_S: Final = 24 * 3600.0
#: The states in which one request at a time goes (``probing``).
_PROBING: Final = frozenset({"backing_off", "paused"})


class Sent(Protocol):
    """What the policy needs of an event that was sent."""

    @property
    def seq(self) -> int: ...
    @property
    def id(self) -> str: ...
    @property
    def attempts(self) -> int: ...


E = TypeVar("E", bound=Sent)


@dataclass(frozen=True, slots=True)
class Note:
    """A line for the log: ``level``, the event's name and its fields."""

    level: Literal["info", "warning", "error"]
    event: str
    fields: dict[str, Any]


@dataclass(slots=True)
class Decision(Generic[E]):
    """What to do after one answer.

    ``action`` is for the answered event: record it ``delivered``, as a ``dead_letter``,
    or as a ``retry`` due in ``retry_in_s``; ``keep``: nothing to record (it is held as a
    refusal, or in ``release``). ``dead_letters`` are held refusals now judged the events'
    fault; ``release`` the events (by seq) back to the queue, to be leased again;
    ``release_buffer``: the events leased and not yet sent go back too.
    """

    action: Literal["delivered", "dead_letter", "retry", "keep"] = "keep"
    retry_in_s: float = 0.0
    dead_letters: list[tuple[E, Answer]] = field(default_factory=list)
    release: list[int] = field(default_factory=list)
    release_buffer: bool = False
    notes: list[Note] = field(default_factory=list)


class UpstreamPolicy(Generic[E]):
    """The upstream state and the holds; see the module docstring for the rules.

    ``clock`` is monotonic (every hold and wait is on it); ``wall`` gives the Unix time of
    ``last_error_at``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        enabled: bool = True,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._base_s = settings.backoff_base_s
        self._cap_s = settings.backoff_cap_s
        self._pause_after = settings.pause_after_refusals
        self._max_age_s = settings.max_event_age_s
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 (jitter, not secrets)
        self._clock = clock
        self._wall = wall
        rate_per_s, burst = rate_budget(settings.rate_limit_per_min_effective)
        self._bucket = TokenBucket(rate_per_s, burst, clock=clock)

        self._state: UpstreamState = "ok" if enabled else "disabled"
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._answered = False
        # Global hold (monotonic time) set by backoff, rate limits and pauses.
        self._hold_until = 0.0
        # Requests upstream's X-RateLimit-Remaining still allows in this window (None: not
        # told), and when that window ends.
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
        self._refused: dict[int, tuple[E, Answer]] = {}
        # When the last delivery was answered (-inf: none yet).
        self._delivered_at = float("-inf")
        # Refusals in a row that paused forwarding as systemic (0: not paused for that),
        # and the events its probes had refused, left out of the next leases so that
        # each probe tries another event.
        self._systemic = 0
        self._probed: set[int] = set()
        # Bumped whenever a global wait starts: answers to requests sent before it are
        # stale and do not stretch the wait further.
        self._generation = 0

    # -- what the flusher and the status ask -------------------------------------------

    @property
    def state(self) -> UpstreamState:
        """The state as reported: a rate limit whose hold has passed is ``ok``."""
        if self._state == "rate_limited" and self._hold_until <= self._clock():
            return "ok"
        return self._state

    @property
    def paused(self) -> bool:
        return self._state == "paused"

    @property
    def stopped(self) -> bool:
        """Paused or disabled: waiting for the queue to drain is pointless."""
        return self._state in ("paused", "disabled")

    @property
    def probing(self) -> bool:
        """Backing off or paused: one request at a time."""
        return self._state in _PROBING

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def last_error_at(self) -> float | None:
        """Unix time of ``last_error``."""
        return self._last_error_at

    @property
    def answered(self) -> bool:
        """Whether the upstream has answered (or failed) since start."""
        return self._answered

    @property
    def next_attempt_in_s(self) -> float | None:
        """While backing off, paused or rate-limited: seconds until the next request."""
        if self.state not in ("backing_off", "paused", "rate_limited"):
            return None
        return max(0.0, self._hold_until - self._clock())

    @property
    def hold_until(self) -> float:
        """Until when (monotonic) nothing is sent; in the past when sending may go on."""
        return self._hold_until

    @property
    def generation(self) -> int:
        """Pass it back with the answer: it tells a stale answer from a current one."""
        return self._generation

    @property
    def held(self) -> int:
        """Refused events held until a delivery judges them."""
        return len(self._refused)

    @property
    def probed(self) -> frozenset[int]:
        """Events (by seq) this pause's probes were refused for: lease others first."""
        return frozenset(self._probed)

    @property
    def refresh_key_first(self) -> bool:
        """Paused by a ``401``/``403``: read the key again before each probe (a rotated
        key resumes delivery without a restart)."""
        return self._state == "paused" and self._pause_status in (401, 403)

    def send_limit(self, concurrency: int) -> int:
        """``concurrency``, or one while probing (asked for every event sent)."""
        return 1 if self._state in _PROBING else concurrency

    def expired(self, attempts: int, age_s: float) -> bool:
        """Whether to dead-letter an event as expired instead of sending it: past
        ``max_event_age_s`` and it had its chance. Only an event tried before (a retryable
        failure), and never while paused: then the event is the probe, so a wrong key or
        URL for longer than the age limit expires nothing, one event per probe or all at
        once."""
        return attempts > 0 and self._state != "paused" and age_s > self._max_age_s

    # -- what changes it ---------------------------------------------------------------

    def wait_s(self) -> float:
        """Seconds sending is held for; at ``0.0``, a rate limit or an exhausted budget
        whose time has come is over."""
        now = self._clock()
        if self._hold_until > now:
            return self._hold_until - now
        if self._state == "rate_limited":
            self._state = "ok"
        if self._budget is not None and now >= self._budget_reset_at:
            self._budget = None  # a new window: upstream's next answer tells again
        return 0.0

    def token_wait_s(self) -> float:
        """Seconds until the rate budget allows a request."""
        return self._bucket.delay()

    def take(self) -> tuple[bool, list[Note]]:
        """One request is about to go: take its token (``False``: none yet). The last
        request upstream's budget allows holds the rest until its window resets, however
        many senders are free."""
        if not self._bucket.take():
            return False, []
        notes: list[Note] = []
        if self._budget is not None:
            self._budget -= 1
            if self._budget <= 0:
                self._hold_for_budget(0, notes)
        return True, notes

    def probe_now(self) -> bool:
        """While paused, let the next probe go now (the key was just replaced); whether
        it was paused."""
        if self._state != "paused":
            return False
        self._hold_until = 0.0
        return True

    def forget_probes(self) -> None:
        """Every due event was tried in this pause: start again."""
        self._probed.clear()

    def forget_held(self) -> None:
        """The flusher stops: refusals held are not judged (they stay queued)."""
        self._refused.clear()
        self._probed.clear()

    def on_quiet_delivery(self, answer: Answer) -> bool:
        """``on_answer`` for the usual answer, taken here when it decides nothing: a
        delivery that says nothing of the rate limit, while all is well (no failure, pause,
        rate limit or refusal to clear). Then the flusher records the delivery and nothing
        else changes. ``False``: ask ``on_answer``."""
        if (
            self._state != "ok"
            or answer.verdict != "delivered"
            or answer.rate_limit_remaining is not None
            or answer.rate_limit_reset_s is not None
            or self._refused
            or self._probed
            or self._failures
            or self._pauses
            or self._systemic
            or self._rate_limits
            or self._pause_status is not None
        ):
            return False
        self._answered = True
        self._delivered_at = self._clock()
        return True

    def on_answer(
        self, event: E, answer: Answer, generation: int, sent_at: float, *, sending: int
    ) -> Decision[E]:
        """``event``, sent at ``sent_at`` (this clock) in ``generation``, got ``answer``;
        ``sending`` requests are still out."""
        now = self._clock()
        current = generation == self._generation
        d: Decision[E] = Decision()
        self._answered = True
        if answer.verdict != "delivered":
            self._last_error = answer.error
            self._last_error_at = self._wall()
        if answer.verdict == "delivered":
            d.action = "delivered"
            self._delivered_at = now
            self._on_healthy(d)
            self._note_rate_limit(answer, now, sending, d.notes)
        elif answer.verdict == "dead_letter" and answer.status is None:
            d.action = "dead_letter"  # found unsendable here, without a request
        elif answer.verdict == "dead_letter":
            self._on_refused(event, answer, now, current, d, sent_at=sent_at)
            self._note_rate_limit(answer, now, sending, d.notes)
        elif answer.verdict == "pause":
            d.release.append(event.seq)
            self._on_pause(answer, now, current, d)
        elif answer.status == 429:
            d.release.append(event.seq)  # not the event's fault: no attempt counted
            self._on_rate_limited(answer, now, current, d)
        else:
            wait = full_jitter(event.attempts, self._base_s, self._cap_s, self._rng)
            if answer.retry_after_s is not None:
                wait = max(wait, min(answer.retry_after_s, MAX_HOLD_S))
            d.action, d.retry_in_s = "retry", wait
            self._on_failure(answer, now, current, d)
            self._note_rate_limit(answer, now, sending, d.notes)
        return d

    # -- the rules ---------------------------------------------------------------------

    def _on_refused(
        self, event: E, answer: Answer, now: float, current: bool, d: Decision[E], *, sent_at: float
    ) -> None:
        """A permanent refusal: the event's fault when upstream delivers others meanwhile;
        a configuration problem when it refuses several different events in a row."""
        if self._state == "paused":
            # A probe, or an answer to a request sent before the pause: nothing can tell
            # a bad event from a bad configuration now. It stays queued, and the next
            # probe tries another event.
            self._probed.add(event.seq)
            d.release.append(event.seq)
            if self._systemic:
                self._systemic += 1
                self._last_error = self._systemic_error(answer, self._systemic)
            self._on_pause(replace(answer, error=self._last_error or answer.error), now, current, d)
            return
        if self._delivered_at >= sent_at:
            d.action = "dead_letter"  # upstream delivered another event meanwhile
            return
        self._refused[event.seq] = (event, answer)
        same = sum(a.status == answer.status for _, a in self._refused.values())
        if same < self._pause_after:
            self._last_error = (
                f"{answer.error} (held, kept queued: {same} different events refused in a "
                "row; dead-lettered once another event is delivered, paused as a "
                f"configuration problem at {self._pause_after})"
            )
            d.notes.append(
                Note(
                    "info",
                    "event_refused_held",
                    {
                        "id": event.id,
                        "status": answer.status,
                        "refused_in_a_row": same,
                        "pause_after_refusals": self._pause_after,
                    },
                )
            )
            return
        d.release.extend(self._refused)
        self._refused.clear()
        self._systemic = same
        self._last_error = self._systemic_error(answer, same)
        self._on_pause(replace(answer, error=self._last_error), now, True, d)

    def _systemic_error(self, answer: Answer, n: int) -> str:
        return (
            f"HTTP {answer.status} for {n} requests in a row (at least "
            f"{self._pause_after} different events), none delivered "
            "between: upstream refuses every event, so the cause is the "
            "configuration (api_url, or a proxy, gateway or firewall in between), not the "
            "events; forwarding is paused with every event kept, and resumes once a probe "
            f"is delivered; last answer: {answer.error}"
        )

    def _on_healthy(self, d: Decision[E]) -> None:
        d.dead_letters.extend(self._refused.values())  # refused while another was delivered
        self._refused.clear()
        self._systemic = 0
        self._probed.clear()
        if self._state == "paused":
            d.notes.append(Note("info", "upstream_resumed", {"probes": self._pauses}))
        elif self._state == "backing_off":
            d.notes.append(Note("info", "upstream_recovered", {"failures": self._failures}))
        if self._state in _PROBING:
            self._state = "ok"
            self._hold_until = 0.0
            self._generation += 1
        self._failures = 0
        self._pauses = 0
        self._pause_status = None
        self._rate_limits = 0

    def _on_failure(self, answer: Answer, now: float, current: bool, d: Decision[E]) -> None:
        if not current:
            return
        self._failures += 1
        hold: float | None = None
        if answer.retry_after_s is not None:
            hold = min(answer.retry_after_s, MAX_HOLD_S)
        if self._failures >= BACKOFF_AFTER_FAILURES:
            jitter = full_jitter(
                self._failures - BACKOFF_AFTER_FAILURES, self._base_s, self._cap_s, self._rng
            )
            hold = jitter if hold is None else max(hold, jitter)
        if hold is None:
            return
        if self._state in ("ok", "rate_limited"):
            fields = {
                "failures": self._failures,
                "status": answer.status,
                "error": answer.error,
                "wait_s": round(hold, 3),
            }
            d.notes.append(Note("warning", "upstream_backing_off", fields))
            self._state = "backing_off"
        self._hold_until = max(self._hold_until, now + hold)
        self._generation += 1

    def _on_pause(self, answer: Answer, now: float, current: bool, d: Decision[E]) -> None:
        if self._state == "paused" and not current:
            return  # another answer to a request sent before the pause
        self._pauses += 1
        self._pause_status = answer.status
        hold = full_jitter(self._pauses - 1, self._base_s, self._cap_s, self._rng)
        if self._state != "paused":
            fields = {"status": answer.status, "error": answer.error}
            d.notes.append(Note("error", "upstream_paused", fields))
            self._state = "paused"
            d.release_buffer = True
        self._hold_until = max(self._hold_until, now + hold)
        self._generation += 1

    def _on_rate_limited(self, answer: Answer, now: float, current: bool, d: Decision[E]) -> None:
        if current:
            self._rate_limits += 1
        if answer.retry_after_s is not None:
            hold = min(answer.retry_after_s, MAX_HOLD_S)
        elif answer.rate_limit_reset_s is not None:
            hold = min(answer.rate_limit_reset_s, MAX_HOLD_S)
        else:
            hold = full_jitter(self._rate_limits, self._base_s, self._cap_s, self._rng)
        if self._state == "ok":
            fields = {"status": 429, "wait_s": round(hold, 3)}
            d.notes.append(Note("warning", "upstream_rate_limited", fields))
            self._state = "rate_limited"
        d.release_buffer = True  # lease again after the wait: the refused event goes first
        self._hold_until = max(self._hold_until, now + hold)
        self._generation += 1

    def _note_rate_limit(self, answer: Answer, now: float, sending: int, notes: list[Note]) -> None:
        remaining, reset_s = answer.rate_limit_remaining, answer.rate_limit_reset_s
        if remaining is None or reset_s is None or reset_s <= 0:
            return
        # What is left for new requests: the requests still in flight may not have been
        # counted upstream yet, so they are taken off (an estimate that errs low).
        self._budget = remaining - sending
        self._budget_reset_at = now + min(reset_s, MAX_HOLD_S)
        if self._budget <= 0:
            self._hold_for_budget(remaining, notes)

    def _hold_for_budget(self, remaining: int, notes: list[Note]) -> None:
        if self._state == "ok":
            wait_s = max(0.0, self._budget_reset_at - self._clock())
            fields = {"remaining": remaining, "wait_s": round(wait_s, 3)}
            notes.append(Note("info", "upstream_budget_exhausted", fields))
            self._state = "rate_limited"
        self._hold_until = max(self._hold_until, self._budget_reset_at)


__all__ = [
    "BACKOFF_AFTER_FAILURES",
    "MAX_HOLD_S",
    "Decision",
    "Note",
    "Sent",
    "TokenBucket",
    "UpstreamPolicy",
    "UpstreamState",
    "full_jitter",
    "rate_budget",
]
