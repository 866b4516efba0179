"""The schema: a fresh file in WAL mode at the current version, a newer version refused,
and the migrations of an old file (its ledger, its counts)."""

from __future__ import annotations

import calendar
import sqlite3
import time
from pathlib import Path

import pytest

from valmi_sidecar.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Counts,
    Delivered,
    LedgerRow,
    ReadOnlyDatabase,
    Store,
    StoreError,
    utc_day,
)

from .conftest import OpenStore, action, rows


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


async def test_counts_become_the_ledgers_totals_and_keep_what_came_before_it(
    tmp_path: Path,
) -> None:
    """From version 4 a commit writes no counter row: received, delivered and dead-lettered
    are the ledger's totals. A file counted events before its ledger existed (version 1):
    the migration keeps that difference, so the counts read the same before and after."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    db = sqlite3.connect(data / "queue.db")
    scripts = " ".join(MIGRATIONS[:3])
    db.executescript(f"PRAGMA journal_mode = WAL; {scripts} PRAGMA user_version = 3;")
    # Two deliveries before the ledger existed: the counters hold them, the ledger not.
    db.execute(
        "INSERT INTO ledger (agent_key, kind, event_type, day, received, delivered,"
        " dead_lettered) VALUES ('a', 'action', 'llm_call', '2026-11-30', 5, 4, 1)"
    )
    db.execute(
        "UPDATE counters SET value = CASE name WHEN 'received' THEN 7 WHEN 'delivered' THEN 6"
        " WHEN 'dead_lettered' THEN 1 ELSE 2 END"
    )
    db.commit()
    db.close()

    def counts(c: Counts) -> tuple[int, int, int, int]:
        return (c.received, c.delivered, c.dead_lettered, c.duplicates)

    with ReadOnlyDatabase(data / "queue.db") as ro:
        assert (7, 6, 1, 2) == counts(ro.counts())  # version 3: the counters as they are
    store = await Store.open(data, prune_interval_s=None)
    try:
        assert (7, 6, 1, 2) == counts(store.counts())
        await store.submit([action(key="k")])
        await store.submit([action(key="k")])  # a duplicate: counted apart
        (leased,) = await store.lease(1, frozenset())
        await store.settle([Delivered(leased.seq)])
        assert (8, 7, 1, 3) == counts(store.counts())
    finally:
        await store.close()
    with ReadOnlyDatabase(data / "queue.db") as ro:
        assert SCHEMA_VERSION == ro.version
        assert (8, 7, 1, 3) == counts(ro.counts())
        assert 8 == sum(r.received for r in ro.ledger()) + 2  # the two from before it
    store = await Store.open(data, prune_interval_s=None)
    try:
        assert (8, 7, 1, 3) == counts(store.counts())
    finally:
        await store.close()


async def test_the_queue_leaves_the_ledger_table_and_the_ledger_reads_the_same(
    tmp_path: Path,
) -> None:
    """From version 5 the ledger table counts an event's receipt once it is settled; the
    queue is counted from the events table. A version 4 file counted its queued events in
    the table: the migration takes them out, and the ledger and the counts read the same
    before and after, and after the queue is delivered."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    db = sqlite3.connect(data / "queue.db")
    db.executescript(
        f"PRAGMA journal_mode = WAL; {' '.join(MIGRATIONS[:4])} PRAGMA user_version = 4;"
    )
    day = "2026-11-30"
    received_at = calendar.timegm(time.strptime(f"{day} 12:00", "%Y-%m-%d %H:%M"))
    queued = [  # (agent, kind, type, value): two actions of a, one outcome of b
        ("a", "action", "llm_call", None),
        ("a", "action", "llm_call", None),
        ("b", "outcome", "resolved", 2.5),
    ]
    for seq, (agent, kind, type_, value) in enumerate(queued, start=1):
        db.execute(
            "INSERT INTO events (seq, id, idem_key, kind, body, size, agent_key, event_type,"
            " value, received_at, created_at) VALUES (?, ?, ?, ?, '{}', 2, ?, ?, ?, ?, ?)",
            (seq, f"id{seq}", f"k{seq}", kind, agent, type_, value, received_at, day),
        )
    # As version 4 wrote it: the queued events received, and two of a's delivered before.
    db.executescript(
        "INSERT INTO ledger (agent_key, kind, event_type, day, received, delivered,"
        f" received_value) VALUES ('a', 'action', 'llm_call', '{day}', 4, 2, 0),"
        f" ('b', 'outcome', 'resolved', '{day}', 1, 0, 2.5);"
    )
    db.commit()
    db.close()

    def lines(rows_: list[LedgerRow]) -> list[tuple[object, ...]]:
        return [(r.agent_key, r.received, r.delivered, r.received_value) for r in rows_]

    def counts(c: Counts) -> tuple[int, int, int]:
        return (c.received, c.queued, c.delivered)

    expected = [("a", 4, 2, 0.0), ("b", 1, 0, 2.5)]
    with ReadOnlyDatabase(data / "queue.db") as ro:
        assert expected == lines(ro.ledger())
        assert (5, 3, 2) == counts(ro.counts())
    store = await Store.open(data, prune_interval_s=None)
    try:
        assert expected == lines(await store.ledger())
        assert (5, 3, 2) == counts(store.counts())
        assert [("a", 2), ("b", 0)] == rows(
            store, "SELECT agent_key, received FROM ledger ORDER BY agent_key"
        )
        leased = await store.lease(3, frozenset())
        await store.settle([Delivered(e.seq) for e in leased])
        assert [("a", 4, 4, 0.0), ("b", 1, 1, 2.5)] == lines(await store.ledger())
        assert (5, 0, 5) == counts(store.counts())
    finally:
        await store.close()
    with ReadOnlyDatabase(data / "queue.db") as ro:
        assert (SCHEMA_VERSION, (5, 0, 5)) == (ro.version, counts(ro.counts()))
        assert [("a", 4, 4, 0.0), ("b", 1, 1, 2.5)] == lines(ro.ledger())
