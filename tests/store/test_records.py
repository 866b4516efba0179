"""Each record is defined once: its ``SELECT`` lists name columns the schema has, and every
field of a new event is stored. On a freshly opened store's file; no mocks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from valmi_sidecar.events import NewEvent, parse_one
from valmi_sidecar.store import DeadLetterRecord, LedgerRow, QueuedEvent, Store, sql
from valmi_sidecar.store.sql import record_fields

from .conftest import T0, OpenStore


def table_columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store()


@pytest.mark.parametrize(
    ("record", "table", "expressions"),
    [
        (DeadLetterRecord, "dead_letters", set()),
        (LedgerRow, "ledger", set()),
        # The lease reads the age of an event from AGE_FROM, an expression.
        (QueuedEvent, "events", {"received_at"}),
    ],
)
async def test_a_records_fields_are_columns_of_its_table(
    store: Store, record: type, table: str, expressions: set[str]
) -> None:
    columns = table_columns(store.path, table)
    assert columns
    assert set() == set(record_fields(record)) - expressions - columns


@pytest.mark.parametrize(
    "statement",
    [
        f"SELECT {sql.DL_COLUMNS} FROM dead_letters",
        f"SELECT {sql.LEDGER_COLUMNS} FROM ledger",
        f"SELECT {sql.KEY_COLUMNS} FROM keys",
        f"SELECT {sql.SALVAGE_COLUMNS} FROM events",
        sql.LEASE.replace("?", "0"),
        sql.OLDEST,
    ],
)
async def test_every_select_list_names_columns_that_exist(store: Store, statement: str) -> None:
    """A list with a column the schema lacks (or an expression over one) fails to prepare."""
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True) as conn:
        assert [] == conn.execute(statement).fetchall()  # a fresh file: no rows, no error


async def test_the_select_lists_read_each_record_in_its_field_order() -> None:
    assert ", ".join(record_fields(DeadLetterRecord)) == sql.DL_COLUMNS
    assert ", ".join(record_fields(LedgerRow)) == sql.LEDGER_COLUMNS


async def test_every_field_of_a_new_event_is_stored(store: Store) -> None:
    """Read back by column name, field by field: a field added to ``NewEvent`` and not
    stored by the group write fails here (``fingerprint`` is the key's, below)."""
    body = b'{"agent_key": "agent-distinct", "outcome_type": "type-distinct", "value": 12.75}'
    event = parse_one("outcome", body, idem_key="key-distinct", now=T0 + 0.25)
    await store.submit([event])
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        (row,) = conn.execute("SELECT * FROM events").fetchall()
        (key,) = conn.execute("SELECT * FROM keys").fetchall()
    names = [name for name in record_fields(NewEvent) if name != "fingerprint"]
    stored_columns = set(row.keys())
    assert set() == set(names) - stored_columns, "NewEvent fields with no column in events"
    assert {n: getattr(event, n) for n in names} == {n: row[n] for n in names}
    assert (event.idem_key, event.fingerprint) == (key["idem_key"], key["fingerprint"])


async def test_a_key_row_leaves_out_what_it_can_derive_and_reads_back_whole(
    store: Store,
) -> None:
    """A key the sidecar made is the event's id, and ``created_at`` is the receipt time's
    formatting: the row stores neither (a day of keys is kept), and reads back both."""
    event = parse_one("action", b'{"agent_key": "a", "action_type": "llm_call"}', now=T0 + 0.25)
    assert event.id == event.idem_key
    await store.submit([event])
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True) as conn:
        assert [("", "")] == conn.execute("SELECT id, created_at FROM keys").fetchall()
        ((key, id_, _, _, created_at),) = conn.execute(
            f"SELECT {sql.KEY_COLUMNS} FROM keys"
        ).fetchall()
    assert (event.idem_key, event.id, event.created_at) == (
        key.decode(),
        id_.decode(),
        created_at.decode(),
    )


async def test_no_key_row_keeps_its_created_at_whatever_the_clock_read(store: Store) -> None:
    """The clock reads fractions of a millisecond, which ``created_at`` truncates and
    SQLite's formatting rounds: the receipt time is cut to the millisecond it shows, so
    every key row leaves ``created_at`` out (before, about half kept 24 bytes of it for
    the de-dup window) and the stored receipt time still reads back as that text."""
    body = b'{"agent_key": "a", "action_type": "llm_call"}'
    # Fractions spread over the millisecond, half of them past its middle.
    events = [parse_one("action", body, now=T0 + i / 997) for i in range(400)]
    await store.submit(events)
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True) as conn:
        stored = conn.execute("SELECT count(*) FROM keys WHERE created_at != ''").fetchone()[0]
        formatted = [
            conn.execute(
                "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', ?, 'unixepoch')", (e.received_at,)
            ).fetchone()[0]
            for e in events
        ]
    assert (0, [e.created_at for e in events]) == (stored, formatted)
    assert [e.created_at[20:23] for e in events[:3]] == ["000", "001", "002"]
