"""Prometheus exposition (``GET /metrics``) and the plain counters behind it.

Nothing on the request path touches prometheus-client: the store, the upstream client and
the receiver keep plain ``int`` counters and ``Histogram`` objects (only ever changed on the
event loop, so no locks), and ``render_metrics`` turns one snapshot of them into metric
families at scrape time, beside the standard ``process_*`` and ``python_*`` collectors. The
durable figures (``valmi_sidecar_events_current{state}``, ``…_events_received_total``,
``…_events_delivered_total``, ``…_events_duplicates_total``) come from the store's mirror
of its committed counters and reconcile exactly with ``/v1/status``: ``received = queued +
delivered + dead_lettered``. The other ``…_total`` counters count what happened since the
process started, as Prometheus counters do.

This module imports nothing of the package at run time, so that every other module may use
``Histogram``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .histogram import (
    UPSTREAM_SECONDS_BUCKETS,
    Histogram,
)

if TYPE_CHECKING:
    from .store import Counts, DiskUsage, StoreStats

PREFIX: Final = "valmi_sidecar_"
UPSTREAM_STATES: Final = ("ok", "backing_off", "rate_limited", "paused", "disabled")
KINDS: Final = ("action", "outcome")
#: Upstream answers by class; ``error`` is a transport error or timeout (no answer).
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")
#: Each HTTP status's class, looked up once a request rather than formatted.
_STATUS_CLASS: Final = {s: f"{s // 100}xx" for s in range(100, 600)}
#: The receiver's refusal codes, shown at 0 before the first (others appear when seen).
REFUSAL_CODES: Final = (
    "invalid_request",
    "invalid_idempotency_key",
    "unauthorized",
    "host_not_allowed",
    "origin_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "idempotency_key_reused",
    "queue_full",
    "store_unavailable",
    "outcome_unknown",
    "shutting_down",
)


def histogram_family(h: Histogram, name: str, doc: str) -> HistogramMetricFamily:
    cumulative: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*h.bounds, float("inf")), h.buckets, strict=True):
        running += n
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=h.sum)


@dataclass(slots=True)
class UpstreamStats:
    """Upstream requests by status class, and their durations (from send to answer)."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))
    duration: Histogram = field(default_factory=lambda: Histogram(UPSTREAM_SECONDS_BUCKETS))

    def observe(self, status: int | None, seconds: float) -> None:
        """Count one request: its HTTP status, or ``None`` for a transport error."""
        self.requests[_STATUS_CLASS.get(status, "error") if status is not None else "error"] += 1
        self.duration.observe(seconds)


DrainBasis = Literal["empty", "observed", "rate_limit", "stalled"]


@dataclass(frozen=True, slots=True)
class DrainForecast:
    """How long the current queue needs to reach upstream, and the rate that assumes."""

    #: ``math.inf`` when nothing drains (forwarding paused or disabled, or nothing was
    #: delivered while events waited).
    seconds: float
    rate_per_s: float
    #: ``observed``: the delivery rate of the last minute, the queue never empty in it;
    #: ``rate_limit``: the most upstream takes (one event a request), as the flusher was
    #: not busy long enough to show its own rate; ``empty``; ``stalled``.
    basis: DrainBasis

    def as_json(self) -> dict[str, Any]:
        return {
            "forecast_s": None if math.isinf(self.seconds) else round(self.seconds, 3),
            "rate_per_s": round(self.rate_per_s, 3),
            "basis": self.basis,
        }


def drain_forecast(
    *,
    queued: int,
    oldest_age_s: float | None,
    delivered_per_s: float | None,
    rate_limit_per_min: int,
    stalled: bool,
    window_s: float,
) -> DrainForecast:
    """The time ``queued`` events need at the rate they are delivered.

    The delivery rate of the last ``window_s`` is what the flusher achieves only when it
    had work all that time: when the oldest event has waited at least that long (the queue
    is drained oldest first). Otherwise the rate is unknown and the rate limit, the most
    upstream takes, gives the shortest time the queue can need.
    """
    if queued <= 0:
        return DrainForecast(0.0, 0.0, "empty")
    if stalled:
        return DrainForecast(math.inf, 0.0, "stalled")
    limit = rate_limit_per_min / 60.0
    if delivered_per_s is not None and oldest_age_s is not None and oldest_age_s >= window_s:
        rate = min(max(delivered_per_s, 0.0), limit)
        return DrainForecast(queued / rate if rate > 0 else math.inf, rate, "observed")
    return DrainForecast(queued / limit, limit, "rate_limit")


@dataclass(frozen=True, slots=True)
class MetricsSource:
    """Everything one scrape shows, read by the service at scrape time."""

    counts: Counts
    store: StoreStats
    upstream: UpstreamStats | None
    refused: Mapping[str, int]
    in_flight: int
    upstream_state: str
    writable: bool
    ready: bool
    max_queue_events: int
    max_queue_bytes: int
    max_event_age_s: float
    database_bytes: int
    drain: DrainForecast
    version: str
    disk: DiskUsage
    #: Ingest worker processes: configured (0 with ``ingest_processes = 1``), running,
    #: and started again after an exit.
    ingest_workers: int = 0
    ingest_workers_running: int = 0
    ingest_worker_restarts: int = 0


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))


def _gauge(name: str, doc: str, value: float | None = None) -> GaugeMetricFamily:
    if value is None:
        return GaugeMetricFamily(PREFIX + name, doc, labels=[])
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


class _Snapshot(Collector):
    def __init__(self, source: MetricsSource) -> None:
        self._s = source

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            PREFIX + "build_info", "Always 1; the sidecar's version.", labels=["version"]
        )
        build.add_metric([self._s.version], 1.0)
        yield build
        yield from self._durable()
        yield from self._flows()
        yield from self._queue()
        yield from self._upstream()
        yield from self._commits()
        yield from self._workers()
        yield from self._disk()
        yield from self._corruption()

    def _durable(self) -> Iterator[Metric]:
        c = self._s.counts
        current = GaugeMetricFamily(
            PREFIX + "events_current",
            "Events held now by state, durable: queued (waiting) and dead_lettered (kept, "
            "not sent); the sum is every accepted event not delivered.",
            labels=["state"],
        )
        current.add_metric(["queued"], c.queued)
        current.add_metric(["dead_lettered"], c.dead_lettered)
        yield current
        events = GaugeMetricFamily(
            PREFIX + "events",
            "Deprecated, removed in the next release: it mixes current states with running "
            "totals. Use events_current{state} and the events_received_total, "
            "events_delivered_total and events_duplicates_total counters.",
            labels=["state"],
        )
        for state, value in (
            ("received", c.received),
            ("queued", c.queued),
            ("delivered", c.delivered),
            ("dead_lettered", c.dead_lettered),
            ("duplicates", c.duplicates),
        ):
            events.add_metric([state], value)
        yield events
        # Kept from the first release (durable, never decreasing).
        yield CounterMetricFamily(
            PREFIX + "events_received", "Events accepted (answered 202), durable.", value=c.received
        )
        yield CounterMetricFamily(
            PREFIX + "events_delivered", "Events delivered upstream, durable.", value=c.delivered
        )
        yield CounterMetricFamily(
            PREFIX + "events_duplicates",
            "Client retries answered from an earlier event (nothing stored), durable.",
            value=c.duplicates,
        )

    def _flows(self) -> Iterator[Metric]:
        st = self._s.store
        received = _counter("received_events", "Events accepted since start, by kind.", ["kind"])
        delivered = _counter(
            "delivered_events",
            "Events delivered upstream (2xx or 409) since start, by kind.",
            ["kind"],
        )
        duplicates = _counter(
            "deduplicated_events",
            "Client retries answered from an earlier event (nothing stored) since start, by kind.",
            ["kind"],
        )
        for kind in KINDS:
            received.add_metric([kind], st.received.get(kind, 0))
            delivered.add_metric([kind], st.delivered.get(kind, 0))
            duplicates.add_metric([kind], st.duplicates.get(kind, 0))
        yield from (received, delivered, duplicates)
        dead = _counter(
            "dead_lettered_events",
            "Events dead-lettered since start, by kind and reason (rejected: upstream 400/413/422; expired: older than max_event_age_s).",
            ["kind", "reason"],
        )
        seen = dict.fromkeys(((k, r) for k in KINDS for r in ("rejected", "expired")), 0)
        seen.update(st.dead_lettered)
        for (kind, reason), n in sorted(seen.items()):
            dead.add_metric([kind, reason], n)
        yield dead
        refused = _counter(
            "refused_requests",
            "Requests refused since start, by error code (nothing stored or changed, except "
            "that outcome_unknown may have been): every refusal of an ingest route, and on "
            "every route a foreign Host or Origin or a POST not declared JSON.",
            ["reason"],
        )
        codes = {**dict.fromkeys(REFUSAL_CODES, 0), **self._s.refused}
        for code, n in sorted(codes.items()):
            refused.add_metric([code], n)
        yield refused
        yield CounterMetricFamily(
            PREFIX + "dead_letters_requeued",
            "Dead letters re-queued by an operator since start.",
            value=st.requeued,
        )
        yield CounterMetricFamily(
            PREFIX + "dead_letters_purged",
            "Dead letters deleted by an operator since start (their counts stay).",
            value=st.purged,
        )
        yield CounterMetricFamily(
            PREFIX + "salvaged_events",
            "Events re-queued from a moved-aside database since start.",
            value=st.salvaged,
        )

    def _queue(self) -> Iterator[Metric]:
        s = self._s
        c = s.counts
        age = 0.0 if c.oldest_queued_at is None else max(0.0, time.time() - c.oldest_queued_at)
        yield _gauge("queue_events", "Events waiting.", c.queued)
        yield _gauge("queue_bytes", "Bytes of event bodies waiting.", c.queued_bytes)
        yield _gauge("queue_max_events", "The queue's limit in events.", s.max_queue_events)
        yield _gauge("queue_max_bytes", "The queue's limit in bytes.", s.max_queue_bytes)
        yield _gauge("queue_oldest_age_seconds", "Age of the oldest waiting event.", age)
        yield _gauge(
            "max_event_age_seconds",
            "Events older than this are dead-lettered as expired.",
            s.max_event_age_s,
        )
        yield _gauge("dead_letters", "Events dead-lettered now (durable).", c.dead_lettered)
        yield _gauge("events_in_flight", "Events being sent upstream now.", s.in_flight)
        yield _gauge(
            "drain_forecast_seconds",
            "Seconds the queue needs to reach upstream: at the delivery rate of the last "
            "minute when the queue waited all of it, else at the rate limit (the least it "
            "can take); +Inf when forwarding is paused or disabled or nothing is delivered. "
            "Above max_event_age_s, the newest events expire before their turn.",
            s.drain.seconds,
        )

    def _upstream(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            PREFIX + "upstream_state", "1 for the flusher's current state.", labels=["state"]
        )
        for name in UPSTREAM_STATES:
            state.add_metric([name], 1.0 if name == self._s.upstream_state else 0.0)
        yield state
        up = self._s.upstream if self._s.upstream is not None else UpstreamStats()
        requests = _counter(
            "upstream_requests",
            "Requests sent upstream since start, by status class (error: no answer).",
            ["status_class"],
        )
        for name in STATUS_CLASSES:
            requests.add_metric([name], up.requests.get(name, 0))
        yield requests
        yield histogram_family(
            up.duration, PREFIX + "upstream_request_duration_seconds", "Upstream request duration."
        )

    def _commits(self) -> Iterator[Metric]:
        """The group commits, and whether the database takes writes."""
        s = self._s
        st = s.store
        yield histogram_family(
            st.commit_events,
            PREFIX + "commit_batch_events",
            "Events (submitted or settled) per group commit.",
        )
        yield histogram_family(
            st.commit_seconds,
            PREFIX + "commit_duration_seconds",
            "Duration of one group commit transaction.",
        )
        yield CounterMetricFamily(
            PREFIX + "commit_failures",
            "Group commits that failed (disk full, I/O error) since start.",
            value=st.commit_failures,
        )
        yield _gauge("store_writable", "1 when the database accepts writes.", float(s.writable))
        yield _gauge("ready", "1 when /readyz answers 200.", float(s.ready))

    def _workers(self) -> Iterator[Metric]:
        """The ingest worker processes."""
        s = self._s
        yield _gauge(
            "ingest_workers",
            "Ingest worker processes configured (ingest_processes; 0 when the main process serves alone).",
            s.ingest_workers,
        )
        yield _gauge(
            "ingest_workers_running",
            "Ingest worker processes listening now.",
            s.ingest_workers_running,
        )
        yield CounterMetricFamily(
            PREFIX + "ingest_worker_restarts",
            "Ingest worker processes started again after an exit, since start.",
            value=s.ingest_worker_restarts,
        )

    def _disk(self) -> Iterator[Metric]:
        """The database's size and the disk budget."""
        s = self._s
        yield _gauge(
            "database_size_bytes", "Size of the database file and its WAL.", s.database_bytes
        )
        disk = s.disk
        yield _gauge(
            "disk_bytes",
            "Bytes every file in the data directory takes, as max_queue_bytes counts them.",
            disk.bytes,
        )
        yield _gauge(
            "disk_max_bytes",
            "The disk budget (max_queue_bytes): the data directory never takes more.",
            disk.max_bytes,
        )
        yield _gauge(
            "disk_full",
            "1 when new events are refused (503 queue_full) for want of room in the disk budget.",
            float(disk.full),
        )
        yield _gauge(
            "dead_letter_bytes",
            "Bytes the stored dead letters take on disk (bodies plus rows, estimated).",
            disk.dead_letter_bytes,
        )

    def _corruption(self) -> Iterator[Metric]:
        """Corrupt databases moved aside."""
        st = self._s.store
        yield CounterMetricFamily(
            PREFIX + "database_corruptions",
            "Corrupt databases moved aside at start-up by this process.",
            value=st.corrupt_moved_aside,
        )
        yield _gauge(
            "database_moved_aside_files",
            "Moved-aside corrupt databases in the data directory (salvage, then delete them).",
            st.corrupt_files,
        )


@functools.cache
def _standard_collectors() -> tuple[Collector, ...]:
    """prometheus-client's ``process_*`` and ``python_*`` collectors, made once: they read
    the process's limits and the platform when created. The holder registry only keeps
    them from registering in the library's global one."""
    holder = CollectorRegistry(auto_describe=False)
    return (
        ProcessCollector(registry=holder),
        PlatformCollector(registry=holder),
        GCCollector(registry=holder),
    )


def render_metrics(source: MetricsSource) -> bytes:
    """The Prometheus text exposition of one consistent snapshot, with the standard
    ``process_*`` (this process: the main one when ingest workers run) and ``python_*``
    families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(source))
    for collector in _standard_collectors():
        registry.register(collector)
    return generate_latest(registry)
