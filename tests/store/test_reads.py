"""Reads on the store's reader: the lease (oldest due first) and ``next_due_at``."""

from __future__ import annotations

from valmi_sidecar.store import Retry

from .conftest import Clock, OpenStore, action


async def test_lease_is_oldest_first_and_skips_excluded(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    ids = [a.id for a in await store.submit([action(clock) for _ in range(5)])]
    leased = await store.lease(3, frozenset())
    assert ids[:3] == [e.id for e in leased]
    again = await store.lease(3, frozenset(e.seq for e in leased))
    assert ids[3:] == [e.id for e in again]


async def test_lease_respects_next_attempt_at(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    await store.submit([action(clock), action(clock)])
    first, second = await store.lease(2, frozenset())
    await store.settle([Retry(first.seq, clock() + 30, "HTTP 503")])
    assert [second.seq] == [e.seq for e in await store.lease(10, frozenset())]
    assert clock() + 30 == await store.next_due_at(frozenset({second.seq}))
    clock.t += 30
    (retried, _) = await store.lease(10, frozenset())
    assert (first.seq, 1) == (retried.seq, retried.attempts)


async def test_next_due_at_is_none_when_nothing_queued(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    assert await store.next_due_at(frozenset()) is None
    await store.submit([action(clock)])
    (e,) = await store.lease(1, frozenset())
    assert await store.next_due_at(frozenset({e.seq})) is None
    assert 0.0 == await store.next_due_at(frozenset())
