"""The fake Valmi API's fault model: what it does wrong (``Faults``), how a change to it
is checked, and its rate-limit window. No I/O; ``fake_api`` serves the routes."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

from valmi_sidecar.events import Problem

__all__ = ["RATE_WINDOW_S", "Faults", "FaultsError", "RateWindow", "check_faults"]

RATE_WINDOW_S: Final = 60.0


@dataclass
class Faults:
    """What the fake does wrong; every field off by default. Changed live by tests.

    Setting a field wakes requests that wait on it (a request held by ``hang`` is answered
    as soon as ``hang`` is switched off).
    """

    error_rate: float = 0.0  # share of requests answered with error_status
    error_status: int = 503
    latency_s: float = 0.0  # added before answering
    hang: bool = False  # never answer (until switched off)
    unauthorized: bool = False  # every request gets 401
    rate_limited: bool = False  # every request gets 429 with Retry-After
    retry_after_s: float = 1.0
    reset_after_store: bool = False  # store the event, then drop the connection unanswered

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if not name.startswith("_"):
            listener: Callable[[], None] | None = getattr(self, "_listener", None)
            if listener is not None:
                listener()


class FaultsError(ValueError):
    """A change to ``Faults`` that names an unknown field or gives a field a bad value."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))


_FAULT_TYPES: Final[Mapping[str, type]] = {
    f.name: type(getattr(Faults(), f.name)) for f in fields(Faults)
}


def check_faults(changes: Mapping[str, Any]) -> list[Problem]:
    """Every problem with a change to ``Faults`` (an empty list when it can be applied)."""
    out: list[Problem] = []
    for name, value in changes.items():
        expected = _FAULT_TYPES.get(name)
        if expected is None:
            allowed = ", ".join(_FAULT_TYPES)
            out.append(Problem(name, f"is not a field of Faults; allowed: {allowed}"))
        elif expected is bool:
            if not isinstance(value, bool):
                out.append(Problem(name, "must be a boolean"))
        elif expected is int:
            if isinstance(value, bool) or not isinstance(value, int):
                out.append(Problem(name, "must be an integer"))
            elif name == "error_status" and not 100 <= value <= 599:
                out.append(Problem(name, "must be an HTTP status from 100 to 599"))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            out.append(Problem(name, "must be a number"))
        elif not math.isfinite(value) or value < 0:
            out.append(Problem(name, "must be a finite number >= 0"))
        elif name == "error_rate" and value > 1:
            out.append(Problem(name, "must be between 0 and 1"))
    return out


class RateWindow:
    """Fixed windows of ``length_s``; the first starts at the first request."""

    def __init__(self, limit: int, length_s: float = RATE_WINDOW_S) -> None:
        self.limit = limit
        self.length_s = length_s
        self.start: float | None = None
        self.used = 0

    def roll(self, now: float) -> None:
        if self.start is None:
            self.start = now
        elif now >= self.start + self.length_s:
            self.start += self.length_s * ((now - self.start) // self.length_s)
            self.used = 0

    def take(self, now: float) -> bool:
        """Count one request; ``False`` when the window's budget is spent (not counted)."""
        self.roll(now)
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def ends_in(self, now: float) -> float:
        start = now if self.start is None else self.start
        return max(0.0, start + self.length_s - now)

    def stamp(
        self, headers: dict[str, str], now: float, wall: Callable[[], float], *, take: bool
    ) -> bool:
        """Add the ``X-RateLimit-*`` headers at ``now`` (the fake's clock; ``wall`` gives
        Unix time for the reset header); with ``take``, spend one request of budget.

        Return ``False`` (and add ``Retry-After``) when the budget is spent.
        """
        if take:
            allowed = self.take(now)
        else:
            self.roll(now)
            allowed = True
        ends_in = self.ends_in(now)
        headers["X-RateLimit-Limit"] = str(self.limit)
        headers["X-RateLimit-Remaining"] = str(self.limit - self.used)
        headers["X-RateLimit-Reset"] = str(math.ceil(wall() + ends_in))
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(ends_in)))
        return allowed
