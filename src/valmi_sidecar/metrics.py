"""Prometheus exposition of the event counts (``GET /metrics``).

The counts are read at scrape time from the store's in-memory mirror of its committed
counters, so the request path pays nothing for metrics and the figures reconcile exactly
with ``/v1/status``: ``received = queued + delivered + dead_lettered``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .store import Counts

PREFIX: Final = "valmi_sidecar_"
UPSTREAM_STATES: Final = ("ok", "backing_off", "rate_limited", "paused", "disabled")


class _Snapshot(Collector):
    def __init__(self, counts: Counts, in_flight: int, upstream_state: str) -> None:
        self._counts = counts
        self._in_flight = in_flight
        self._state = upstream_state

    def collect(self) -> Iterator[Metric]:
        c = self._counts
        for name, value, doc in (
            ("events_received", c.received, "Events accepted (answered 202), duplicates apart."),
            ("events_delivered", c.delivered, "Events delivered upstream (2xx or 409)."),
            ("events_dead_lettered", c.dead_lettered, "Events refused for good or expired."),
            ("events_duplicates", c.duplicates, "Client retries answered from an earlier event."),
        ):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        yield GaugeMetricFamily(PREFIX + "queue_events", "Events waiting.", value=c.queued)
        yield GaugeMetricFamily(
            PREFIX + "queue_bytes", "Bytes of event bodies waiting.", value=c.queued_bytes
        )
        age = 0.0 if c.oldest_queued_at is None else max(0.0, time.time() - c.oldest_queued_at)
        yield GaugeMetricFamily(
            PREFIX + "queue_oldest_age_seconds", "Age of the oldest waiting event.", value=age
        )
        yield GaugeMetricFamily(
            PREFIX + "events_in_flight", "Events being sent upstream now.", value=self._in_flight
        )
        state = GaugeMetricFamily(
            PREFIX + "upstream_state", "1 for the flusher's current state.", labels=["state"]
        )
        for name in UPSTREAM_STATES:
            state.add_metric([name], 1.0 if name == self._state else 0.0)
        yield state


def render_metrics(counts: Counts, *, in_flight: int, upstream_state: str) -> bytes:
    """The Prometheus text exposition of one consistent snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(counts, in_flight, upstream_state))
    return generate_latest(registry)
