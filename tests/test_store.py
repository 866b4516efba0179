"""The SQLite queue, on real database files in ``tmp_path``; no mocks."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from valmi_sidecar.disk import data_dir_bytes, minimum_queue_bytes
from valmi_sidecar.events import NewEvent, parse_batch, parse_one
from valmi_sidecar.store import (
    DB_NAME,
    SCHEMA_VERSION,
    Accepted,
    DataDirLockedError,
    DeadLetter,
    DeadLetterFilter,
    Delivered,
    IdempotencyConflictError,
    OutcomeUnknownError,
    QueueFullError,
    Retry,
    Store,
    StoreError,
)
from valmi_sidecar.store import core as store_core

from .conftest import wait_until

T0 = 1_700_000_000.0
DAY = 24 * 3600.0


class Clock:
    """A settable clock for the store (seconds since the epoch)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def open_store(tmp_path: Path, clock: Clock) -> AsyncIterator[OpenStore]:
    """Open stores on ``tmp_path / "data"`` (by default) and close them all afterwards."""
    opened: list[Store] = []

    async def _open(data_dir: Path | None = None, **kwargs: Any) -> Store:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("prune_interval_s", None)
        store = await Store.open(data_dir or tmp_path / "data", **kwargs)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        await store.close()


def action(
    clock: Clock, key: str | None = None, agent: str = "agent-1", kind: str = "llm_call"
) -> NewEvent:
    body = f'{{"agent_key": "{agent}", "action_type": "{kind}"}}'.encode()
    return parse_one("action", body, idem_key=key, now=clock())


def outcome(clock: Clock, value: float, key: str | None = None) -> NewEvent:
    body = f'{{"agent_key": "agent-1", "outcome_type": "resolved", "value": {value}}}'.encode()
    return parse_one("outcome", body, idem_key=key, now=clock())


def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Read committed data through an independent connection."""
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


# -- group commit --------------------------------------------------------------------


async def test_concurrent_submits_share_commits(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    results = await asyncio.gather(*(store.submit([action(clock)]) for _ in range(64)))
    assert 64 == len({r[0].id for r in results})
    assert store.commits < 64
    assert 64 == store.counts().received == store.counts().queued


async def test_submit_resolves_only_after_its_commit(open_store: OpenStore, clock: Clock) -> None:
    """When a submit's future resolves, another connection already sees the event."""
    store = await open_store()
    seen: list[bool] = []
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:

        def check(event_id: str) -> Callable[[asyncio.Future[list[Accepted]]], None]:
            def _check(_fut: asyncio.Future[list[Accepted]]) -> None:
                found = conn.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchall()
                seen.append(bool(found))

            return _check

        tasks = []
        for _ in range(40):
            event = action(clock)
            task = asyncio.ensure_future(store.submit([event]))
            task.add_done_callback(check(event.id))
            tasks.append(task)
        await asyncio.gather(*tasks)  # each task's callbacks ran before gather's
    finally:
        conn.close()
    assert [True] * 40 == seen


async def test_data_survives_close_and_reopen(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    event = outcome(clock, 12.5)
    await store.submit([event])
    await store.close()
    store = await open_store()
    (leased,) = await store.lease(10, frozenset())
    assert (event.id, event.body, "outcome") == (leased.id, leased.body, leased.kind)
    assert 1 == store.counts().queued == store.counts().received


async def test_close_commits_pending_submits(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    tasks = [asyncio.ensure_future(store.submit([action(clock)])) for _ in range(20)]
    await asyncio.sleep(0)  # the submits are queued, not yet committed
    await store.close()
    assert 20 == len(await asyncio.gather(*tasks))
    assert [(20,)] == rows(store, "SELECT count(*) FROM events")


async def test_submit_after_close_raises_store_error(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    await store.close()
    with pytest.raises(StoreError, match="closing"):
        await store.submit([action(clock)])


# -- idempotency ---------------------------------------------------------------------


async def test_duplicate_returns_original_and_stores_nothing(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    (first,) = await store.submit([action(clock, key="k1")])
    clock.t += 60
    (again,) = await store.submit([action(clock, key="k1")])
    assert Accepted(first.id, first.created_at, duplicate=True) == again
    c = store.counts()
    assert (1, 1, 1) == (c.received, c.queued, c.duplicates)
    assert [(1,)] == rows(store, "SELECT count(*) FROM events")


async def test_duplicates_in_one_group_commit_store_one_event(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    results = await asyncio.gather(*(store.submit([action(clock, key="same")]) for _ in range(5)))
    assert 1 == len({r[0].id for r in results})
    assert [False, True, True, True, True] == [r[0].duplicate for r in results]
    assert (1, 4) == (store.counts().queued, store.counts().duplicates)


async def test_same_key_different_body_conflicts_and_stores_nothing(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    await store.submit([action(clock, key="k1", kind="llm_call")])
    with pytest.raises(IdempotencyConflictError) as info:
        await store.submit([action(clock, key="k1", kind="tool_call")])
    assert "k1" == info.value.key
    c = store.counts()
    assert (1, 1, 0) == (c.received, c.queued, c.duplicates)


async def test_sidecar_assigned_key_cannot_be_reused(open_store: OpenStore, clock: Clock) -> None:
    """A client key equal to an earlier event's own key (its id) is that event's key."""
    store = await open_store()
    (first,) = await store.submit([action(clock)])
    with pytest.raises(IdempotencyConflictError):
        await store.submit([action(clock, key=first.id, kind="tool_call")])


async def test_batch_is_all_or_nothing_on_conflict(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    await store.submit([action(clock, key="taken", kind="llm_call")])
    batch = [action(clock, key="b1"), action(clock, key="taken", kind="tool_call")]
    with pytest.raises(IdempotencyConflictError):
        await store.submit(batch)
    assert 1 == store.counts().received
    assert [("taken",)] == rows(store, "SELECT idem_key FROM keys")


async def test_same_key_twice_in_one_batch_with_different_bodies_conflicts(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    with pytest.raises(IdempotencyConflictError):
        await store.submit([action(clock, key="k", kind="a"), action(clock, key="k", kind="b")])
    assert 0 == store.counts().received


async def test_conflict_does_not_fail_other_submissions_in_its_group(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    await store.submit([action(clock, key="taken", kind="llm_call")])
    commits = store.commits
    results = await asyncio.gather(
        store.submit([action(clock, key="a")]),
        store.submit([action(clock, key="taken", kind="tool_call")]),
        store.submit([action(clock, key="b")]),
        return_exceptions=True,
    )
    assert commits + 1 == store.commits  # one group
    assert [list, IdempotencyConflictError, list] == [type(r) for r in results]
    assert 3 == store.counts().received


async def test_batch_keys_are_idempotent_as_a_whole(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    raw = b'{"actions": [{"agent_key": "a", "action_type": "llm_call"}], "outcomes": [{"agent_key": "a", "outcome_type": "x", "value": 1}]}'
    first = await store.submit(parse_batch(raw, idem_key="req-1", now=clock()))
    again = await store.submit(parse_batch(raw, idem_key="req-1", now=clock() + 5))
    assert [a.id for a in first] == [a.id for a in again]
    assert [True, True] == [a.duplicate for a in again]
    assert 2 == store.counts().queued


async def test_key_expires_after_window_once_delivered(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    (first,) = await store.submit([action(clock, key="k1", kind="llm_call")])
    (leased,) = await store.lease(1, frozenset())
    await store.settle([Delivered(leased.seq)])
    clock.t += DAY - 1
    with pytest.raises(IdempotencyConflictError):
        await store.submit([action(clock, key="k1", kind="tool_call")])
    clock.t += 2
    (second,) = await store.submit([action(clock, key="k1", kind="tool_call")])
    assert not second.duplicate
    assert first.id != second.id
    assert [(second.id, 0)] == rows(store, "SELECT id, state FROM keys WHERE idem_key = 'k1'")


async def test_key_of_a_queued_event_does_not_expire(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    (first,) = await store.submit([action(clock, key="k1")])
    clock.t += 3 * DAY
    (again,) = await store.submit([action(clock, key="k1")])
    assert (first.id, True) == (again.id, again.duplicate)


# -- queue limits --------------------------------------------------------------------


async def test_queue_full_by_events_stores_nothing(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store(max_queue_events=3)
    await store.submit([action(clock), action(clock)])
    with pytest.raises(QueueFullError, match="max_queue_events=3") as info:
        await store.submit([action(clock), action(clock)])
    assert info.value.retry_after_s > 0
    assert 2 == store.counts().queued
    await store.submit([action(clock)])  # exactly at the limit is fine
    assert 3 == store.counts().queued


def padded(clock: Clock, pad: int) -> NewEvent:
    body = (
        f'{{"agent_key": "agent-1", "action_type": "llm_call", "metadata": {{"p": "{"x" * pad}"}}}}'
    )
    return parse_one("action", body.encode(), now=clock())


async def test_disk_budget_bounds_every_file_and_refusal_stores_nothing(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    """max_queue_bytes bounds the data directory's files (database, WAL, SHM, lock, …),
    measured after every commit; the submission that would pass it stores nothing."""
    budget = minimum_queue_bytes(16 * 1024) + 512 * 1024
    data_dir = tmp_path / "data"
    store = await open_store(data_dir, max_queue_bytes=budget, max_body_bytes=16 * 1024)
    largest = 0
    refused: QueueFullError | None = None
    for i in range(100_000):
        n = 1 if refused is not None else 1 + i % 5  # once a batch is refused, single ones
        before = store.counts()
        try:
            await store.submit([padded(clock, 1000 + i % 7) for _ in range(n)])
        except QueueFullError as exc:
            assert before == store.counts()
            refused = exc
            if n == 1:
                break
        largest = max(largest, data_dir_bytes(data_dir))
    assert refused is not None, "never full"
    assert "max_queue_bytes" in str(refused)
    assert refused.retry_after_s > 0
    assert store.full
    assert largest <= budget
    assert data_dir_bytes(data_dir) <= budget
    # Most of the room for events held events: the estimate errs high, the measure does not.
    assert store.counts().queued_bytes > store.budget.intake_bytes // 2


async def fill(store: Store, clock: Clock, data_dir: Path, budget: int) -> int:
    """Submit ~1 KB events until the disk budget refuses one; check the files after each."""
    n = 0
    while True:
        try:
            await store.submit([padded(clock, 1000)])
        except QueueFullError:
            return n
        n += 1
        assert data_dir_bytes(data_dir) <= budget


async def test_a_full_queue_dead_lettered_stays_within_the_budget_and_dead_letters_count(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    """Settlements never fail for want of room (each dead letter reuses the pages of the
    events before it); dead letters keep their room, say so, and a purge gives it back."""
    budget = minimum_queue_bytes(16 * 1024) + 512 * 1024
    data_dir = tmp_path / "data"
    store = await open_store(data_dir, max_queue_bytes=budget, max_body_bytes=16 * 1024)
    queued = await fill(store, clock, data_dir, budget)
    assert store.full
    with capture_logs() as logs:
        while leased := await store.lease(200, ()):
            dead = [DeadLetter(e.seq, "rejected", 400, "no", len(e.body)) for e in leased]
            await store.settle(dead)
            assert data_dir_bytes(data_dir) <= budget
    assert 1 == sum(e["event"] == "dead_letters_fill_the_disk" for e in logs)
    assert 0 == store.stats.commit_failures
    c = store.counts()
    assert (0, queued) == (c.queued, c.dead_lettered)
    disk = store.disk()
    assert disk.full  # dead letters are billable: they keep their room
    assert queued == disk.dead_letters
    assert disk.dead_letter_share > 0.25
    assert "dead letters take a large share" in disk.as_dict()["dead_letters_warning"]
    with pytest.raises(QueueFullError):
        await store.submit([padded(clock, 1000)])

    assert queued == await store.purge_dead_letters(DeadLetterFilter(), queued)
    assert not store.disk().full
    assert (0, 0) == (store.disk().dead_letters, store.disk().dead_letter_bytes)
    assert store.disk().as_dict()["dead_letters_warning"] is None
    assert 0 < await fill(store, clock, data_dir, budget)


async def test_the_wal_stays_within_its_share_when_a_reader_holds_it(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    """A long read (another process's) keeps the WAL from being cut: commits do not wait
    for it, new events are refused once the WAL passes its bound, and the WAL is cut and
    events accepted again once the read ends."""
    budget = minimum_queue_bytes(16 * 1024) + 4 * 1024 * 1024
    data_dir = tmp_path / "data"
    store = await open_store(data_dir, max_queue_bytes=budget, max_body_bytes=16 * 1024)
    wal = data_dir / "queue.db-wal"
    reader = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchall()  # holds its snapshot
        refused: QueueFullError | None = None
        for _ in range(2_000):
            started = time.monotonic()
            try:
                await store.submit([padded(clock, 1000) for _ in range(4)])
            except QueueFullError as exc:
                refused = exc
                break
            finally:
                assert time.monotonic() - started < 2.0  # no wait for the reader
            assert data_dir_bytes(data_dir) <= budget
        assert refused is not None
        assert "WAL" in str(refused)
        assert wal.stat().st_size <= store.budget.wal_bytes
    finally:
        reader.close()
    await store.submit([padded(clock, 1000)])
    assert wal.stat().st_size <= store.budget.wal_soft_bytes
    assert data_dir_bytes(data_dir) <= budget


async def test_queue_limit_is_exact_under_concurrent_submits(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store(max_queue_events=10)
    results = await asyncio.gather(
        *(store.submit([action(clock)]) for _ in range(25)), return_exceptions=True
    )
    assert 10 == sum(isinstance(r, list) for r in results)
    assert 15 == sum(isinstance(r, QueueFullError) for r in results)
    assert 10 == store.counts().queued


async def test_duplicate_is_answered_when_queue_is_full(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store(max_queue_events=1)
    (first,) = await store.submit([action(clock, key="k1")])
    (again,) = await store.submit([action(clock, key="k1")])
    assert (first.id, True) == (again.id, again.duplicate)


# -- lease and settle ------------------------------------------------------------------


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


async def test_settlements_reconcile_counts(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    await store.submit([action(clock) for _ in range(4)])
    a, b, c, _d = await store.lease(4, frozenset())
    await store.settle(
        [Delivered(a.seq), Retry(b.seq, clock() + 1, "timeout"), DeadLetter(c.seq, "x", 400, "")]
    )
    counts = store.counts()
    assert (4, 2, 1, 1) == (
        counts.received,
        counts.queued,
        counts.delivered,
        counts.dead_lettered,
    )
    assert counts.received == counts.queued + counts.delivered + counts.dead_lettered
    assert [("received", 4), ("delivered", 1), ("dead_lettered", 1), ("duplicates", 0)] == rows(
        store,
        "SELECT name, value FROM counters ORDER BY"
        " CASE name WHEN 'received' THEN 0 WHEN 'delivered' THEN 1"
        " WHEN 'dead_lettered' THEN 2 ELSE 3 END",
    )
    assert [(2,)] == rows(store, "SELECT count(*) FROM events")


async def test_double_settle_is_not_counted_twice(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    await store.submit([action(clock), action(clock)])
    a, b = await store.lease(2, frozenset())
    await store.settle([Delivered(a.seq), Delivered(a.seq), DeadLetter(b.seq, "x", 422, "")])
    await store.settle([Delivered(a.seq), DeadLetter(a.seq, "y", 400, ""), Delivered(b.seq)])
    c = store.counts()
    assert (2, 0, 1, 1) == (c.received, c.queued, c.delivered, c.dead_lettered)
    assert [(1,)] == rows(store, "SELECT count(*) FROM dead_letters")


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


async def test_wait_for_events_returns_after_a_commit_adds_events(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    waiter = asyncio.ensure_future(store.wait_for_events())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await store.submit([action(clock)])
    async with asyncio.timeout(5):
        await waiter
    again = asyncio.ensure_future(store.wait_for_events())
    await asyncio.sleep(0.01)
    assert not again.done()  # cleared when the previous wait returned
    again.cancel()


# -- pruning ---------------------------------------------------------------------------


async def test_prune_removes_old_settled_keys_never_queued_ones(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    await store.submit(
        [action(clock, key="done"), action(clock, key="dead"), action(clock, key="q")]
    )
    done, dead, _queued = await store.lease(3, frozenset())
    await store.settle([Delivered(done.seq), DeadLetter(dead.seq, "x", 400, "")])
    assert 0 == await store.prune()  # not older than the window yet
    clock.t += DAY + 1
    assert 2 == await store.prune()
    assert [("q",)] == rows(store, "SELECT idem_key FROM keys")
    c = store.counts()
    assert c.received == c.queued + c.delivered + c.dead_lettered


async def test_dedup_window_counts_from_delivery_when_the_event_waited_in_the_queue(
    open_store: OpenStore, clock: Clock
) -> None:
    """An event that waited two days in the queue still de-duplicates a client's retry for
    the window after it was delivered, and its key is pruned only then."""
    store = await open_store()
    first = action(clock, key="k")
    await store.submit([first])
    clock.t += 2 * DAY  # upstream down for two days
    (leased,) = await store.lease(1, frozenset())
    await store.settle([Delivered(leased.seq)])
    clock.t += DAY - 60  # the client retries just inside the window after delivery
    assert 0 == await store.prune()
    (again,) = await store.submit([action(clock, key="k")])
    assert (True, first.id) == (again.duplicate, again.id)
    assert (1, 0) == (store.counts().received, store.counts().queued)
    clock.t += 61
    assert 1 == await store.prune()
    assert [] == rows(store, "SELECT idem_key FROM keys")


def used_bytes(store: Store) -> int:
    (page_size, pages, free) = (
        rows(store, f"PRAGMA {p}")[0][0] for p in ("page_size", "page_count", "freelist_count")
    )
    return int((pages - free) * page_size)


async def test_a_remembered_key_takes_under_160_bytes_and_answers_as_before(
    open_store: OpenStore, clock: Clock
) -> None:
    """A delivered event's key row, kept for the de-dup window, does not repeat its id or
    its receipt time (it was 199 bytes on disk): a retry still gets the original answer."""
    store = await open_store()
    client = action(clock, key="client-key")
    await store.submit([client])
    before = used_bytes(store)
    for _ in range(10):
        await store.submit([action(clock) for _ in range(500)])
        clock.t += 0.0017
    while leased := await store.lease(1000, frozenset()):
        await store.settle([Delivered(e.seq) for e in leased])
    await store.prune()  # keys stay (the window), free pages beyond a few go
    assert (used_bytes(store) - before) / 5000 < 160
    (again,) = await store.submit([action(clock, key="client-key")])
    assert (True, client.id, client.created_at) == (again.duplicate, again.id, again.created_at)
    own = rows(store, "SELECT id, created_at FROM keys WHERE idem_key != 'client-key' LIMIT 1")
    assert [("", "")] == own


async def test_prune_gives_free_pages_back(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    big = b'{"agent_key": "a", "action_type": "x", "metadata": {"blob": "' + b"x" * 20_000 + b'"}}'
    for _ in range(20):
        await store.submit([parse_one("action", big, now=clock()) for _ in range(20)])
    leased = await store.lease(400, frozenset())
    await store.settle([Delivered(e.seq) for e in leased])
    pages_before = rows(store, "PRAGMA page_count")[0][0]
    await store.prune()
    assert rows(store, "PRAGMA page_count")[0][0] < pages_before
    assert [(2,)] == rows(store, "PRAGMA auto_vacuum")  # incremental


# -- the data directory --------------------------------------------------------------


async def test_second_open_in_same_process_is_refused(open_store: OpenStore) -> None:
    await open_store()
    with pytest.raises(DataDirLockedError, match=rf"pid {os.getpid()}\b.*--data-dir"):
        await open_store()


async def test_open_is_refused_while_another_process_holds_the_lock(
    open_store: OpenStore, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    holder = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        holder,
        str(data_dir / "lock"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            assert b"locked\n" == await proc.stdout.readline()
        with pytest.raises(DataDirLockedError, match=rf"pid {proc.pid}\b"):
            await open_store()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        async with asyncio.timeout(10):
            await proc.wait()
    await open_store()  # free again once the holder exited


async def test_lock_is_released_on_close(open_store: OpenStore) -> None:
    store = await open_store()
    await store.close()
    await open_store()


async def test_start_after_a_clean_close_skips_the_check_and_knows_the_queue(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    """A clean close leaves a record (0600) that the next start uses instead of reading
    the whole file; the start deletes it, so a crash after it never leaves a stale one."""
    record = tmp_path / "data" / "clean-shutdown"
    first = await open_store(recover_corrupt=True)
    assert "passed" == first.startup_check  # a new file: nothing recorded yet
    await first.submit([action(clock) for _ in range(25)])
    before = first.counts()
    await first.close()
    assert 0o600 == stat.S_IMODE(record.stat().st_mode)

    second = await open_store(recover_corrupt=True)
    assert not record.exists()
    assert "skipped" == second.startup_check
    after = second.counts()
    assert (25, before.queued_bytes) == (after.queued, after.queued_bytes)
    assert before.queued_bytes > 0
    (leased,) = await second.lease(1, ())
    await second.settle([Delivered(leased.seq)])
    assert (24, before.queued_bytes - len(leased.body)) == (
        second.counts().queued,
        second.counts().queued_bytes,
    )


async def test_a_file_changed_after_the_clean_close_is_checked_and_counted_again(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    first = await open_store(recover_corrupt=True)
    await first.submit([action(clock) for _ in range(10)])
    await first.close()
    with sqlite3.connect(tmp_path / "data" / DB_NAME) as conn:  # someone else's change
        conn.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events LIMIT 4)")
    conn.close()

    second = await open_store(recover_corrupt=True)
    assert "passed" == second.startup_check
    assert 6 == second.counts().queued  # the file's own count, not the record's 10


_CRASH_AFTER_SUBMIT = """
import asyncio, os, sys
from pathlib import Path
from valmi_sidecar.events import parse_one
from valmi_sidecar.store import Store

async def main():
    store = await Store.open(Path(sys.argv[1]), recover_corrupt=True, prune_interval_s=None)
    await store.submit([parse_one("action", b'{"agent_key": "a", "action_type": "t"}')])
    os._exit(0)  # no close: as a SIGKILL or a power cut would leave it

asyncio.run(main())
"""


async def test_a_store_that_did_not_close_cleanly_is_checked_at_the_next_start(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    first = await open_store(recover_corrupt=True)
    await first.submit([action(clock)])
    await first.close()
    assert (tmp_path / "data" / "clean-shutdown").exists()
    crash = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASH_AFTER_SUBMIT, str(tmp_path / "data")
    )
    assert 0 == await asyncio.wait_for(crash.wait(), 60)
    assert not (tmp_path / "data" / "clean-shutdown").exists()
    second = await open_store(recover_corrupt=True)
    assert "passed" == second.startup_check
    assert 2 == second.counts().queued


async def test_data_dir_and_files_are_private(open_store: OpenStore, tmp_path: Path) -> None:
    data_dir = tmp_path / "deep" / "data"
    store = await open_store(data_dir)
    assert 0o700 == stat.S_IMODE(data_dir.stat().st_mode)
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", "lock"):
        assert (name, 0o600) == (name, stat.S_IMODE((data_dir / name).stat().st_mode))
    assert store.path == data_dir / DB_NAME


async def test_existing_data_dir_is_made_private(open_store: OpenStore, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    await open_store(data_dir)
    assert 0o700 == stat.S_IMODE(data_dir.stat().st_mode)


async def test_database_of_a_newer_version_is_refused(
    open_store: OpenStore, tmp_path: Path
) -> None:
    store = await open_store()
    await store.close()
    with sqlite3.connect(store.path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer"):
        await open_store()
    await open_store(tmp_path / "other")  # the lock of the refused directory was released
    with sqlite3.connect(store.path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    await open_store()


async def test_fresh_database_is_wal_and_current_version(open_store: OpenStore) -> None:
    store = await open_store()
    assert [("wal",)] == rows(store, "PRAGMA journal_mode")
    assert [(SCHEMA_VERSION,)] == rows(store, "PRAGMA user_version")


# -- failures ----------------------------------------------------------------------------


async def test_failed_commit_fails_every_op_and_store_recovers(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    await store.submit([action(clock)])
    await store.writer_connection.fetchall(
        "PRAGMA max_page_count = 1"
    )  # no room to grow: "disk full"
    big = b'{"agent_key": "a", "action_type": "x", "metadata": {"blob": "' + b"x" * 50_000 + b'"}}'
    results = await asyncio.gather(
        store.submit([parse_one("action", big, now=clock())]),
        store.submit([action(clock), action(clock)]),
        return_exceptions=True,
    )
    assert [StoreError, StoreError] == [type(r) for r in results]
    assert all(isinstance(r, BaseException) and r.__cause__ is not None for r in results)
    assert not store.writable
    assert 1 == store.counts().received
    assert [(1,)] == rows(store, "SELECT count(*) FROM events")
    assert [(1,)] == rows(store, "SELECT count(*) FROM keys")

    await store.writer_connection.fetchall("PRAGMA max_page_count = 1073741823")
    (ok,) = await store.submit([parse_one("action", big, now=clock())])
    c = store.counts()
    assert (True, False, 2, 2) == (store.writable, ok.duplicate, c.received, c.queued)
    assert [(2,)] == rows(store, "SELECT count(*) FROM events")


async def test_writer_crash_fails_submits_and_ends_writer_task(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    await store.writer_connection.close()  # the writer's next call fails with an unexpected error
    with pytest.raises(StoreError):
        await store.submit([action(clock)])
    await asyncio.wait({store.writer_task}, timeout=5)
    assert store.writer_task.exception() is not None
    assert not store.writable
    with pytest.raises(StoreError, match="writer stopped"):
        await store.submit([action(clock)])


async def test_a_close_in_the_middle_of_a_commit_says_the_outcome_is_unknown(
    open_store: OpenStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() gives up on a commit that takes too long and stops the writer while its
    thread is inside the transaction, which then commits: those submits get
    ``OutcomeUnknownError``, never the "nothing was stored" of a plain ``StoreError``. A
    submit that never reached the writer was not stored, and says so."""
    monkeypatch.setattr(store_core, "CLOSE_DRAIN_S", 0.2)
    store = await open_store()
    blocker = sqlite3.connect(store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the commit waits for it
        in_commit = asyncio.ensure_future(store.submit([action(clock, key="in-commit")]))
        await wait_until(lambda: store.in_transaction, 10, "the writer inside the transaction")
        waiting = asyncio.ensure_future(store.submit([action(clock, key="waiting")]))
        closing = asyncio.ensure_future(store.close())
        await asyncio.wait({in_commit, waiting}, timeout=10)
        blocker.execute("COMMIT")  # the writer's thread gets the lock and commits
        await closing
    finally:
        blocker.close()
    with pytest.raises(OutcomeUnknownError, match="in the middle of a commit"):
        in_commit.result()
    with pytest.raises(StoreError) as not_stored:
        waiting.result()
    assert not isinstance(not_stored.value, OutcomeUnknownError)
    # What the client was told "may be stored" was stored (the thread's commit may end
    # after close() returned): "nothing was" would have been wrong.
    await wait_until(lambda: bool(rows(store, "SELECT 1 FROM keys")), 10, "the commit")
    assert [("in-commit",)] == rows(store, "SELECT idem_key FROM keys")


async def test_writable_recovers_by_itself_when_idle(open_store: OpenStore, clock: Clock) -> None:
    """After a failed commit and no further writes, the writer's probe finds the disk
    writable again (so readiness does not wait for traffic that it turned away)."""
    store = await open_store()
    await store.writer_connection.fetchall("PRAGMA max_page_count = 1")
    big = b'{"agent_key": "a", "action_type": "x", "metadata": {"blob": "' + b"x" * 50_000 + b'"}}'
    with pytest.raises(StoreError):
        await store.submit([parse_one("action", big, now=clock())])
    for _ in range(100):  # the probe runs after PROBE_INTERVAL_S of idleness
        if store.probes:
            break
        await asyncio.sleep(0.05)
    assert (True, False) == (store.probes >= 1, store.writable)  # still full: probe failed
    await store.writer_connection.fetchall("PRAGMA max_page_count = 1073741823")
    for _ in range(100):
        if store.writable:
            break
        await asyncio.sleep(0.05)
    assert store.writable
