"""The events a commit adds are handed over in memory, once: a lease that returns one
takes it out of the handoff, and what does not fit is counted as missed."""

from __future__ import annotations

import pytest

from valmi_sidecar.store import Store, handoff

from .conftest import OpenStore, action


async def test_committed_events_are_handed_over_oldest_first(open_store: OpenStore) -> None:
    store = await open_store()
    assert [] == store.take_fresh(0)  # a consumer: from now on events are held for it
    first = [action(key=f"k{i}") for i in range(3)]
    await store.submit(first)
    await store.submit([action(key="k3")])
    taken = store.take_fresh(10)
    assert [e.idem_key for e in first] + ["k3"] == [e.idem_key for e in taken]
    assert [0, 0, 0, 0] == [e.attempts for e in taken]
    assert [] == store.take_fresh(10)
    assert 0 == store.missed


async def test_an_event_a_lease_returned_is_not_handed_over_again(open_store: OpenStore) -> None:
    store = await open_store()
    store.take_fresh(0)
    await store.submit([action(key=f"k{i}") for i in range(5)])
    leased = await store.lease(2, frozenset())
    fresh = store.take_fresh(10)
    assert ["k0", "k1"] == [e.idem_key for e in leased]
    assert ["k2", "k3", "k4"] == [e.idem_key for e in fresh]
    assert {e.seq for e in leased}.isdisjoint({e.seq for e in fresh})


async def test_what_does_not_fit_is_counted_as_missed_and_stays_queued(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handoff, "MAX_EVENTS", 2)
    store: Store = await open_store()
    store.take_fresh(0)
    await store.submit([action(key=f"k{i}") for i in range(5)])
    assert ["k0", "k1"] == [e.idem_key for e in store.take_fresh(10)]
    assert 3 == store.missed
    assert 5 == store.counts().queued
    leased = await store.lease(10, frozenset())
    assert [f"k{i}" for i in range(5)] == [e.idem_key for e in leased]


async def test_nothing_is_held_until_a_consumer_asks(open_store: OpenStore) -> None:
    """With forwarding off nobody takes events: the handoff holds none of their bodies."""
    store = await open_store()
    await store.submit([action(key=f"k{i}") for i in range(3)])
    assert 3 == store.missed
    assert [] == store.take_fresh(10)
    await store.submit([action(key="k3")])
    assert ["k3"] == [e.idem_key for e in store.take_fresh(10)]


async def test_a_lease_that_skips_an_event_in_flight_leaves_the_later_ones_handed(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    store.take_fresh(0)
    await store.submit([action(key=f"k{i}") for i in range(4)])
    (first,) = store.take_fresh(1)  # k0 is in flight now
    leased = await store.lease(1, frozenset({first.seq}))
    assert ["k1"] == [e.idem_key for e in leased]
    assert ["k2", "k3"] == [e.idem_key for e in store.take_fresh(10)]
