"""Salvage: reading what can be read of a damaged file, and importing it again."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from valmi_sidecar.store import ReadOnlyDatabase, SalvageReport

from .conftest import OpenStore, action


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
