"""Salvage on real database files damaged in several ways: it finishes, queues again every
event that can still be read exactly as it was written, names what it could not, and
leaves nothing new beside the moved-aside file."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SidecarProcessFactory
from tests.test_dead_letters import free_port, run_cli
from valmi_sidecar.events import NewEvent, parse_one
from valmi_sidecar.store import Store

MOVED = "queue.db.corrupt-20260101T000000Z"
PAGE_HEADER_1 = 100  # the file header before page 1's own


@dataclass(frozen=True)
class Written:
    """What the store was given, by event id."""

    events: dict[str, NewEvent]
    #: The events table's leaf pages (1-based) and the seqs each held, before the damage.
    leaves: dict[int, list[int]]
    root: int
    ids_by_seq: dict[int, str]


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        byte = buf[at + i]
        if i == 8:
            return (value << 8) | byte, at + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    raise AssertionError("unreachable")


def table_leaves(path: Path, root: int) -> dict[int, list[int]]:
    """The leaf pages of a table b-tree and the rowids on each, read from the file format."""
    data = path.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    leaves: dict[int, list[int]] = {}
    todo = [root]
    while todo:
        page = todo.pop()
        base = (page - 1) * page_size
        head = base + (PAGE_HEADER_1 if page == 1 else 0)
        kind, cells = data[head], int.from_bytes(data[head + 3 : head + 5], "big")
        header = 12 if kind == 0x05 else 8
        pointers = [
            base + int.from_bytes(data[head + header + 2 * i : head + header + 2 * i + 2], "big")
            for i in range(cells)
        ]
        if kind == 0x05:  # interior: a child per cell, and the right-most one
            todo += [int.from_bytes(data[p : p + 4], "big") for p in pointers]
            todo.append(int.from_bytes(data[head + 8 : head + 12], "big"))
        else:
            assert 0x0D == kind, f"page {page} is not a table b-tree page"
            rowids = []
            for p in pointers:
                _, after = _varint(data, p)
                rowids.append(_varint(data, after)[0])
            leaves[page] = rowids
    return leaves


async def write_queue(tmp_path: Path, n: int = 150) -> tuple[Path, Written]:
    """A real store's database of ``n`` queued events (actions and outcomes, some with a
    client's key), moved aside as the service does; what was written."""
    data_dir = tmp_path / "old"
    store = await Store.open(data_dir, prune_interval_s=None)
    events: list[NewEvent] = []
    for i in range(n):
        if i % 3 == 0:
            raw = {"agent_key": f"agent_{i:05d}", "outcome_type": "sale", "value": i + 0.5}
            kind = "outcome"
        else:
            raw = {"agent_key": f"agent_{i:05d}", "action_type": "llm_call"}
            kind = "action"
        raw["metadata"] = {"i": i, "pad": "p" * 200}
        key = f"client-{i}" if i % 2 else None
        events.append(parse_one(kind, json.dumps(raw).encode(), idem_key=key, now=time.time()))  # type: ignore[arg-type]
    await store.submit(events)
    await store.close()
    moved = tmp_path / "aside" / MOVED
    moved.parent.mkdir()
    (data_dir / "queue.db").rename(moved)
    with closing(sqlite3.connect(f"{moved.as_uri()}?mode=ro&immutable=1", uri=True)) as db:
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events'").fetchone()
        ids_by_seq = dict(db.execute("SELECT seq, id FROM events"))
    assert n == len(ids_by_seq)
    written = Written({e.id: e for e in events}, table_leaves(moved, root), root, ids_by_seq)
    assert len(written.leaves) >= 3, "too few leaf pages to damage some and keep others"
    return moved, written


async def salvage(moved: Path, data_dir: Path) -> tuple[int, str, str]:
    nowhere = f"http://127.0.0.1:{free_port()}"
    return await run_cli("salvage", str(moved), "--data-dir", str(data_dir), "--url", nowhere)


def queued(data_dir: Path) -> dict[str, tuple[str, str, bytes, float, bytes]]:
    """What the new queue holds, by id: key, kind, body, receipt time, fingerprint."""
    if not (data_dir / "queue.db").exists():  # nothing was salvaged into it
        return {}
    with closing(sqlite3.connect(data_dir / "queue.db")) as db:
        rows = db.execute(
            "SELECT e.id, e.idem_key, e.kind, e.body, e.received_at, k.fingerprint"
            " FROM events e JOIN keys k USING (idem_key)"
        ).fetchall()
    return {r[0]: (r[1], r[2], bytes(r[3]), r[4], bytes(r[5])) for r in rows}


def as_written(event: NewEvent) -> tuple[str, str, bytes, float, bytes]:
    return (event.idem_key, event.kind, event.body, event.received_at, event.fingerprint)


def damage_pages(path: Path, pages: list[int], fill: Callable[[int], bytes]) -> None:
    page_size = int.from_bytes(path.read_bytes()[16:18], "big")
    with path.open("r+b") as f:
        for page in pages:
            f.seek((page - 1) * page_size)
            f.write(fill(page_size))


def check_salvaged(
    code: int, out: str, err: str, data_dir: Path, written: Written, intact: set[int]
) -> dict[str, tuple[str, str, bytes, float, bytes]]:
    """Salvage finished; every event it queued is exactly as written; every event whose
    seq is in ``intact`` is among them; the others are named or their seqs reported."""
    assert 0 == code, out + err
    assert "Traceback" not in err
    got = queued(data_dir)
    assert {i: as_written(written.events[i]) for i in got} == got
    assert {written.ids_by_seq[s] for s in intact} <= set(got)
    first = out.splitlines()[0]
    assert first.startswith(f"salvaged {len(got)} events from "), out
    damaged = damaged_seqs(out)
    for seq, event_id in written.ids_by_seq.items():
        if event_id not in got:
            named = f"unreadable: {event_id}" in out
            assert named or seq in damaged, f"{event_id} (seq {seq}) vanished silently:\n{out}"
    return got


def damaged_seqs(out: str) -> set[int]:
    """The seqs that salvage's summary reports as in damaged pages."""
    found: set[int] = set()
    for line in out.splitlines():
        if line.startswith("damaged: no row with seq"):
            first, _, last = line.split()[5].partition("-")
            found.update(range(int(first), int(last or first) + 1))
    return found


def untouched_beside(moved: Path) -> None:
    assert [moved.name] == sorted(p.name for p in moved.parent.iterdir())


async def test_salvage_reads_past_a_damaged_leaf_page_of_the_events_table(tmp_path: Path) -> None:
    """The issue's file: bytes 2000-3000 of an events leaf page overwritten with 00 ff."""
    moved, written = await write_queue(tmp_path)
    page = sorted(written.leaves)[1]
    page_size = int.from_bytes(moved.read_bytes()[16:18], "big")
    with moved.open("r+b") as f:
        f.seek((page - 1) * page_size + 2000)
        f.write(b"\x00\xff" * 500)
    intact = {s for p, seqs in written.leaves.items() if p != page for s in seqs}

    code, out, err = await salvage(moved, tmp_path / "data")
    got = check_salvaged(code, out, err, tmp_path / "data", written, intact)
    assert len(got) < len(written.events)  # the page held events that are gone
    untouched_beside(moved)

    # Again: nothing crashes, nothing is stored twice.
    code, out, err = await salvage(moved, tmp_path / "data")
    assert 0 == code, err
    assert out.startswith(f"salvaged 0 events from {moved} ({len(got)} already queued"), out
    assert got == queued(tmp_path / "data")
    untouched_beside(moved)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_salvage_reads_past_random_damaged_pages(tmp_path: Path, seed: int) -> None:
    """Random bytes over random pages (never page 1: without its schema nothing can be
    read, and that is said, tested below)."""
    moved, written = await write_queue(tmp_path)
    page_size = int.from_bytes(moved.read_bytes()[16:18], "big")
    pages = moved.stat().st_size // page_size
    rng = random.Random(seed)
    hit = rng.sample(range(2, pages + 1), 4)
    damage_pages(moved, hit, rng.randbytes)
    intact = (
        set()
        if written.root in hit
        else {s for p, seqs in written.leaves.items() if p not in hit for s in seqs}
    )

    code, out, err = await salvage(moved, tmp_path / "data")
    check_salvaged(code, out, err, tmp_path / "data", written, intact)
    untouched_beside(moved)


async def test_salvage_of_a_truncated_file_queues_what_is_left(tmp_path: Path) -> None:
    moved, written = await write_queue(tmp_path)
    page_size = int.from_bytes(moved.read_bytes()[16:18], "big")
    keep = (moved.stat().st_size // page_size) * 6 // 10
    os.truncate(moved, keep * page_size)
    intact = (
        set()
        if written.root > keep
        else {s for p, seqs in written.leaves.items() if p <= keep for s in seqs}
    )

    code, out, err = await salvage(moved, tmp_path / "data")
    got = check_salvaged(code, out, err, tmp_path / "data", written, intact)
    assert 0 < len(got) < len(written.events)
    untouched_beside(moved)


async def test_salvage_judges_text_columns_with_invalid_utf8(tmp_path: Path) -> None:
    """Invalid UTF-8 where text was (once a traceback), and other damaged fields: an event
    whose damaged field has a second copy that agrees with the rest (the body and its
    fingerprint, the key row's id and receipt time) is queued as written; one whose body
    or kind is damaged, whose body no longer matches its fingerprint, or whose copies
    disagree, is named and skipped."""
    moved, written = await write_queue(tmp_path, n=40)
    by_seq = written.ids_by_seq
    # On disk, as a bad sector leaves it: the agent_key column of seq 5 (not its body).
    name = json.loads(written.events[by_seq[5]].body)["agent_key"].encode()
    data = bytearray(moved.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    (page,) = [p for p, seqs in written.leaves.items() if 5 in seqs]
    start, end = (page - 1) * page_size, page * page_size
    at = [i for i in range(start, end) if data.startswith(name, i) and data[i - 1] != ord('"')]
    assert 1 == len(at)
    data[at[0] : at[0] + len(name)] = b"\xff" * len(name)
    moved.write_bytes(bytes(data))
    with closing(sqlite3.connect(moved)) as db, db:  # closed: the WAL goes back into the file
        db.execute("UPDATE events SET event_type = CAST(x'c3' AS TEXT) WHERE seq = 6")
        db.execute("UPDATE events SET id = CAST(x'ff00' AS TEXT) WHERE seq = 7")
        db.execute("UPDATE events SET body = x'7b22ff' WHERE seq = 8")
        db.execute("UPDATE events SET kind = CAST(x'fe' AS TEXT) WHERE seq = 9")
        db.execute(
            "UPDATE events SET body = CAST(replace(CAST(body AS TEXT), '\"agent_0', '\"agent-0')"
            " AS BLOB) WHERE seq = 10"
        )
        # A receipt time damaged in the row, confirmed by its key row and created_at.
        db.execute("UPDATE events SET received_at = 1.25e-221 WHERE seq = 11")
        # Damaged in every copy: the row's, its created_at and its key row's.
        db.execute("UPDATE events SET received_at = 12345.678, created_at = 'x' WHERE seq = 12")
        db.execute(
            "UPDATE keys SET received_at = 0.5, created_at = 'y'"
            " WHERE id = (SELECT id FROM events WHERE seq = 12)"
        )
        # An id readable but not the one its key row holds: which copy is right is unknown.
        db.execute("UPDATE events SET id = 'evt_bogus' WHERE seq = 13")

    code, out, err = await salvage(moved, tmp_path / "data")
    assert 0 == code, out + err
    got = queued(tmp_path / "data")
    assert set(by_seq.values()) - {by_seq[s] for s in (8, 9, 10, 12, 13)} == set(got)
    assert {i: as_written(written.events[i]) for i in got} == got
    assert f"unreadable: {by_seq[8]} (seq 8): its body is damaged" in out
    assert f"unreadable: {by_seq[9]} (seq 9): its kind is neither action nor outcome" in out
    assert (
        f"unreadable: {by_seq[10]} (seq 10): its body does not match the fingerprint stored" in out
    )
    assert f"unreadable: {by_seq[12]} (seq 12): its receipt time is damaged" in out
    assert (
        f"unreadable: {by_seq[13]} (seq 13): its id column reads 'evt_bogus', not the id its"
        " key row holds" in out
    )
    assert "5 unreadable rows skipped" in out.splitlines()[0]
    untouched_beside(moved)


async def test_salvage_of_a_file_whose_schema_page_is_gone_says_so_and_exits_1(
    tmp_path: Path,
) -> None:
    moved, _ = await write_queue(tmp_path, n=40)
    page_size = int.from_bytes(moved.read_bytes()[16:18], "big")
    with moved.open("r+b") as f:
        f.seek(PAGE_HEADER_1)
        f.write(b"\x00" * (page_size - PAGE_HEADER_1))

    code, out, err = await salvage(moved, tmp_path / "data")
    assert 1 == code, out + err
    assert "Traceback" not in err
    assert f"cannot read {moved}" in err
    untouched_beside(moved)


async def test_salvage_check_and_from_read_a_file_with_its_own_wal_without_changing_it(
    tmp_path: Path,
) -> None:
    """A file moved aside after a crash keeps committed events in its WAL: they are read
    from a private copy, and nothing new appears beside the file."""
    data_dir = tmp_path / "old"
    store = await Store.open(data_dir, prune_interval_s=None)
    events = [
        parse_one("action", b'{"agent_key":"a","action_type":"llm_call"}', now=time.time())
        for _ in range(30)
    ]
    await store.submit(events)
    aside = tmp_path / "aside"
    aside.mkdir()
    # Copied while the store is open, as a crash leaves it: the commits are in the WAL.
    assert (data_dir / "queue.db-wal").stat().st_size > 0
    shutil.copyfile(data_dir / "queue.db", aside / MOVED)
    shutil.copyfile(data_dir / "queue.db-wal", aside / (MOVED + "-wal"))
    await store.close()
    moved = aside / MOVED
    before = {p.name: p.read_bytes() for p in aside.iterdir()}

    code, out, err = await salvage(moved, tmp_path / "data")
    assert 0 == code, err
    assert out.startswith(f"salvaged 30 events from {moved} (0 already queued"), out
    nowhere = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run_cli("check", str(moved), "--url", nowhere)
    assert (0, f"{moved}: ok") == (code, out.strip()), err
    code, out, err = await run_cli(
        "dead-letters", "list", "--from", str(moved), "--json", "--url", nowhere
    )
    assert (0, []) == (code, json.loads(out)), err
    assert before == {p.name: p.read_bytes() for p in aside.iterdir()}
    assert {e.id for e in events} == set(queued(tmp_path / "data"))


async def test_salvage_past_a_damaged_root_page_names_every_event_and_finishes(
    tmp_path: Path,
) -> None:
    """No row of the table can be reached: each seq the index lists is looked up (not
    every number up to the highest seq, here past ten million), and the keys table
    names every queued event that is lost."""
    moved, written = await write_queue(tmp_path, n=60)
    with closing(sqlite3.connect(moved)) as db, db:
        db.execute("UPDATE events SET seq = seq + 10000000")  # a long-lived queue
        db.execute("UPDATE sqlite_sequence SET seq = seq + 10000000 WHERE name = 'events'")
    written = Written(
        written.events,
        written.leaves,
        written.root,
        {s + 10_000_000: i for s, i in written.ids_by_seq.items()},
    )
    damage_pages(moved, [written.root], lambda size: b"\xde\xad" * (size // 2))

    started = time.monotonic()
    code, out, err = await salvage(moved, tmp_path / "data")
    assert time.monotonic() - started < 30
    got = check_salvaged(code, out, err, tmp_path / "data", written, set())
    assert {} == got
    assert (
        f"salvaged 0 events from {moved} (0 already queued, 0 with a reused key skipped, 60 " in out
    )
    assert all(f"unreadable: {i}: queued, says the keys table" in out for i in written.events)
    assert "damaged: no row with seqs 10000001-10000060 could be read" in out
    untouched_beside(moved)


async def test_salvage_of_a_damaged_file_through_a_running_sidecar(
    tmp_path: Path, sidecar_process: SidecarProcessFactory
) -> None:
    moved, written = await write_queue(tmp_path)
    page = sorted(written.leaves)[2]
    damage_pages(moved, [page], lambda size: b"\x00\xff" * (size // 2))
    intact = {s for p, seqs in written.leaves.items() if p != page for s in seqs}
    data_dir = tmp_path / "data"
    sidecar = sidecar_process(None, data_dir=data_dir)  # no upstream: all stays queued
    url = await sidecar.wait_ready()

    code, out, err = await run_cli("salvage", str(moved), "--url", url, "--data-dir", str(data_dir))
    sidecar.signal(signal.SIGTERM)
    assert 0 == await sidecar.wait_exit()
    got = check_salvaged(code, out, err, data_dir, written, intact)
    assert len(intact) <= len(got) < len(written.events)
    untouched_beside(moved)


async def test_salvage_checks_keys_and_ids_against_their_second_copies(tmp_path: Path) -> None:
    """The key row holds a second copy of an event's key and id: an unreadable key is
    taken from it; a readable key that differs from it is named, not guessed. Without a
    key row, a key the sidecar made must be the id, and the id must carry the receipt
    time; an event that passes is queued and counted as unchecked."""
    moved, written = await write_queue(tmp_path, n=40)
    by_seq = written.ids_by_seq
    assert by_seq[15] == written.events[by_seq[15]].idem_key  # the sidecar's own keys
    assert "client-15" == written.events[by_seq[16]].idem_key
    # By key: a key row leaves out an id that is its key (the sidecar's own keys).
    drop_key_row = "DELETE FROM keys WHERE idem_key = (SELECT idem_key FROM events WHERE seq = ?)"
    with closing(sqlite3.connect(moved)) as db, db:
        db.execute("UPDATE events SET idem_key = CAST(x'ff' AS TEXT) WHERE seq = 14")
        db.execute("UPDATE events SET idem_key = 'client-15x' WHERE seq = 16")
        for seq in (15, 17, 19):
            db.execute(drop_key_row, (seq,))
        db.execute("UPDATE events SET idem_key = substr(id, 1, 31) || 'x' WHERE seq = 15")
        db.execute("UPDATE events SET id = 'evt_000000000001' || substr(id, 17) WHERE seq = 19")
        db.execute("UPDATE events SET idem_key = id WHERE seq = 19")

    code, out, err = await salvage(moved, tmp_path / "data")
    assert 0 == code, out + err
    got = queued(tmp_path / "data")
    assert set(by_seq.values()) - {by_seq[s] for s in (15, 16, 19)} == set(got)
    assert {i: as_written(written.events[i]) for i in got} == got
    assert (
        f"unreadable: {by_seq[16]} (seq 16): its idempotency key column reads 'client-15x',"
        " its key row 'client-15'" in out
    )
    assert f"(seq 15): its idempotency key '{by_seq[15][:31]}x' is not its id" in out
    assert "(seq 19): its id and its receipt time disagree" in out
    assert "unchecked: 1 of the events queued again had no key row left" in out
    untouched_beside(moved)


async def test_a_body_with_a_key_the_sidecar_made_is_checked_against_its_fingerprint(
    tmp_path: Path,
) -> None:
    """Why ingest fingerprints every body, not only those sent with a client's key: a body
    damaged where no column copies it (its metadata) still decodes as a valid event with
    the same agent key and type, and only the fingerprint in its key row tells it apart."""
    moved, written = await write_queue(tmp_path, n=40)
    by_seq = written.ids_by_seq
    assert by_seq[21] == written.events[by_seq[21]].idem_key  # the sidecar's own key
    with closing(sqlite3.connect(moved)) as db, db:
        db.execute(
            'UPDATE events SET body = CAST(replace(CAST(body AS TEXT), \'"pad":"ppp\','
            ' \'"pad":"qpp\') AS BLOB) WHERE seq = 21'
        )
        (damaged,) = db.execute("SELECT body FROM events WHERE seq = 21").fetchone()
    assert written.events[by_seq[21]].body != damaged

    code, out, err = await salvage(moved, tmp_path / "data")
    assert 0 == code, out + err
    got = queued(tmp_path / "data")
    assert set(by_seq.values()) - {by_seq[21]} == set(got)
    assert {i: as_written(written.events[i]) for i in got} == got
    assert (
        f"unreadable: {by_seq[21]} (seq 21): its body does not match the fingerprint stored" in out
    )
    untouched_beside(moved)
