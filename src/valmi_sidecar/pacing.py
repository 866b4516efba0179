"""Pacing, without I/O: the full-jitter backoff, and the token bucket that keeps the
flusher within the API key's rate limit in any 60-s window."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Final

#: Rounding slack for token counts, so a wait of exactly delay() always yields a token.
_EPSILON: Final = 1e-9


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
        if self._tokens >= 1.0 - _EPSILON:
            return 0.0  # a refill only adds: asked before every send, this is the usual answer
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


__all__ = ["TokenBucket", "full_jitter", "rate_budget"]
