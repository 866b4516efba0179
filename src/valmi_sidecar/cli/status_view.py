"""The ``/v1/status`` answer as a typed structure, for the summary ``status`` prints.

Every field may be missing: a status read from a stopped sidecar's database has fewer,
and a newer or older sidecar may answer with more or fewer (unknown ones are ignored).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec


class EventCounts(msgspec.Struct, frozen=True):
    received: int | None = None
    queued: int | None = None
    in_flight: int | None = None
    delivered: int | None = None
    dead_lettered: int | None = None
    duplicates: int | None = None


class QueueUsage(msgspec.Struct, frozen=True):
    bytes: int | None = None


class DiskView(msgspec.Struct, frozen=True):
    bytes: int | None = None
    max_bytes: int | None = None
    full: bool = False
    dead_letters_warning: str | None = None


class UnwritableView(msgspec.Struct, frozen=True):
    for_s: float | None = None
    failed_commits: int | None = None
    error: str | None = None
    fs_free_bytes: int | None = None


class StoreView(msgspec.Struct, frozen=True):
    writable: bool | None = None
    unwritable: UnwritableView | None = None


class UpstreamView(msgspec.Struct, frozen=True):
    state: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    answered_since_start: bool | None = None
    next_attempt_in_s: float | None = None


class Rates(msgspec.Struct, frozen=True):
    received: float | None = None
    delivered: float | None = None
    dead_lettered: float | None = None


class Drain(msgspec.Struct, frozen=True):
    basis: str | None = None
    forecast_s: float | None = None
    rate_per_s: float = 0.0


class ReasonCount(msgspec.Struct, frozen=True):
    reason: str
    count: int
    last_dead_at: float | None = None


class DeadLetterSummary(msgspec.Struct, frozen=True):
    reasons: list[ReasonCount] = msgspec.field(default_factory=list)


class MovedAside(msgspec.Struct, frozen=True):
    path: str | None = None
    bytes: int | None = None
    salvage: str | None = None


class StatusView(msgspec.Struct, frozen=True):
    """What ``status`` shows of a ``/v1/status`` answer (or of a database read offline)."""

    ready: bool | None = None
    draining: bool = False
    running: bool | None = None
    data_dir: str | None = None
    source: str | None = None
    events: EventCounts = msgspec.field(default_factory=EventCounts)
    queue: QueueUsage | None = None
    disk: DiskView | None = None
    store: StoreView | None = None
    oldest_queued_age_s: float | None = None
    upstream: UpstreamView | None = None
    rates_per_s: Rates | None = None
    drain: Drain | None = None
    dead_letters: DeadLetterSummary | None = None
    moved_aside: list[MovedAside] = msgspec.field(default_factory=list)

    @classmethod
    def of(cls, data: Mapping[str, Any] | StatusView) -> StatusView:
        """The typed view of a status answer (a JSON object)."""
        if isinstance(data, StatusView):
            return data
        return msgspec.convert(dict(data), cls)
