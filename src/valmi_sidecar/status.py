"""What a running sidecar says about itself: the ``/v1/status`` JSON, the drain forecast,
systemd's one-line STATUS=, and the line a terminal sees while it stops.

Each is built from plain values read at one moment (``Facts``), so that the words and
the arithmetic are tested without a running sidecar; ``service.py`` reads the values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .config import Settings
from .metrics import DrainForecast, drain_forecast
from .operations import counts_json, disk_json, moved_aside_json
from .store import RATE_WINDOW_S, Counts, DiskUsage

#: The upstream state shown when forwarding is off (no API key, so no flusher).
DISABLED = "disabled"


class FlusherView(Protocol):
    """What the status page reads of the flusher."""

    @property
    def state(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def last_error_at(self) -> float | None: ...
    @property
    def answered(self) -> bool: ...
    @property
    def next_attempt_in_s(self) -> float | None: ...
    @property
    def max_unsaved(self) -> int: ...


@dataclass(frozen=True)
class Facts:
    """The values one status page shows, read at one moment (``now``, Unix time)."""

    counts: Counts
    rates: Mapping[str, float | None]
    flusher: FlusherView | None
    forwarding: bool
    ready: bool
    draining: bool
    uptime_s: float
    writable: bool
    path: Path
    disk: DiskUsage
    moved_aside: Sequence[Path]
    now: float


def upstream_state(flusher: FlusherView | None) -> str:
    """The flusher's state, or ``disabled`` when there is none."""
    return flusher.state if flusher is not None else DISABLED


def forecast(
    settings: Settings, counts: Counts, rates: Mapping[str, float | None], state: str, now: float
) -> DrainForecast:
    """How long the queue takes to drain at the delivery rate; stalled while the upstream
    is paused or forwarding is off."""
    return drain_forecast(
        queued=counts.queued,
        oldest_age_s=None if counts.oldest_queued_at is None else now - counts.oldest_queued_at,
        delivered_per_s=rates["delivered"],
        rate_limit_per_min=settings.rate_limit_per_min_effective,
        stalled=state in ("paused", DISABLED),
        window_s=RATE_WINDOW_S,
    )


def rfc3339(unix: float | None) -> str | None:
    """A Unix time as RFC 3339 in UTC, to the millisecond (``None`` stays ``None``)."""
    if unix is None:
        return None
    return (
        datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def status_json(settings: Settings, facts: Facts) -> dict[str, Any]:
    """The JSON for ``/v1/status``: counts that reconcile, queue age, upstream state,
    the drain forecast."""
    c, now, flusher = facts.counts, facts.now, facts.flusher
    state = upstream_state(flusher)
    return {
        "version": __version__,
        "ready": facts.ready and not facts.draining,
        "draining": facts.draining,
        "uptime_s": round(facts.uptime_s, 3),
        **counts_json(
            c,
            in_flight=flusher.in_flight if flusher is not None else 0,
            max_events=settings.max_queue_events,
            max_bytes=settings.max_queue_bytes,
        ),
        "oldest_queued_age_s": (
            None if c.oldest_queued_at is None else round(now - c.oldest_queued_at, 3)
        ),
        "rates_per_s": dict(facts.rates),
        "drain": forecast(settings, c, facts.rates, state, now).as_json(),
        "store": {"writable": facts.writable, "path": str(facts.path)},
        "moved_aside": moved_aside_json(facts.moved_aside),
        "disk": disk_json(facts.disk),
        "upstream": _upstream_json(settings, flusher, forwarding=facts.forwarding),
    }


def _upstream_json(
    settings: Settings, flusher: FlusherView | None, *, forwarding: bool
) -> dict[str, Any]:
    next_in = None if flusher is None else flusher.next_attempt_in_s
    return {
        "url": settings.api_url,
        "state": upstream_state(flusher),
        "forwarding": forwarding,
        "last_error": flusher.last_error if flusher is not None else None,
        "last_error_at": rfc3339(flusher.last_error_at if flusher is not None else None),
        "answered_since_start": flusher.answered if flusher is not None else False,
        "next_attempt_in_s": None if next_in is None else round(next_in, 3),
        "rate_limit_per_min": settings.rate_limit_per_min_effective,
        "rate_limit_source": settings.rate_limit_source,
        # Sent but not yet recorded, at most: what a crash can make it send twice.
        "max_unsaved": flusher.max_unsaved if flusher is not None else 0,
    }


def status_line(counts: Counts | None, state: str) -> str:
    """One line for systemd's STATUS=: queue depth and upstream state (``starting``
    before the store is open)."""
    if counts is None:
        return "starting"
    return (
        f"queued={counts.queued} delivered={counts.delivered} "
        f"dead_lettered={counts.dead_lettered} upstream={state}"
    )


def drain_line(
    *,
    queued: int,
    hurried: bool,
    grace_until: float | None,
    flush_until: float | None,
    final_flush_s: float,
    now: float,
) -> str:
    """What a terminal is told while the sidecar stops (times are ``time.monotonic``)."""
    if hurried:
        return f"stopping now: closing the store; {queued} events stay queued"
    if flush_until is not None:
        left = max(0.0, flush_until - now)
        return (
            f"stopping: forwarding the queue, {queued} events left, {left:.0f} s left "
            "(Ctrl-C again to stop now: they stay queued)"
        )
    left = max(0.0, (grace_until or now) - now)
    return (
        f"stopping: finishing requests in flight, {left:.0f} s left at most, then "
        f"forwarding the queue ({queued} events) for up to "
        f"{final_flush_s:g} s (Ctrl-C again to stop now: they stay queued)"
    )
