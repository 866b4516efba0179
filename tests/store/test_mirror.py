"""The mirror of committed counts: what the store reports without reading the file."""

from __future__ import annotations

import asyncio

from valmi_sidecar.store import (
    Delivered,
)

from .conftest import T0, Clock, OpenStore, action


async def test_oldest_queued_at_follows_the_queue(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    assert store.counts().oldest_queued_at is None
    await store.submit([action(clock)])
    clock.t += 10
    await store.submit([action(clock)])
    assert T0 == store.counts().oldest_queued_at
    first, second = await store.lease(2, frozenset())
    await store.settle([Delivered(first.seq)])
    assert T0 + 10 == store.counts().oldest_queued_at
    await store.settle([Delivered(second.seq)])
    assert store.counts().oldest_queued_at is None


async def test_oldest_queued_at_when_one_group_settles_the_last_and_adds_new_events(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    await store.submit([action(clock)])
    (first,) = await store.lease(1, frozenset())
    clock.t += 10
    # Both are pending before the writer runs: one group removes the old event and
    # queues the new one.
    await asyncio.gather(store.settle([Delivered(first.seq)]), store.submit([action(clock)]))
    assert 2 == store.commits  # the first submit, then one group
    assert T0 + 10 == store.counts().oldest_queued_at
