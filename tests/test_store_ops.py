"""Store operations for operators on real SQLite files: re-queue, purge, import (salvage),
the ledger's migration, and the read-only database."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from valmi_sidecar.events import NewEvent, parse_one
from valmi_sidecar.store import (
    MIGRATIONS,
    DeadLetter,
    DeadLetterFilter,
    Delivered,
    QueueFullError,
    ReadOnlyDatabase,
    SalvageReport,
    Store,
    utc_day,
)

OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    stores: list[Store] = []

    async def open_(**kw: object) -> Store:
        store = await Store.open(tmp_path / "data", prune_interval_s=None, **kw)  # type: ignore[arg-type]
        stores.append(store)
        return store

    try:
        yield open_
    finally:
        for store in stores:
            await store.close()


def action(agent: str = "agent_a", key: str | None = None) -> NewEvent:
    raw = b'{"agent_key": "' + agent.encode() + b'", "action_type": "llm_call"}'
    return parse_one("action", raw, idem_key=key, now=time.time())


async def dead_letter(store: Store, n: int) -> list[str]:
    """Submit ``n`` events and dead-letter them; their ids."""
    await store.submit([action() for _ in range(n)])
    leased = await store.lease(n, frozenset())
    await store.settle([DeadLetter(e.seq, "rejected", 400, "HTTP 400") for e in leased])
    return [e.id for e in leased]


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


async def test_dead_letter_filters_by_age_and_agent(open_store: OpenStore) -> None:
    store = await open_store()
    await dead_letter(store, 2)
    now = time.time()
    assert 2 == await store.count_dead_letters(DeadLetterFilter(dead_after=now - 60))
    assert 0 == await store.count_dead_letters(DeadLetterFilter(dead_before=now - 60))
    assert 0 == await store.count_dead_letters(DeadLetterFilter(agent_key="agent_z"))
    first = (await store.dead_letters(1))[0]
    page = await store.dead_letters(10, DeadLetterFilter(after_seq=first.seq))
    assert 1 == len(page)
    assert first.seq < page[0].seq


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


async def test_salvage_skips_rows_that_could_not_be_queued_again(
    open_store: OpenStore, tmp_path: Path
) -> None:
    """Damage can leave values ingest never makes: a receipt time with no UTC day (the
    writer could not book it; here in the key row's copy too) or a key that cannot be a
    header. Such rows count as unreadable; the rest is salvaged and imports."""
    store = await open_store()
    await store.submit([action(key=f"k-{i}") for i in range(4)])
    await store.close()
    moved = tmp_path / "moved.db"
    (tmp_path / "data" / "queue.db").rename(moved)
    with sqlite3.connect(moved) as db:
        db.execute("UPDATE events SET received_at = 1e300 WHERE idem_key = 'k-1'")
        db.execute("UPDATE keys SET received_at = 1e300 WHERE idem_key = 'k-1'")
        db.execute("UPDATE events SET idem_key = 'k\r\n2' WHERE idem_key = 'k-2'")
        db.execute("UPDATE keys SET idem_key = 'k\r\n2' WHERE idem_key = 'k-2'")
    report = SalvageReport()
    with ReadOnlyDatabase(moved) as ro:
        salvaged = [e for chunk in ro.salvage(report) for e in chunk]
    assert ["k-0", "k-3"] == [e.idem_key for e in salvaged]
    assert (2, 2) == (report.read, len(report.unreadable))
    fresh = await open_store()  # a new, empty queue.db where the old one was
    assert 2 == (await fresh.import_events(salvaged)).imported


async def test_migration_fills_the_ledger_from_what_a_v1_database_holds(tmp_path: Path) -> None:
    """Queued and dead-lettered events are still stored: their lines are exact; events
    delivered before the ledger are one line with empty names."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    db = sqlite3.connect(data / "queue.db")
    db.executescript(f"PRAGMA journal_mode = WAL; {MIGRATIONS[0]} PRAGMA user_version = 1;")
    received = time.time()
    body = b'{"agent_key":"a","outcome_type":"sale","value":2.5}'
    row = ("id", "k", "outcome", body, len(body), "a", "sale", 2.5, received, "t")
    db.execute(
        "INSERT INTO events (seq, id, idem_key, kind, body, size, agent_key, event_type, value,"
        " received_at, created_at) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        row,
    )
    db.execute(
        "INSERT INTO dead_letters (seq, id, idem_key, kind, body, agent_key, event_type, value,"
        " received_at, created_at, dead_at, reason, status, detail, attempts)"
        " VALUES (2, 'id2', 'k2', 'outcome', ?, 'a', 'sale', 4.0, ?, 't', ?, 'rejected', 400, '', 1)",
        (body, received, received),
    )
    db.execute(
        "UPDATE counters SET value = CASE name WHEN 'received' THEN 7 WHEN 'delivered' THEN 5"
        " WHEN 'dead_lettered' THEN 1 ELSE 0 END"
    )
    db.commit()
    db.close()

    store = await Store.open(data, prune_interval_s=None)
    try:
        rows = await store.ledger()
    finally:
        await store.close()
    by_day = {r.day: r for r in rows}
    today = by_day[utc_day(received)]
    assert (2, 1, 0, 1, 6.5, 4.0) == (
        today.received,
        today.queued,
        today.delivered,
        today.dead_lettered,
        today.received_value,
        today.dead_lettered_value,
    )
    before = by_day[""]
    assert (5, 5) == (before.received, before.delivered)
    assert 7 == sum(r.received for r in rows)
    with ReadOnlyDatabase(data / "queue.db") as ro:
        assert 7 == sum(r.received for r in ro.ledger())
        assert [] == ro.integrity_check()
