"""The mirror of committed counts: what the store reports without reading the file."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from tests.conftest import wait_until
from valmi_sidecar.events import NewEvent
from valmi_sidecar.store import (
    Counts,
    DeadLetter,
    DeadLetterFilter,
    Delivered,
    IdempotencyConflictError,
    QueueFullError,
    ReadOnlyDatabase,
    Retry,
    Settlement,
    Store,
)

from .conftest import T0, Clock, OpenStore, action, outcome


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


def counted_in_the_file(store: Store) -> tuple[Counts, int]:
    """The counts as a fresh read of the file gives them, and the dead letters it holds."""
    with ReadOnlyDatabase(store.path) as db:
        return db.counts(), db.count_dead_letters(DeadLetterFilter())


async def random_step(store: Store, clock: Clock, rng: random.Random) -> None:
    """One of: submits (some with reused keys: duplicates and conflicts), settlements
    (delivered, retry, dead letter, some settled twice), re-queues, purges; several at
    once share a group commit."""

    def event() -> NewEvent:
        key = rng.choice([None, f"k{rng.randrange(40)}"])
        if rng.random() < 0.3:
            return outcome(clock, rng.choice([0.5, 2.0, 7.25]), key=key)
        return action(clock, key=key, kind=rng.choice(["llm_call", "tool_call"]))

    def settlement(seq: int) -> Settlement:
        roll = rng.random()
        if roll < 0.5:
            return Delivered(seq)
        if roll < 0.75:
            return Retry(seq, clock() + rng.choice([0.0, 5.0]), "HTTP 503")
        return DeadLetter(seq, rng.choice(["rejected", "expired"]), 400, "no", 10)

    async def submit() -> None:
        with contextlib.suppress(IdempotencyConflictError, QueueFullError):
            await store.submit([event() for _ in range(rng.randint(1, 4))])

    async def settle() -> None:
        leased = await store.lease(rng.randint(1, 8), frozenset())
        settlements = [settlement(e.seq) for e in leased]
        if leased and rng.random() < 0.2:  # settled again: counted once
            settlements.append(settlement(leased[0].seq))
        await store.settle(settlements)

    async def requeue() -> None:
        flt = DeadLetterFilter(reason=rng.choice([None, "rejected", "expired"]))
        with contextlib.suppress(QueueFullError):
            await store.requeue_dead_letters(flt, rng.randint(1, 5))

    async def purge() -> None:
        flt = DeadLetterFilter(reason=rng.choice([None, "rejected", "expired"]))
        await store.purge_dead_letters(flt, rng.randint(1, 3))

    steps = rng.choices([submit, settle, requeue, purge], weights=[5, 4, 1, 1], k=3)
    await asyncio.gather(*(step() for step in steps[: rng.randint(1, 3)]))
    clock.t += rng.choice([0.0, 0.5, 3.0])


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_mirror_equals_a_fresh_count_of_the_file_after_any_mix_of_writes(
    open_store: OpenStore, clock: Clock, seed: int
) -> None:
    store = await open_store(max_queue_events=60)
    rng = random.Random(seed)
    for _ in range(150):
        await random_step(store, clock, rng)
        in_file, dead_letters = counted_in_the_file(store)
        assert in_file == store.counts()
        assert dead_letters == store.disk().dead_letters
    c = store.counts()
    assert c.received == c.queued + c.delivered + c.dead_lettered
    assert c.delivered > 0
    assert c.dead_lettered > 0
    assert c.duplicates > 0
    assert store.stats.requeued > 0
    assert store.stats.purged > 0


async def test_rates_are_none_until_two_samples_a_second_apart_then_events_a_second(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    assert dict.fromkeys(("received", "delivered", "dead_lettered")) == store.rates()
    await store.submit([action(clock) for _ in range(10)])
    await wait_until(lambda: store.rates()["received"] is not None, 10, "a second sample")
    rates = store.rates()
    received = rates["received"]
    assert received is not None
    assert 0 < received <= 10.0  # 10 events over at least the second between samples
    assert (0.0, 0.0) == (rates["delivered"], rates["dead_lettered"])
