"""What a running sidecar says about itself: the ``/v1/status`` JSON, what a metrics scrape
reads, the drain forecast, systemd's one-line STATUS=, and what a terminal is told while
it stops.

Each is built from plain values read at one moment (``Facts``), so that the words and
the arithmetic are tested without a running sidecar; ``service.py`` reads the values.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

from . import __version__
from .config import Settings
from .metrics import DrainForecast, MetricsSource, UpstreamStats, drain_forecast
from .operations import counts_json, disk_json, moved_aside_json
from .store import RATE_WINDOW_S, Counts, DiskUsage, Store, Unwritable

#: The upstream state shown when forwarding is off (no API key, so no flusher).
DISABLED: Final = "disabled"
#: How often a terminal is told how the drain is going.
CONSOLE_INTERVAL_S: Final = 1.0


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


class WorkersView(Protocol):
    """What a scrape reads of the ingest workers."""

    @property
    def configured(self) -> int: ...
    @property
    def alive(self) -> int: ...
    @property
    def restarts(self) -> int: ...


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
    #: While commits fail: since when, how many, the last error.
    unwritable: Unwritable | None = None


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
        "store": store_json(facts),
        "moved_aside": moved_aside_json(facts.moved_aside),
        "disk": disk_json(facts.disk),
        "upstream": _upstream_json(settings, flusher, forwarding=facts.forwarding),
    }


def store_json(facts: Facts) -> dict[str, Any]:
    """The store's part: whether it takes writes, and while it does not, why."""
    out: dict[str, Any] = {"writable": facts.writable, "path": str(facts.path)}
    u = facts.unwritable
    if u is not None:
        out["unwritable"] = {
            "for_s": u.for_s,
            "failed_commits": u.failed_commits,
            "error": u.error,
            "fs_free_bytes": u.fs_free_bytes,
        }
    return out


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


def metrics_source(
    settings: Settings,
    store: Store,
    flusher: FlusherView | None,
    *,
    upstream: UpstreamStats | None,
    refused: Mapping[str, int],
    ready: bool,
    workers: WorkersView | None,
    now: float,
) -> MetricsSource:
    """What one ``/metrics`` scrape shows, read now."""
    counts = store.counts()
    return MetricsSource(
        counts=counts,
        store=store.stats,
        upstream=upstream,
        refused=refused,
        in_flight=flusher.in_flight if flusher is not None else 0,
        upstream_state=upstream_state(flusher),
        writable=store.writable,
        ready=ready,
        max_queue_events=settings.max_queue_events,
        max_queue_bytes=settings.max_queue_bytes,
        max_event_age_s=settings.max_event_age_s,
        database_bytes=store.database_bytes(),
        drain=forecast(settings, counts, store.rates(), upstream_state(flusher), now),
        version=__version__,
        disk=store.disk(),
        ingest_workers=workers.configured if workers is not None else 0,
        ingest_workers_running=workers.alive if workers is not None else 0,
        ingest_worker_restarts=workers.restarts if workers is not None else 0,
    )


class Console:
    """The terminal a person waits at while the sidecar stops, or none (then silent)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    @property
    def attached(self) -> bool:
        return self._stream is not None

    def say(self, text: str) -> None:
        if self._stream is not None:
            self._stream.write(text + "\n")
            self._stream.flush()

    async def keep_telling(self, line: Callable[[], str]) -> None:
        """Say ``line()`` once a second until cancelled."""
        while True:
            self.say(line())
            await asyncio.sleep(CONSOLE_INTERVAL_S)
