"""Operator actions on real SQLite files: re-queue, purge, import (salvage), and the
maintenance of keys (prune, giving free pages back)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import wait_until
from valmi_sidecar.events import parse_one
from valmi_sidecar.store import (
    DeadLetter,
    DeadLetterFilter,
    Delivered,
    LedgerRow,
    QueueFullError,
    Store,
    opening,
)
from valmi_sidecar.store import reads as store_reads
from valmi_sidecar.store.thread import ConnectionClosedError

from .conftest import DAY, Clock, OpenStore, action, dead_letter, rows


async def test_requeue_moves_dead_letters_back_with_their_keys_and_counts_reconcile(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    ids = await dead_letter(store, 3)
    before = {d.id: d.idem_key for d in await store.dead_letters()}
    assert 2 == await store.requeue_dead_letters(DeadLetterFilter(ids=tuple(ids[:2])), 10)
    c = store.counts()
    assert (3, 2, 0, 1) == (c.received, c.queued, c.delivered, c.dead_lettered)
    leased = await store.lease(10, frozenset())
    assert {(i, before[i]) for i in ids[:2]} == {(e.id, e.idem_key) for e in leased}
    (row,) = await store.ledger()
    assert (3, 2, 0, 1) == (row.received, row.queued, row.delivered, row.dead_lettered)
    await store.settle([Delivered(e.seq) for e in leased])
    (row,) = await store.ledger()
    assert (3, 0, 2, 1) == (row.received, row.queued, row.delivered, row.dead_lettered)


async def test_requeued_event_ages_from_its_requeueing(open_store: OpenStore) -> None:
    """An 'expired' dead letter re-queued today does not expire again at once."""
    now = [time.time() - 10 * 86400]
    store = await open_store(clock=lambda: now[0])
    await dead_letter(store, 1)
    now[0] = time.time()
    assert 1 == await store.requeue_dead_letters(DeadLetterFilter(), 10)
    (event,) = await store.lease(1, frozenset())
    assert now[0] == event.received_at
    assert store.counts().oldest_queued_at == now[0]


async def test_requeue_beyond_the_queue_limit_moves_nothing(open_store: OpenStore) -> None:
    store = await open_store(max_queue_events=2)
    await dead_letter(store, 2)
    await store.submit([action()])
    with pytest.raises(QueueFullError):
        await store.requeue_dead_letters(DeadLetterFilter(), 10)
    c = store.counts()
    assert (1, 2) == (c.queued, c.dead_lettered)
    assert 2 == len(await store.dead_letters())


async def test_purge_deletes_the_events_and_keeps_the_counts(open_store: OpenStore) -> None:
    store = await open_store()
    await dead_letter(store, 3)
    assert 2 == await store.purge_dead_letters(DeadLetterFilter(reason="rejected"), 2)
    assert 0 == await store.purge_dead_letters(DeadLetterFilter(reason="expired"), 10)
    assert 1 == len(await store.dead_letters())
    assert 3 == store.counts().dead_lettered
    (row,) = await store.ledger()
    assert 3 == row.dead_lettered
    assert 2 == store.stats.purged


async def test_import_skips_duplicates_and_conflicting_keys(open_store: OpenStore) -> None:
    store = await open_store()
    (mine,) = [action(key="k-1")]
    await store.submit([mine])
    conflicting = action(agent="agent_other", key="k-2")
    await store.submit([conflicting])
    salvaged = [mine, action(key="k-2"), action(key="k-3"), action(key="k-4")]
    result = await store.import_events(salvaged)
    assert (2, 1, 1) == (result.imported, result.duplicates, result.conflicts)
    assert 4 == store.counts().received


async def test_import_of_events_with_the_sidecars_own_keys_stores_each_once(
    open_store: OpenStore,
) -> None:
    """An event without a client key has its id as key; salvaged again, it keeps that key,
    so the second import finds it (and the ledger counts it once)."""
    store = await open_store()
    events = [action(), action(), action(key="k-own")]
    assert all(e.idem_key == e.id for e in events[:2])
    first = await store.import_events(events)
    again = await store.import_events(events)
    assert (3, 0) == (first.imported, first.duplicates)
    assert (0, 3) == (again.imported, again.duplicates)
    assert 3 == store.counts().queued
    assert 3 == sum(r.received for r in await store.ledger())


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


async def test_the_ledger_is_not_read_after_the_store_closed(
    open_store: OpenStore, clock: Clock
) -> None:
    """A read after ``close()`` is a bug, as on the reader's connection: the ledger's own
    connection is not opened on a file whose lock the store gave up."""
    store = await open_store()
    await store.submit([action(clock)])
    await store.close()
    with pytest.raises(ConnectionClosedError):
        await store.ledger()
    assert not any(t.name == "store-ledger" for t in threading.enumerate())


def _hold_ledger_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make each ledger read, on its thread, set the first event and then wait for the
    second (10 s at most) before it reads: a long read, held open as long as a test needs."""
    reading, gate = threading.Event(), threading.Event()
    real = store_reads.ledger

    def held(
        agent_key: str | None, since: str | None, until: str | None
    ) -> Callable[[sqlite3.Connection], list[LedgerRow]]:
        read = real(agent_key, since, until)

        def run(db: sqlite3.Connection) -> list[LedgerRow]:
            reading.set()
            gate.wait(10)
            return read(db)

        return run

    monkeypatch.setattr(store_reads, "ledger", held)
    return reading, gate


async def test_a_ledger_read_given_up_during_a_long_read_ends_in_its_cancellation(
    open_store: OpenStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that gives up while the ledger read still runs (a client gone, a stop)
    gets its cancellation, not the closing connection's time-out, even when that read
    outlasts the bound on closing; the read's connection closes once it ends."""
    store = await open_store()
    await store.submit([action(clock)])
    reading, gate = _hold_ledger_reads(monkeypatch)
    monkeypatch.setattr(opening, "CONNECTION_CLOSE_S", 0.05)
    ledger = asyncio.ensure_future(store.ledger())
    await wait_until(reading.is_set, 10, "the ledger read under way")
    ledger.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await ledger
    finally:
        gate.set()
    await wait_until(
        lambda: not any(t.name == "store-ledger" for t in threading.enumerate()),
        10,
        "the ledger's connection closed",
    )
    monkeypatch.undo()
    (line,) = await store.ledger()
    assert (1, 1) == (line.received, line.queued)


async def test_a_ledger_read_does_not_hold_up_the_flushers_reads(
    open_store: OpenStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger read reads the whole queue (about a second under a backlog of 1,000,000
    events): it runs on a connection of its own, so a lease made meanwhile is answered
    at once, and the ledger still reads what was committed."""
    store = await open_store()
    await store.submit([action(clock) for _ in range(3)])
    reading, gate = _hold_ledger_reads(monkeypatch)
    ledger = asyncio.ensure_future(store.ledger())
    await wait_until(reading.is_set, 10, "the ledger read under way")
    leased = await asyncio.wait_for(store.lease(10, frozenset()), 5)
    assert (3, False) == (len(leased), ledger.done())
    gate.set()
    (line,) = await ledger
    assert (3, 3) == (line.received, line.queued)
