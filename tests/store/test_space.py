"""The disk budget and the queue limits: the WAL's bound, a full queue refused before a
commit would pass the limit, dead letters keeping their room."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from valmi_sidecar.disk import data_dir_bytes, file_bytes, minimum_queue_bytes
from valmi_sidecar.events import NewEvent, parse_one
from valmi_sidecar.operations import disk_json
from valmi_sidecar.store import DeadLetter, DeadLetterFilter, QueueFullError, Store

from .conftest import Clock, OpenStore, action, rows


def padded(clock: Clock, pad: int) -> NewEvent:
    body = (
        f'{{"agent_key": "agent-1", "action_type": "llm_call", "metadata": {{"p": "{"x" * pad}"}}}}'
    )
    return parse_one("action", body.encode(), now=clock())


async def test_queue_full_by_events_stores_nothing(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store(max_queue_events=3)
    await store.submit([action(clock), action(clock)])
    with pytest.raises(QueueFullError, match="max_queue_events=3") as info:
        await store.submit([action(clock), action(clock)])
    assert info.value.retry_after_s > 0
    assert 2 == store.counts().queued
    await store.submit([action(clock)])  # exactly at the limit is fine
    assert 3 == store.counts().queued


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
    assert "dead letters take a large share" in disk_json(disk)["dead_letters_warning"]
    with pytest.raises(QueueFullError):
        await store.submit([padded(clock, 1000)])

    assert queued == await store.purge_dead_letters(DeadLetterFilter(), queued)
    assert not store.disk().full
    assert (0, 0) == (store.disk().dead_letters, store.disk().dead_letter_bytes)
    assert disk_json(store.disk())["dead_letters_warning"] is None
    assert 0 < await fill(store, clock, data_dir, budget)


@pytest.mark.parametrize("large", [False, True], ids=["small_budget", "large_budget"])
async def test_the_wal_stays_within_its_share_when_a_reader_holds_it(
    open_store: OpenStore, clock: Clock, tmp_path: Path, large: bool
) -> None:
    """A long read (another process's) keeps the WAL from being cut: commits do not wait
    for it, new events are refused once the WAL passes its bound, and the WAL is cut and
    events accepted again once the read ends. With a large budget the WAL's bound leaves
    room for several transactions, and the WAL is not measured after every commit: the
    first commit that can pass the bound is measured all the same. The WAL is measured as
    the store measures it (its allocated blocks when more than its size): a commit can
    leave its size under the bound and its blocks past it."""
    budget = 256 * 1024 * 1024 if large else minimum_queue_bytes(16 * 1024) + 4 * 1024 * 1024
    data_dir = tmp_path / "data"
    store = await open_store(data_dir, max_queue_bytes=budget, max_body_bytes=16 * 1024)
    assert (store.budget.wal_soft_bytes > 4 * store.budget.txn_bytes) == large
    wal = data_dir / "queue.db-wal"
    reader = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchall()  # holds its snapshot
        refused: QueueFullError | None = None
        sizes: list[int] = []
        for _ in range(5_000):
            started = time.monotonic()
            try:
                await store.submit([padded(clock, 1000) for _ in range(12 if large else 4)])
            except QueueFullError as exc:
                refused = exc
                break
            finally:
                assert time.monotonic() - started < 2.0  # no wait for the reader
            assert data_dir_bytes(data_dir) <= budget
            sizes.append(file_bytes(wal))
            assert sizes[-1] <= store.budget.wal_bytes
        assert refused is not None
        assert "WAL" in str(refused)
        # Refused right after the first commit that took the WAL past its soft bound.
        assert sizes[-2] <= store.budget.wal_soft_bytes < sizes[-1]
        assert file_bytes(wal) <= store.budget.wal_bytes
    finally:
        reader.close()
    await store.submit([padded(clock, 1000)])
    assert file_bytes(wal) <= store.budget.wal_soft_bytes
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


async def test_a_group_that_passes_the_disk_budget_stores_the_submissions_that_fit(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    """A group as a whole too large for the disk budget is not refused as a whole: its
    submissions are taken in order while they fit, the rest refused, storing nothing."""
    budget = minimum_queue_bytes(16 * 1024) + 512 * 1024
    options = {"max_queue_bytes": budget, "max_body_bytes": 16 * 1024}

    def event() -> NewEvent:
        # A millisecond apart: ids (the keys) in order, so two stores fed the same
        # events lay out the same pages, and fill up at the same event.
        clock.t += 0.001
        return padded(clock, 1000)

    async def fits(store: Store) -> int:
        n = 0
        while True:
            try:
                await store.submit([event()])
            except QueueFullError:
                return n
            n += 1

    start = clock.t
    room = await fits(await open_store(tmp_path / "a", **options))
    clock.t = start
    store = await open_store(tmp_path / "b", **options)
    for _ in range(room - 3):
        await store.submit([event()])
    events = [event() for _ in range(6)]
    commits = store.commits
    results = await asyncio.gather(*(store.submit([e]) for e in events), return_exceptions=True)
    assert commits + 1 == store.commits  # the six in one group
    taken = [not isinstance(r, QueueFullError) for r in results]
    k = sum(taken)
    assert 1 <= k <= 5, results
    assert [True] * k + [False] * (6 - k) == taken  # in order: the first that fit
    assert room - 3 + k == store.counts().queued
    stored = {r[0] for r in rows(store, "SELECT id FROM events")}
    assert {e.id for e in events[:k]} <= stored
    assert not {e.id for e in events[k:]} & stored
    assert store.full
    assert data_dir_bytes(tmp_path / "b") <= budget


async def test_duplicate_is_answered_when_queue_is_full(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store(max_queue_events=1)
    (first,) = await store.submit([action(clock, key="k1")])
    (again,) = await store.submit([action(clock, key="k1")])
    assert (first.id, True) == (again.id, again.duplicate)
