"""The flusher: backoff, rate budget and token bucket (pure), then the forwarding loop
against a real Store in tmp_path and a real FakeValmi on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from structlog.testing import capture_logs

from valmi_sidecar import settler
from valmi_sidecar.config import Secret
from valmi_sidecar.events import NewEvent, parse_one
from valmi_sidecar.fake_api import FakeValmi
from valmi_sidecar.flusher import Flusher, FlusherError
from valmi_sidecar.policy import TokenBucket, full_jitter, rate_budget
from valmi_sidecar.store import Delivered, QueuedEvent, Retry, Settlement, Store, handoff
from valmi_sidecar.store import core as store_core
from valmi_sidecar.upstream import Answer, Outgoing, Upstream

from .conftest import ACTION, DEFAULT_KEY, SidecarProcessFactory, fast_settings, wait_until

# --- backoff -------------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [0, 1, 2, 5, 10, 30])
def test_full_jitter_stays_within_its_bound(attempts: int) -> None:
    rng = random.Random(7)
    bound = min(300.0, 0.5 * 2**attempts)
    samples = [full_jitter(attempts, 0.5, 300.0, rng) for _ in range(2000)]
    assert all(0.0 <= s <= bound for s in samples)
    assert max(samples) > 0.9 * bound  # full jitter: the whole range is used
    assert min(samples) < 0.1 * bound


def test_full_jitter_with_huge_attempts_is_capped() -> None:
    """No overflow for an event retried for weeks."""
    assert 0.0 <= full_jitter(10**9, 0.5, 300.0, random.Random(1)) <= 300.0


# --- rate budget and token bucket --------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 5, 60, 120, 180, 1000, 10_000, 100_000])
def test_rate_budget_fits_any_60s_window(limit: int) -> None:
    """burst + 60 s of tokens never exceeds the limit, so a fixed window sees no 429."""
    rate_per_s, burst = rate_budget(limit)
    assert 1 <= burst
    assert int(burst + rate_per_s * 60) <= limit


@pytest.mark.parametrize("limit", [1000, 10_000, 100_000])
def test_rate_budget_uses_most_of_a_large_limit(limit: int) -> None:
    rate_per_s, burst = rate_budget(limit)
    assert 0.97 * limit <= burst + rate_per_s * 60


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_starts_full_then_paces() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert [True, True, True, False] == [bucket.take() for _ in range(4)]
    assert 0.5 == pytest.approx(bucket.delay())
    clock.now += 0.5
    assert 0.0 == bucket.delay()
    assert bucket.take()
    assert not bucket.take()


def test_token_bucket_does_not_save_up_beyond_its_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 2, clock=clock)
    clock.now += 3600
    assert [True, True, False] == [bucket.take() for _ in range(3)]


def test_token_bucket_never_exceeds_the_limit_in_any_sliding_minute() -> None:
    """Greedy sending for 3 simulated minutes at 120/min: every 60-s window holds <= 120."""
    clock = FakeClock()
    rate_per_s, burst = rate_budget(120)
    bucket = TokenBucket(rate_per_s, burst, clock=clock)
    sent: list[float] = []
    start = clock.now
    while clock.now < start + 180:
        if bucket.take():
            sent.append(clock.now)
        else:
            clock.now += bucket.delay()
    j = 0
    for i, t in enumerate(sent):
        while j < len(sent) and sent[j] < t + 60:
            j += 1
        assert j - i <= 120
    assert len(sent) >= 0.97 * 120 * 3


# --- integration fixtures ------------------------------------------------------------


def action(i: int, *, received_at: float | None = None) -> NewEvent:
    body = {"agent_key": "agent_1", "action_type": "llm_call", "metadata": {"i": i}}
    return parse_one("action", json.dumps(body).encode(), now=received_at)


def outcome(i: int) -> NewEvent:
    body = {"agent_key": "agent_1", "outcome_type": "hire", "value": i, "metadata": {"i": i}}
    return parse_one("outcome", json.dumps(body).encode())


def order(fake: FakeValmi) -> list[int]:
    return [r.body["metadata"]["i"] for r in fake.events()]


#: Slack for the arrivals' jitter in ``assert_within_rate_budget``. On a busy machine the
#: first requests of a burst wait for their connections and for the loop, and those after
#: them catch up, so they reach the fake API closer together than they were sent (at 100
#: a second, with two other processes spinning on the 2 cores, 28 arrived within 59 ms:
#: 0.14 of a request over a 20 ms slack). A sender that does not pace is still caught:
#: the burst plus a tenth of a second's tokens is far below a backlog sent at once.
ARRIVAL_SLACK_S = 0.1


def assert_within_rate_budget(fake: FakeValmi, limit_per_min: int) -> None:
    """No 429, and requests i..j inclusive fit the burst plus the tokens earned between
    them (with ``ARRIVAL_SLACK_S`` for their arrival's jitter)."""
    assert 0 == fake.status_counts.get(429, 0)
    _, burst = rate_budget(limit_per_min)
    times = fake.arrival_times
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            assert j - i + 1 <= burst + (times[j] - times[i] + ARRIVAL_SLACK_S) * limit_per_min / 60


class RecordingUpstream(Upstream):
    """The real client, noting every attempt: (monotonic time, seq, idempotency key, answer)."""

    def __init__(self, api_url: str, **kwargs: Any) -> None:
        super().__init__(api_url, Secret(DEFAULT_KEY), **kwargs)
        self.attempts: list[tuple[float, int, str, Answer]] = []
        self.active = 0
        self.max_active = 0  # the most requests outstanding at once (tests may reset it)

    async def send(self, event: Outgoing) -> Answer:
        assert isinstance(event, QueuedEvent)  # what the flusher sends
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            answer = await super().send(event)
        finally:
            self.active -= 1
        self.attempts.append((time.monotonic(), event.seq, event.idem_key, answer))
        return answer


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "data", durability="normal")
    try:
        yield s
    finally:
        await s.close()


FakeFactory = Callable[..., Awaitable[FakeValmi]]


@pytest.fixture
async def fake_factory() -> AsyncIterator[FakeFactory]:
    """Fake Valmi APIs with options (rate limit, 409 on duplicates), stopped at the end."""
    started: list[FakeValmi] = []

    async def start(**kwargs: Any) -> FakeValmi:
        api = FakeValmi(seed=1, **kwargs)
        await api.start()
        started.append(api)
        return api

    try:
        yield start
    finally:
        for api in started:
            await api.stop()


StartFlusher = Callable[..., Awaitable[tuple[Flusher, "asyncio.Task[None]"]]]


@pytest.fixture
async def start_flusher(store: Store, tmp_path: Path) -> AsyncIterator[StartFlusher]:
    """Run real flushers on the test's store; each is drained and its client closed at the end.

    ``start(fake_or_none, **settings_overrides)``; pass ``upstream=`` to use a given client
    and ``rng=`` to fix the jitter.
    """
    running: list[tuple[Flusher, asyncio.Task[None], Upstream | None]] = []

    async def start(
        fake: FakeValmi | None,
        *,
        upstream: Upstream | None = None,
        rng: random.Random | None = None,
        **overrides: Any,
    ) -> tuple[Flusher, asyncio.Task[None]]:
        settings = fast_settings(tmp_path / "data", fake.url if fake else None, **overrides)
        if upstream is None and fake is not None:
            upstream = RecordingUpstream(
                fake.url,
                timeout_s=settings.upstream_timeout_s,
                max_connections=settings.upstream_concurrency,
            )
        flusher = Flusher(store, upstream, settings, rng=rng)
        task = asyncio.create_task(flusher.run())
        running.append((flusher, task, upstream))
        return flusher, task

    try:
        yield start
    finally:
        for flusher, task, upstream in running:
            if not task.done():
                await flusher.drain(0.2)
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, FlusherError):
                await task
            if upstream is not None:
                await upstream.aclose()


async def stop(flusher: Flusher, task: asyncio.Task[None], timeout_s: float = 2.0) -> None:
    await flusher.drain(timeout_s)
    await asyncio.wait_for(task, 1.0)


# --- delivery ------------------------------------------------------------------------


async def test_events_are_delivered_once_each_oldest_first(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    await store.submit([action(i) for i in range(20)])
    flusher, task = await start_flusher(fake, upstream_concurrency=1)
    await wait_until(lambda: 20 == store.counts().delivered, 10, "20 delivered")
    assert list(range(20)) == order(fake)
    assert [1] * 20 == [r.attempts for r in fake.events()]
    assert 0 == store.counts().queued
    await stop(flusher, task)


async def test_concurrent_forwarding_delivers_every_event_once(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    events = [action(i) for i in range(150)] + [outcome(i) for i in range(150, 200)]
    await store.submit(events)
    await start_flusher(fake, upstream_concurrency=16)
    await wait_until(lambda: 200 == store.counts().delivered, 10, "200 delivered")
    assert {e.idem_key for e in events} == set(fake.received)
    assert 200 == fake.requests
    assert 50 == len(fake.events("outcome"))


async def test_an_idle_flusher_forwards_a_new_event_promptly(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    """Sent at once; recorded once its delivery has ridden (``settler.RIDE_S``), alone
    when no other event comes."""
    flusher, _ = await start_flusher(fake)
    await store.submit([action(0)])
    await wait_until(lambda: 1 == fake.requests, 1.0, "prompt delivery")
    assert "ok" == flusher.state
    await wait_until(lambda: 1 == store.counts().delivered, settler.RIDE_S + 2, "recorded")
    await store.submit([action(1)])
    await wait_until(lambda: 2 == fake.requests, 1.0, "prompt delivery again")
    await wait_until(lambda: 2 == store.counts().delivered, settler.RIDE_S + 2, "recorded")


async def test_one_event_at_a_time_costs_few_queue_reads(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At low rates each event arrives alone: once a lease came back short, the flusher
    knows the database holds nothing else due (until a retry, a release or an event the
    store could not hand over), and takes what is committed from the store in memory
    instead of reading it back (each read a trip to the reader's thread)."""
    reads: list[str] = []
    for name in ("lease", "next_due_at"):
        real = getattr(store, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            reads.append(_name)
            return await _real(*args)

        monkeypatch.setattr(store, name, counted)
    await start_flusher(fake)
    await wait_until(lambda: len(reads) >= 2, 1.0, "the first lease and due read")
    for i in range(20):
        await store.submit([action(i)])

        def delivered(n: int = i + 1) -> bool:
            return n == store.counts().delivered

        await wait_until(delivered, 2.0, f"event {i} delivered")
    assert list(range(20)) == order(fake)
    assert len(reads) <= 4, reads


async def test_events_committed_while_the_flusher_idles_keep_the_rate_limit(
    store: Store, fake_factory: FakeFactory, start_flusher: StartFlusher
) -> None:
    """An idle flusher hands events to its senders from the commit itself; one by one,
    faster than the budget allows, they still go no faster than it, oldest first."""
    limit = 180
    fake = await fake_factory(rate_limit_per_min=limit)
    await start_flusher(fake, rate_limit_per_min=limit, upstream_concurrency=16)
    for i in range(12):
        await store.submit([action(i)])
    await wait_until(lambda: 12 == store.counts().delivered, 10, "12 delivered")
    assert list(range(12)) == order(fake)
    assert_within_rate_budget(fake, limit)


async def test_a_commit_of_more_events_than_one_take_is_sent_whole_once_each(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    """Events committed together while the flusher idles, more than it takes at once
    (``flush_batch_size``): every one is sent, once, in order."""
    await start_flusher(fake, flush_batch_size=4)
    await store.submit([action(0)])
    await wait_until(lambda: 1 == store.counts().delivered, 2.0, "the first event")
    await store.submit([action(i) for i in range(1, 11)])
    await wait_until(lambda: 11 == store.counts().delivered, 5.0, "all 11 delivered")
    assert list(range(11)) == order(fake)
    assert 0 == store.counts().queued


async def test_events_the_store_could_not_hand_over_are_read_and_each_sent_once(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-memory handoff holds a few events here: the rest of a large commit, and the
    dead letters re-queued by an operator, reach the flusher by a read of the queue."""
    monkeypatch.setattr(handoff, "MAX_EVENTS", 3)
    await start_flusher(fake, upstream_concurrency=4)
    await store.submit([action(0)])
    await wait_until(lambda: 1 == store.counts().delivered, 2.0, "the first delivered")
    events = [action(i) for i in range(1, 41)]
    await store.submit(events)
    await wait_until(lambda: 41 == store.counts().delivered, 10, "41 delivered")
    assert 41 == fake.requests
    assert {e.idem_key for e in events} <= set(fake.received)
    assert 3 <= store.missed


async def test_a_lone_delivery_is_recorded_in_the_next_received_events_transaction(
    store: Store,
    fake: FakeValmi,
    start_flusher: StartFlusher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One event at a time (a quiet agent): each delivery waits for the next event's
    transaction instead of making one of its own, and is recorded by it."""
    monkeypatch.setattr(settler, "RIDE_S", 30.0)  # it waits for the next event
    monkeypatch.setattr(store_core, "RIDERS_GATHER_S", 0.0)  # and boards it (store tests)
    flusher, _ = await start_flusher(fake)
    await store.submit([action(0)])

    def answered(n: int) -> bool:
        return n == fake.requests and 0 == flusher.in_flight

    await wait_until(lambda: answered(1), 5, "the first sent and answered")
    assert 0 == store.counts().delivered  # not recorded alone
    commits = store.commits
    await store.submit([action(1)])
    assert commits + 1 == store.commits  # one transaction for the event and the delivery
    assert (1, 1) == (store.counts().delivered, store.counts().queued)
    await wait_until(lambda: answered(2), 5, "the second sent and answered")
    await store.submit([action(2)])
    assert (2, 1) == (store.counts().delivered, store.counts().queued)


async def test_deliveries_answered_together_all_ride_on_the_next_transaction(
    store: Store,
    fake: FakeValmi,
    start_flusher: StartFlusher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A few deliveries answered before the next event (a burst, then quiet) each ride
    from the sender, and the next event's transaction records them all."""
    monkeypatch.setattr(settler, "RIDE_S", 30.0)  # they wait for the next event
    monkeypatch.setattr(store_core, "RIDERS_GATHER_S", 0.0)  # and board it (store tests)
    n = settler.RIDE_BELOW - 1
    flusher, _ = await start_flusher(fake, upstream_concurrency=n)
    await store.submit([action(i) for i in range(n)])
    await wait_until(
        lambda: n == fake.requests and 0 == flusher.in_flight, 5, "all sent and answered"
    )
    assert 0 == store.counts().delivered  # none recorded alone
    commits = store.commits
    await store.submit([action(n)])
    assert commits + 1 == store.commits  # one transaction for the event and the deliveries
    assert (n, 1) == (store.counts().delivered, store.counts().queued)


async def test_deliveries_at_a_few_events_a_second_are_recorded_several_at_a_time(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    """A quiet agent, 10 events a second: each event has its transaction, and the
    deliveries ride on them together, about five in every fifth (``RIDERS_GATHER_S``),
    not one in each: the key, event and ledger writes of a settlement once for several."""
    await start_flusher(fake)
    n = 20
    recorded: list[int] = []
    for i in range(n):
        before = store.counts().delivered
        await store.submit([action(i)])
        recorded.append(store.counts().delivered - before)
        await asyncio.sleep(0.1)  # the agent's pace
    await wait_until(lambda: n == store.counts().delivered, settler.RIDE_S + 5, "all recorded")
    assert n == fake.requests
    carrying = [k for k in recorded if k]
    assert len(carrying) <= n // 3, recorded  # one in every transaction before
    assert max(carrying) >= 3, recorded


async def test_a_settle_batch_stops_lingering_once_enough_outcomes_wait(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outcomes that do not ride linger for company (``SETTLE_LINGER_S``), but only until
    ``LINGER_FULL`` wait: the batch joins the commit of the events being received, and a
    larger one would make that commit, and every answer waiting on it, take longer."""
    monkeypatch.setattr(settler, "SETTLE_LINGER_S", 30.0)
    monkeypatch.setattr(settler, "RIDE_S", 30.0)  # events count as being received for 30 s
    # None ride, as when more are answered than ride (forwarding 1,000 events a second).
    monkeypatch.setattr(settler, "RIDE_BELOW", 0)
    n = settler.LINGER_FULL
    await store.submit([action(i) for i in range(n)])
    leased = await store.lease(n, frozenset())
    assert n == len(leased)
    recorded: list[list[Settlement]] = []
    settling = settler.Settler(store, 256, recorded.append)
    task = asyncio.create_task(settling.run())
    try:
        for e in leased[:-1]:  # one short
            settling.add(Delivered(e.seq))
        for _ in range(50):  # the settler's task runs, and lingers
            await asyncio.sleep(0)
        assert settling.waiting
        assert (0, n) == (store.counts().delivered, store.counts().queued)
        settling.add(Delivered(leased[-1].seq))
        await wait_until(lambda: n == store.counts().delivered, 5, "the batch recorded")
        assert 0 == store.counts().queued
        assert [n] == [len(batch) for batch in recorded]  # one batch, all of them
    finally:
        settling.close()
        await asyncio.wait_for(task, 10)


async def test_with_nothing_received_a_settle_batch_lingers_past_the_bound(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog's drain, nothing received: no request waits for the commit the batch
    joins, so it gathers for its whole linger (a batch at most), as before the bound;
    the flusher's hurry still ends the wait at once."""
    monkeypatch.setattr(settler, "SETTLE_LINGER_S", 30.0)
    monkeypatch.setattr(settler, "RIDE_S", 0.0)  # nothing counts as being received
    monkeypatch.setattr(settler, "RIDE_BELOW", 0)
    n = settler.LINGER_FULL + 1
    await store.submit([action(i) for i in range(n)])
    leased = await store.lease(n, frozenset())
    recorded: list[list[Settlement]] = []
    settling = settler.Settler(store, 256, recorded.append)
    task = asyncio.create_task(settling.run())
    try:
        for e in leased:
            settling.add(Delivered(e.seq))
        for _ in range(50):  # the settler's task runs, and lingers
            await asyncio.sleep(0)
        assert settling.waiting
        assert 0 == store.counts().delivered
        settling.hurry()
        await wait_until(lambda: n == store.counts().delivered, 5, "the batch recorded")
        assert [n] == [len(batch) for batch in recorded]
    finally:
        settling.close()
        await asyncio.wait_for(task, 10)


async def test_a_drain_records_riding_deliveries_without_waiting_for_their_ride(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopping sidecar takes no more events for a delivery to ride on: the drain
    records it at once and ends with the queue empty."""
    monkeypatch.setattr(settler, "RIDE_S", 30.0)
    flusher, task = await start_flusher(fake)
    await store.submit([action(0)])
    await wait_until(lambda: 1 == fake.requests and 0 == flusher.in_flight, 5, "sent, answered")
    assert (0, 1) == (store.counts().delivered, store.counts().queued)  # riding
    started = time.monotonic()
    await flusher.drain(10.0)
    assert time.monotonic() - started < 5.0
    assert task.done()
    assert (1, 0) == (store.counts().delivered, store.counts().queued)


async def test_a_backlog_drained_while_nothing_is_received_is_recorded_without_a_ride(
    tmp_path: Path, fake: FakeValmi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deliveries wait for company only while events are being received. A backlog
    forwarded after a restart, with nothing coming in, has its deliveries recorded at
    once and the queue reads empty, not a ride later; the next event received rides."""
    monkeypatch.setattr(settler, "RIDE_S", 30.0)
    path = tmp_path / "backlog"
    before = await Store.open(path, durability="normal")
    try:
        await before.submit([action(i) for i in range(3)])
    finally:
        await before.close()
    store = await Store.open(path, durability="normal")
    upstream = Upstream(fake.url, Secret(DEFAULT_KEY), timeout_s=2.0, max_connections=4)
    flusher = Flusher(store, upstream, fast_settings(path, fake.url))
    task = asyncio.create_task(flusher.run())
    try:
        await wait_until(lambda: 3 == store.counts().delivered, 5, "the backlog recorded")
        assert 0 == store.counts().queued
        await store.submit([action(3)])
        await wait_until(lambda: 4 == fake.requests and 0 == flusher.in_flight, 5, "answered")
        assert (3, 1) == (store.counts().delivered, store.counts().queued)  # riding
    finally:
        await stop(flusher, task)
        await upstream.aclose()
        await store.close()
    assert [0, 1, 2, 3] == order(fake)


async def test_outage_then_recovery_delivers_each_key_exactly_once(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    await fake.go_down()
    events = [action(i) for i in range(30)]
    await store.submit(events)
    flusher, _ = await start_flusher(fake)
    await wait_until(lambda: "backing_off" == flusher.state, 5, "backing_off")
    assert flusher.last_error is not None
    assert "ConnectorError" in flusher.last_error
    await fake.go_up()
    await wait_until(lambda: 30 == store.counts().delivered, 10, "30 delivered after outage")
    assert "ok" == flusher.state
    assert {e.idem_key for e in events} == set(fake.received)
    assert 0 == fake.duplicates


async def test_outcomes_the_store_cannot_write_are_kept_and_written_later(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    """A failing disk must not stop the flusher, lose the outcomes or re-send events."""
    await store.submit([action(i) for i in range(10)])
    await store.writer_connection.fetchall(
        "PRAGMA query_only = ON"
    )  # every write fails from now on
    with capture_logs() as logs:
        flusher, task = await start_flusher(fake)
        await wait_until(lambda: 10 == fake.requests, 10, "all 10 sent")
        await wait_until(
            lambda: any(e["event"] == "settle_failed" for e in logs), 10, "a failed settle"
        )
        assert not task.done()
        assert 0 == store.counts().delivered
        await store.writer_connection.fetchall("PRAGMA query_only = OFF")  # the disk is back
        await wait_until(lambda: 10 == store.counts().delivered, 10, "10 settled once writable")
    assert 10 == fake.requests  # none was sent twice meanwhile
    assert (0, "ok") == (store.counts().queued, flusher.state)


async def test_5xx_share_is_retried_with_the_same_key_until_delivered(
    store: Store, fake_factory: FakeFactory, start_flusher: StartFlusher, tmp_path: Path
) -> None:
    fake = await fake_factory()
    fake.set_faults(error_rate=0.5, error_status=503)
    upstream = RecordingUpstream(fake.url, timeout_s=2.0, max_connections=4)
    await store.submit([action(i) for i in range(30)])
    await start_flusher(fake, upstream=upstream, upstream_concurrency=4)
    await wait_until(lambda: 30 == store.counts().delivered, 15, "30 delivered through 503s")
    keys: dict[int, set[str]] = defaultdict(set)
    tries: dict[int, int] = defaultdict(int)
    for _, seq, key, _answer in upstream.attempts:
        keys[seq].add(key)
        tries[seq] += 1
    assert all(1 == len(k) for k in keys.values())
    assert max(tries.values()) > 1
    assert fake.status_counts.get(503, 0) > 0
    assert 30 == len(fake.received)
    assert 0 == store.counts().dead_lettered


class UpperBoundRandom(random.Random):
    """Jitter that always picks the top of its range, so backoff is deterministic."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_retries_back_off_exponentially_and_never_give_up(
    store: Store, fake_factory: FakeFactory, start_flusher: StartFlusher
) -> None:
    fake = await fake_factory()
    fake.set_faults(error_rate=1.0, error_status=503)
    upstream = RecordingUpstream(fake.url, timeout_s=2.0, max_connections=1)
    await store.submit([action(0)])
    flusher, task = await start_flusher(
        fake, upstream=upstream, rng=UpperBoundRandom(), upstream_concurrency=1
    )
    await wait_until(lambda: len(upstream.attempts) >= 7, 10, "seven attempts")
    times = [t for t, *_ in upstream.attempts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    expected = [min(0.2, 0.01 * 2**k) for k in range(len(gaps))]  # base 0.01 s, cap 0.2 s
    assert all(g >= e * 0.95 for g, e in zip(gaps, expected, strict=True)), (gaps, expected)
    assert all(g < e + 0.5 for g, e in zip(gaps, expected, strict=True)), (gaps, expected)
    assert 0 == store.counts().dead_lettered  # never dropped for too many attempts
    fake.set_faults(error_rate=0.0)
    await wait_until(lambda: 1 == store.counts().delivered, 5, "delivered")
    assert "ok" == flusher.state
    await stop(flusher, task)


async def test_429_retry_after_is_honoured(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    fake.set_faults(rate_limited=True, retry_after_s=0.5)
    await store.submit([action(i) for i in range(3)])
    flusher, _ = await start_flusher(fake, upstream_concurrency=1)
    await wait_until(lambda: "rate_limited" == flusher.state, 5, "rate_limited")
    fake.set_faults(rate_limited=False)
    await wait_until(lambda: 3 == store.counts().delivered, 5, "3 delivered")
    assert 1 == fake.status_counts[429]
    first_429, next_request = fake.arrival_times[0], fake.arrival_times[1]
    assert next_request - first_429 >= 0.5
    assert list(range(3)) == order(fake)  # the refused event kept its place


async def test_400_dead_letters_that_event_and_the_others_are_delivered(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    good = [action(i) for i in range(5)]
    refused = NewEvent(**{**vars_of(action(99)), "body": b'{"agent_key":"agent_1"}'})
    await store.submit([*good[:2], refused, *good[2:]])
    await start_flusher(fake)
    await wait_until(lambda: 5 == store.counts().delivered, 5, "5 delivered")
    await wait_until(lambda: 1 == store.counts().dead_lettered, 5, "1 dead letter")
    [record] = await store.dead_letters()
    assert (refused.idem_key, "rejected", 400) == (record.idem_key, record.reason, record.status)
    assert "action_type" in record.detail
    assert 0 == store.counts().queued


def vars_of(event: NewEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in NewEvent.__slots__}


def poison(i: int) -> NewEvent:
    """An action the fake API refuses with 400 (no action_type)."""
    return NewEvent(**{**vars_of(action(i)), "body": b'{"agent_key":"agent_1"}'})


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_the_same_refusal_for_every_event_pauses_and_dead_letters_nothing(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher, status: int
) -> None:
    """A gateway or proxy that refuses everything (plain HTTP to an HTTPS port, a body
    limit) is a configuration problem: paused, the queue kept, probes one at a time that
    dead-letter nothing, and a delivered probe resumes forwarding."""
    fake.set_faults(error_rate=1.0, error_status=status)
    upstream = RecordingUpstream(fake.url, timeout_s=2.0, max_connections=8)
    events = [action(i) for i in range(30)]
    await store.submit(events)
    with capture_logs() as logs:
        flusher, _ = await start_flusher(fake, upstream=upstream, upstream_concurrency=8)
        await wait_until(lambda: "paused" == flusher.state, 5, "paused")
        await wait_until(lambda: 0 == upstream.active, 5, "requests sent before the pause")
        upstream.max_active = 0
        before = len(upstream.attempts)
        await wait_until(lambda: len(upstream.attempts) >= before + 5, 5, "five probes")
        counts = store.counts()
        assert (30, 0, 0) == (counts.queued, counts.delivered, counts.dead_lettered)
        assert "paused" == flusher.state
        assert 1 == upstream.max_active
        probed = [seq for _, seq, _, _ in upstream.attempts[before : before + 5]]
        assert 5 == len(set(probed))  # each probe tries another event
        assert flusher.last_error is not None
        assert f"HTTP {status} for " in flusher.last_error
        assert "configuration" in flusher.last_error
        fake.set_faults(error_rate=0.0)
        await wait_until(lambda: 30 == store.counts().delivered, 5, "30 delivered after resume")
    assert (0, "ok") == (store.counts().dead_lettered, flusher.state)
    assert {e.idem_key for e in events} == set(fake.received)
    paused = [e for e in logs if e["event"] == "upstream_paused"]
    assert 1 == len(paused)
    assert status == paused[0]["status"]
    assert 1 == sum(e["event"] == "upstream_resumed" for e in logs)
    assert not any(e["event"] == "event_dead_lettered" for e in logs)


async def test_a_poison_event_between_good_ones_is_dead_lettered_without_a_pause(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    """One at a time, so the order is fixed: the refusal is judged by the next delivery."""
    bad = poison(99)
    await store.submit([action(0), bad, *[action(i) for i in range(1, 5)]])
    with capture_logs() as logs:
        flusher, _ = await start_flusher(fake, upstream_concurrency=1)
        await wait_until(lambda: 1 == store.counts().dead_lettered, 5, "1 dead letter")
        await wait_until(lambda: 5 == store.counts().delivered, 5, "5 delivered")
    [record] = await store.dead_letters()
    assert (bad.idem_key, "rejected", 400) == (record.idem_key, record.reason, record.status)
    assert "ok" == flusher.state
    assert not any(e["event"] == "upstream_paused" for e in logs)
    assert 6 == fake.requests  # the poison event was sent once


async def test_fewer_refusals_in_a_row_than_the_setting_are_dead_lettered_without_a_pause(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    bad = [poison(100 + i) for i in range(4)]
    await store.submit([action(0), *bad, action(1)])
    with capture_logs() as logs:
        flusher, _ = await start_flusher(fake, upstream_concurrency=1, pause_after_refusals=5)
        await wait_until(lambda: 4 == store.counts().dead_lettered, 5, "4 dead letters")
        await wait_until(lambda: 2 == store.counts().delivered, 5, "2 delivered")
    assert {e.idem_key for e in bad} == {r.idem_key for r in await store.dead_letters()}
    assert "ok" == flusher.state
    assert not any(e["event"] == "upstream_paused" for e in logs)
    assert 6 == fake.requests


async def test_a_refusal_answered_after_another_event_was_delivered_is_dead_lettered_at_once(
    store: Store, fake_factory: FakeFactory, start_flusher: StartFlusher
) -> None:
    """The poison event is the last: a delivery answered while it was in flight judges it."""
    fake = await fake_factory()
    fake.set_faults(latency_s=0.05)
    bad = poison(99)
    await store.submit([*[action(i) for i in range(5)], bad])
    flusher, _ = await start_flusher(fake, upstream_concurrency=8)
    await wait_until(lambda: 1 == store.counts().dead_lettered, 5, "1 dead letter")
    await wait_until(lambda: 5 == store.counts().delivered, 5, "5 delivered")
    assert (0, "ok") == (store.counts().queued, flusher.state)


async def test_a_refusal_no_delivery_can_judge_yet_is_kept_queued_and_drain_ends(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    """The last event of a burst, refused after every other was delivered: held (not dead-
    lettered, not sent again) until a delivery says upstream works; a drain does not wait."""
    bad = poison(99)
    await store.submit([action(0), bad])
    flusher, task = await start_flusher(fake, upstream_concurrency=1)
    await wait_until(lambda: 2 == fake.requests, 5, "both sent")
    await wait_until(lambda: 1 == store.counts().delivered, 5, "1 delivered")
    assert flusher.last_error is not None
    assert "held, kept queued" in flusher.last_error
    started = time.monotonic()
    await flusher.drain(10.0)
    assert time.monotonic() - started < 1.0
    assert task.done()
    counts = store.counts()
    assert (1, 1, 0) == (counts.queued, counts.delivered, counts.dead_lettered)
    assert 2 == fake.requests


async def test_a_held_refusal_is_dead_lettered_by_the_next_delivery(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    bad = poison(99)
    await store.submit([action(0), bad])
    await start_flusher(fake, upstream_concurrency=1)
    await wait_until(lambda: 2 == fake.requests, 5, "both sent")
    assert 0 == store.counts().dead_lettered
    await store.submit([action(1)])
    await wait_until(lambda: 1 == store.counts().dead_lettered, 5, "judged by a delivery")
    await wait_until(lambda: 2 == store.counts().delivered, 5, "2 delivered")
    assert 3 == fake.requests


async def test_401_pauses_keeps_every_event_and_resumes(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    fake.set_faults(unauthorized=True)
    await store.submit([action(i) for i in range(10)])
    with capture_logs() as logs:
        flusher, _ = await start_flusher(fake)
        await wait_until(lambda: "paused" == flusher.state, 5, "paused")
        await wait_until(lambda: fake.status_counts.get(401, 0) >= 3, 5, "a few probes")
        counts = store.counts()
        assert (10, 0, 0) == (counts.queued, counts.delivered, counts.dead_lettered)
        assert flusher.last_error is not None
        assert "401" in flusher.last_error
        fake.set_faults(unauthorized=False)
        await wait_until(lambda: 10 == store.counts().delivered, 5, "10 delivered after resume")
    assert "ok" == flusher.state
    paused = [e for e in logs if e["event"] == "upstream_paused"]
    assert 1 == len(paused)
    assert ("error", 401) == (paused[0]["log_level"], paused[0]["status"])
    assert 1 == sum(e["event"] == "upstream_resumed" for e in logs)
    assert DEFAULT_KEY not in repr(logs)
    assert list(range(10)) == sorted(order(fake))


async def test_a_host_the_client_refuses_pauses_and_dead_letters_nothing(
    store: Store, start_flusher: StartFlusher
) -> None:
    """The HTTP client raises ValueError for an empty label: a configuration problem."""
    upstream = Upstream(
        "https://api..valmi.test", Secret(DEFAULT_KEY), timeout_s=1.0, max_connections=4
    )
    await store.submit([action(i) for i in range(10)])
    flusher, _ = await start_flusher(None, upstream=upstream)
    await wait_until(lambda: "paused" == flusher.state, 5, "paused")
    await wait_until(lambda: upstream.stats.requests["error"] >= 3, 5, "a few probes")
    counts = store.counts()
    assert (10, 0, 0) == (counts.queued, counts.delivered, counts.dead_lettered)
    assert flusher.last_error is not None
    assert "check api_url" in flusher.last_error


async def test_paused_flusher_probes_one_request_at_a_time(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    fake.set_faults(unauthorized=True, latency_s=0.02)
    upstream = RecordingUpstream(fake.url, timeout_s=2.0, max_connections=8)
    await store.submit([action(i) for i in range(20)])
    flusher, _ = await start_flusher(fake, upstream=upstream, upstream_concurrency=8)
    await wait_until(lambda: "paused" == flusher.state, 5, "paused")
    await wait_until(lambda: 0 == upstream.active, 5, "requests sent before the pause answered")
    upstream.max_active = 0
    before = len(upstream.attempts)
    await wait_until(lambda: len(upstream.attempts) >= before + 3, 5, "three probes")
    assert 1 == upstream.max_active
    assert 20 == store.counts().queued


async def test_409_on_a_stored_key_counts_as_delivered(
    store: Store, fake_factory: FakeFactory, start_flusher: StartFlusher
) -> None:
    """Upstream stored the event but the answer was lost; the retry's 409 settles it."""
    fake = await fake_factory(conflict_on_duplicate=True)
    fake.set_faults(reset_after_store=True)
    await store.submit([action(i) for i in range(5)])
    await start_flusher(fake)
    await wait_until(lambda: 5 == len(fake.received), 5, "5 stored upstream, answers lost")
    fake.set_faults(reset_after_store=False)
    await wait_until(lambda: 5 == store.counts().delivered, 5, "5 delivered")
    assert 5 == fake.status_counts[409]
    assert 0 == store.counts().dead_lettered


# --- rate limits ---------------------------------------------------------------------


async def test_rate_limit_paces_requests_and_sees_no_429(
    store: Store, fake_factory: FakeFactory, start_flusher: StartFlusher
) -> None:
    """At 180/min, 12 events take ~3.7 s: never faster than the budget, never a 429."""
    limit = 180
    fake = await fake_factory(rate_limit_per_min=limit)
    await store.submit([action(i) for i in range(12)])
    await start_flusher(fake, rate_limit_per_min=limit, upstream_concurrency=16)
    await wait_until(lambda: 12 == store.counts().delivered, 10, "12 delivered")
    assert_within_rate_budget(fake, limit)


def test_a_backlog_paced_by_the_rate_limit_asks_for_each_token_a_few_times_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On uvloop, the sidecar's event loop (run here, not the tests' loop): its timers
    count whole milliseconds, so a wait under half of one fires at once and a longer one
    up to a millisecond early. Waiting for a token a fraction of a millisecond away must
    not spin the lease loop until the token is due (it asked about 8 times an event, each
    time a pass of the loop and a timer: a quarter of the CPU of forwarding a backlog at
    Valmi's rate limit). The pace itself stays within the budget."""
    asked = 0
    real_delay = TokenBucket.delay

    def counted(bucket: TokenBucket) -> float:
        nonlocal asked
        asked += 1
        return real_delay(bucket)

    monkeypatch.setattr(TokenBucket, "delay", counted)
    limit, n = 6_000, 120  # a burst of 20, then about 99 a second
    fake = FakeValmi(seed=1, rate_limit_per_min=limit)

    async def forward_backlog() -> None:
        await fake.start()
        store = await Store.open(tmp_path / "data", durability="normal")
        settings = fast_settings(
            tmp_path / "data", fake.url, rate_limit_per_min=limit, upstream_concurrency=16
        )
        upstream = Upstream(fake.url, Secret(DEFAULT_KEY), timeout_s=2.0, max_connections=16)
        flusher = Flusher(store, upstream, settings)
        try:
            await store.submit([action(i) for i in range(n)])
            task = asyncio.create_task(flusher.run())
            await wait_until(lambda: n == store.counts().delivered, 10, f"{n} delivered")
            await stop(flusher, task)
        finally:
            await upstream.aclose()
            await store.close()
            await fake.stop()

    uvloop.run(forward_backlog())
    assert n == len(fake.received)
    assert_within_rate_budget(fake, limit)
    assert asked <= 4 * n, f"{asked / n:.1f} token waits asked per event"


async def test_the_default_rate_limit_is_the_budget_of_the_api_key_kind(
    sidecar_process: SidecarProcessFactory, fake_factory: FakeFactory, client: httpx.AsyncClient
) -> None:
    """``valmi-sidecar run`` with an ``sk_api_`` key and no rate limit set is paced at
    1,000 requests a minute, Valmi's budget for API keys, not at the 10,000 of SDK keys
    (which made such a user live on 429s); ``/v1/status`` shows the budget and its source."""
    key = "sk_api_budget_test"
    limit = 1000
    fake = await fake_factory(api_keys=[key], rate_limit_per_min=limit)
    # An empty variable counts as unset: the fixture's own rate limit is taken away.
    proc = sidecar_process(fake.url, VALMI_API_KEY=key, VALMI_SIDECAR_RATE_LIMIT_PER_MIN="")
    url = await proc.wait_ready()
    upstream = (await client.get(url + "/v1/status")).json()["upstream"]
    assert (limit, "api_key_kind") == (
        upstream["rate_limit_per_min"],
        upstream["rate_limit_source"],
    )
    n = 30
    for i in range(n):
        resp = await client.post(url + "/v1/actions", json={**ACTION, "metadata": {"i": i}})
        assert 202 == resp.status_code, resp.text
    await fake.wait_until(lambda: n == len(fake.received), timeout_s=20)
    # At 10,000 a minute, the 30 would arrive within about 0.2 s.
    assert_within_rate_budget(fake, limit)


async def test_exhausted_remaining_budget_waits_for_reset_without_429(
    store: Store, fake_factory: FakeFactory, start_flusher: StartFlusher
) -> None:
    """X-RateLimit-Remaining stops a flusher whose configured budget is too high."""
    fake = await fake_factory(rate_limit_per_min=5)
    await store.submit([action(i) for i in range(8)])
    flusher, task = await start_flusher(fake, rate_limit_per_min=10_000, upstream_concurrency=2)
    await wait_until(lambda: 5 == store.counts().delivered, 5, "the window's 5 delivered")
    await wait_until(lambda: "rate_limited" == flusher.state, 5, "rate_limited")
    assert 0 == fake.status_counts.get(429, 0)
    assert 3 == store.counts().queued
    await stop(flusher, task, 0.2)
    assert 3 == store.counts().queued


# --- expiry, drain, disabled, failures -------------------------------------------------


async def test_expired_events_are_dead_lettered_without_another_send_once_tried(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    """Past max_event_age_s, an event tried before is dead-lettered without another send;
    one never tried had no chance yet, and is sent."""
    old = [action(i, received_at=time.time() - 7200) for i in range(3)]
    never_tried = action(3, received_at=time.time() - 7200)
    await store.submit([*old, never_tried, action(4)])
    leased = await store.lease(3, frozenset())
    await store.settle([Retry(e.seq, time.time(), "HTTP 502") for e in leased])
    with capture_logs() as logs:
        await start_flusher(fake, max_event_age_s=3600.0)
        await wait_until(lambda: 2 == store.counts().delivered, 5, "2 delivered")
        await wait_until(lambda: 3 == store.counts().dead_lettered, 5, "3 expired")
        # Logged by the settle loop once the store committed (the counts are set first).
        await wait_until(
            lambda: 3 == sum(e["n"] for e in logs if e["event"] == "events_expired"),
            5,
            "the expiry logged",
        )
    records = await store.dead_letters()
    assert {e.idem_key for e in old} == {r.idem_key for r in records}
    assert {"expired"} == {r.reason for r in records}
    assert 2 == fake.requests
    assert [3, 4] == order(fake)


async def test_nothing_expires_while_forwarding_is_paused(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    """A pause (a wrong key) does not turn into a loop that expires the whole queue: the
    old events stay queued, one at a time is the probe, and they go once it resumes."""
    fake.set_faults(unauthorized=True)
    await store.submit([action(i, received_at=time.time() - 7200) for i in range(50)])
    flusher, _ = await start_flusher(fake, max_event_age_s=3600.0, upstream_concurrency=4)
    await wait_until(lambda: fake.requests >= 5, 10, "5 probes while paused")
    assert "paused" == flusher.state
    assert (50, 0) == (store.counts().queued, store.counts().dead_lettered)
    fake.set_faults(unauthorized=False)
    await wait_until(lambda: 50 == store.counts().delivered, 10, "all 50 delivered")
    assert 0 == store.counts().dead_lettered


async def test_drain_stops_within_its_bound_when_upstream_hangs(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    fake.set_faults(hang=True)
    await store.submit([action(i) for i in range(5)])
    flusher, task = await start_flusher(fake, upstream_concurrency=4)
    await wait_until(lambda: fake.requests >= 4, 5, "requests held by the fake")
    started = time.monotonic()
    await flusher.drain(0.3)
    assert time.monotonic() - started < 0.3 + 0.5
    await asyncio.wait_for(task, 1.0)  # run() ends cleanly
    assert 0 == flusher.in_flight
    counts = store.counts()
    assert (5, 0) == (counts.queued, counts.delivered)


async def test_a_hung_upstream_holds_exactly_upstream_concurrency_requests(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    """The pool of senders: as many requests open as ``upstream_concurrency``, no more;
    when upstream answers again, the same senders send the rest, each event once."""
    fake.set_faults(hang=True)
    await store.submit([action(i) for i in range(10)])
    flusher, task = await start_flusher(fake, upstream_concurrency=3)
    await wait_until(lambda: 3 == flusher.in_flight == fake.requests, 5, "3 requests held")
    fake.set_faults(hang=False)
    await wait_until(lambda: 10 == store.counts().delivered, 10, "10 delivered")
    assert (10, list(range(10))) == (fake.requests, sorted(order(fake)))
    await stop(flusher, task)


async def test_drain_returns_as_soon_as_the_queue_is_empty(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    await store.submit([action(i) for i in range(10)])
    flusher, task = await start_flusher(fake)
    started = time.monotonic()
    await flusher.drain(10.0)
    assert time.monotonic() - started < 2.0
    assert 10 == store.counts().delivered
    assert task.done()


async def test_drain_stops_at_once_when_paused(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    fake.set_faults(unauthorized=True)
    await store.submit([action(0)])
    flusher, task = await start_flusher(fake)
    await wait_until(lambda: "paused" == flusher.state, 5, "paused")
    started = time.monotonic()
    await flusher.drain(10.0)
    assert time.monotonic() - started < 1.0
    assert task.done()
    assert 1 == store.counts().queued


async def test_disabled_without_upstream_forwards_nothing(
    store: Store, start_flusher: StartFlusher
) -> None:
    flusher, task = await start_flusher(None)
    assert "disabled" == flusher.state
    await store.submit([action(i) for i in range(3)])
    await asyncio.sleep(0)
    assert not task.done()
    await flusher.drain(5.0)
    await asyncio.wait_for(task, 1.0)
    assert 3 == store.counts().queued


class CrashingUpstream(Upstream):
    async def send(self, event: Outgoing) -> Answer:
        raise RuntimeError("bug in a sender")


async def test_a_crashing_sender_makes_run_raise(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    upstream = CrashingUpstream(fake.url, Secret(DEFAULT_KEY), timeout_s=1.0, max_connections=1)
    await store.submit([action(0)])
    _, task = await start_flusher(fake, upstream=upstream)
    with pytest.raises(FlusherError, match="bug in a sender") as info:
        await asyncio.wait_for(task, 5.0)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert 1 == store.counts().queued  # the event is kept


async def test_cancelling_run_propagates_and_keeps_events(
    store: Store, fake: FakeValmi, start_flusher: StartFlusher
) -> None:
    fake.set_faults(hang=True)
    await store.submit([action(i) for i in range(3)])
    _, task = await start_flusher(fake)
    await wait_until(lambda: fake.requests >= 1, 5, "a request held")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 3 == store.counts().queued
