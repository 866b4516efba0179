"""The store's public face: open, close and reopen, submit and settle round trips, waiting
for events."""

from __future__ import annotations

import pytest

from valmi_sidecar.store import DeadLetter, Delivered, Retry, StoreError

from .conftest import Clock, OpenStore, action, outcome, rows


async def test_data_survives_close_and_reopen(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    event = outcome(clock, 12.5)
    await store.submit([event])
    await store.close()
    store = await open_store()
    (leased,) = await store.lease(10, frozenset())
    assert (event.id, event.body, "outcome") == (leased.id, leased.body, leased.kind)
    assert 1 == store.counts().queued == store.counts().received


async def test_submit_after_close_raises_store_error(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    await store.close()
    with pytest.raises(StoreError, match="closing"):
        await store.submit([action(clock)])


async def test_dead_letter_keeps_the_full_event(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    event = outcome(clock, 3.25)
    await store.submit([event])
    (leased,) = await store.lease(1, frozenset())
    await store.settle([Retry(leased.seq, clock(), "HTTP 502")])
    clock.t += 5
    await store.settle([DeadLetter(leased.seq, "rejected", 422, '{"error": "bad value"}')])
    (dead,) = await store.dead_letters()
    assert (leased.seq, event.id, event.idem_key, "outcome", event.body) == (
        dead.seq,
        dead.id,
        dead.idem_key,
        dead.kind,
        dead.body,
    )
    assert ("rejected", 422, '{"error": "bad value"}', 2) == (
        dead.reason,
        dead.status,
        dead.detail,
        dead.attempts,
    )
    assert (event.received_at, clock()) == (dead.received_at, dead.dead_at)
    assert [("agent-1", "resolved", 3.25)] == rows(
        store, "SELECT agent_key, event_type, value FROM dead_letters"
    )
    assert [] == await store.lease(1, frozenset())


async def test_new_events_listeners_are_told_of_commits_that_add_events(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    told: list[int] = []
    remove = store.on_new_events(lambda: told.append(store.counts().queued))
    await store.submit([action(clock)])
    assert told == [1]  # called after the commit, with the counts already applied
    leased = await store.lease(1, frozenset())
    await store.settle([Delivered(leased[0].seq)])
    assert told == [1]  # a commit that adds nothing tells nobody
    remove()
    remove()  # twice is harmless
    await store.submit([action(clock)])
    assert told == [1]
