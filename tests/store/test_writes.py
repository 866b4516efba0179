"""What one transaction writes: de-duplication by key, conflicts, batches, settlements."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import wait_until
from valmi_sidecar.events import parse_batch, parse_one
from valmi_sidecar.store import (
    Accepted,
    DeadLetter,
    DeadLetterFilter,
    Delivered,
    IdempotencyConflictError,
    ReadOnlyDatabase,
    Retry,
    Store,
    StoreError,
    sql,
    writes,
)

from .conftest import DAY, Clock, OpenStore, action, dead_letter, outcome, rows


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


@pytest.mark.parametrize("group", [1, writes.ONE_CALL_MIN_SUBMITS + 2])
async def test_key_expires_after_window_once_delivered(
    open_store: OpenStore, clock: Clock, group: int
) -> None:
    """An expired key's row is replaced by the new event's: in a group of its own (the
    statements) and in a large one (the TEMP view's trigger)."""
    store = await open_store()
    (first,) = await store.submit([action(clock, key="k1", kind="llm_call")])
    (leased,) = await store.lease(1, frozenset())
    await store.settle([Delivered(leased.seq)])
    clock.t += DAY - 1
    with pytest.raises(IdempotencyConflictError):
        await store.submit([action(clock, key="k1", kind="tool_call")])
    clock.t += 2
    commits = store.commits
    (second,), *_ = await asyncio.gather(
        store.submit([action(clock, key="k1", kind="tool_call")]),
        *(store.submit([action(clock)]) for _ in range(group - 1)),
    )
    assert commits + 1 == store.commits
    assert not second.duplicate
    assert first.id != second.id
    assert [(second.id, 0)] == rows(store, "SELECT id, state FROM keys WHERE idem_key = 'k1'")


async def test_key_of_a_queued_event_does_not_expire(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    (first,) = await store.submit([action(clock, key="k1")])
    clock.t += 3 * DAY
    (again,) = await store.submit([action(clock, key="k1")])
    assert (first.id, True) == (again.id, again.duplicate)


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
    # As committed, read by another connection: the ledger table counts the settled
    # events, the queue the rest (schema version 5), and the counts add them up.
    assert {"received": 2, "delivered": 1, "dead_lettered": 1, "duplicates": 0} == dict(
        rows(store, sql.COUNTS)
    )
    assert [(2,)] == rows(store, "SELECT count(*) FROM events")
    with ReadOnlyDatabase(store.path) as ro:
        read = ro.counts()
        assert (4, 2, 1, 1) == (read.received, read.queued, read.delivered, read.dead_lettered)


async def test_double_settle_is_not_counted_twice(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    await store.submit([action(clock), action(clock)])
    a, b = await store.lease(2, frozenset())
    await store.settle([Delivered(a.seq), Delivered(a.seq), DeadLetter(b.seq, "x", 422, "")])
    await store.settle([Delivered(a.seq), DeadLetter(a.seq, "y", 400, ""), Delivered(b.seq)])
    c = store.counts()
    assert (2, 0, 1, 1) == (c.received, c.queued, c.delivered, c.dead_lettered)
    assert [(1,)] == rows(store, "SELECT count(*) FROM dead_letters")


@pytest.mark.parametrize("n", [1, sql.SHORT_LIST, sql.SHORT_LIST + 1, 40])
async def test_lists_of_any_length_settle_and_deduplicate(
    open_store: OpenStore, clock: Clock, n: int
) -> None:
    """Short lists are bound one value each, longer ones as JSON: both settle every event
    named, and find every stored key."""
    store = await open_store()
    keys = [f"key-{i}" for i in range(n)]
    first = await store.submit([action(clock, key=k) for k in keys])
    again = await store.submit([action(clock, key=k) for k in keys])
    assert [(a.id, True) for a in first] == [(a.id, a.duplicate) for a in again]
    leased = await store.lease(n, frozenset())
    half = n // 2
    await store.settle([Delivered(e.seq) for e in leased[half:]])  # deliveries alone
    await store.settle(
        [Delivered(e.seq) for e in leased[: half // 2]]  # mixed with dead letters
        + [DeadLetter(e.seq, "x", 400, "") for e in leased[half // 2 : half]]
    )
    c = store.counts()
    assert (n, 0, n - half + half // 2, half - half // 2, n) == (
        c.received,
        c.queued,
        c.delivered,
        c.dead_lettered,
        c.duplicates,
    )
    assert [] == rows(store, "SELECT seq FROM events")
    settled = rows(store, "SELECT state, count(*) FROM keys GROUP BY state ORDER BY state")
    expected = [(1, c.delivered), (2, c.dead_lettered)]
    assert [r for r in expected if r[1]] == settled


def test_row_chunks_are_powers_of_two_within_the_bound() -> None:
    for n in [1, 2, 3, 255, 256, 257, 300, 2_001]:
        sizes = sql.row_chunks(n)
        assert n == sum(sizes)
        assert sizes == sorted(sizes, reverse=True)
        assert all(s & (s - 1) == 0 and s <= sql.MAX_CHUNK_ROWS for s in sizes)


@pytest.mark.parametrize(
    "n",
    [1, 3, writes.ONE_CALL_MIN_SUBMITS, sql.MAX_CHUNK_ROWS, 300, writes.ONE_CALL_MAX_ROWS + 1],
)
async def test_a_group_of_any_size_stores_every_event_and_key(
    open_store: OpenStore, clock: Clock, n: int
) -> None:
    """A small group's rows go in multi-row statements, several when it passes a chunk; a
    large one's in one statement through the TEMP view, and one past ``ONE_CALL_MAX_ROWS``
    in statements again: every event is stored once, in order, with its key (a client's
    key or the sidecar's), an action's missing value as NULL and an outcome's as given."""
    store = await open_store()
    # Actions with the sidecar's key and with a client's, and outcomes.
    kinds = [
        lambda i: action(clock),
        lambda i: outcome(clock, i / 4, key=f"key-{i}"),
        lambda i: action(clock, key=f"key-{i}"),
    ]
    events = [kinds[i % 3](i) for i in range(n)]
    commits = store.commits
    accepted = await asyncio.gather(*(store.submit([e]) for e in events))
    assert commits + 1 == store.commits  # all n in one group, so in len(row_chunks(n)) rows
    assert [[e.id] for e in events] == [[a.id for a in acc] for acc in accepted]
    fields = ", ".join(sql.EVENT_FIELDS)
    stored = rows(
        store, f"SELECT seq, {fields}, typeof(body), typeof(value) FROM events ORDER BY seq"
    )
    # Every field in its column; the body a blob (bound as a bytearray, read as bytes), no
    # value a NULL (bound as a NaN).
    assert [
        (*(getattr(e, f) for f in sql.EVENT_FIELDS), "blob", "null" if e.value is None else "real")
        for e in events
    ] == [r[1:] for r in stored]
    assert list(range(stored[0][0], stored[0][0] + n)) == [r[0] for r in stored]
    keys = rows(
        store,
        f"SELECT idem_key, {sql.KEY_ID}, fingerprint, typeof(fingerprint) FROM keys"
        " ORDER BY idem_key",
    )
    assert sorted((e.idem_key, e.id, e.fingerprint, "blob") for e in events) == keys
    again = await asyncio.gather(*(store.submit([e]) for e in events if e.idem_key != e.id))
    assert all(acc[0].duplicate for acc in again)
    assert n == store.counts().queued


async def test_a_group_adds_to_every_ledger_row_it_touches(
    open_store: OpenStore, clock: Clock
) -> None:
    """A group's ledger rows go in multi-row statements: events of eleven agents delivered
    in one group (8 + 2 + 1 rows), each add to their own agent's row; the events received
    in the same group are the queue's until settled (schema version 5), and the ledger
    read adds them to the same lines."""
    store = await open_store()
    agents = [f"agent-{i:02}" for i in range(11)]
    await store.submit([action(clock, agent=a) for a in agents])
    leased = await store.lease(len(agents), frozenset())
    commits = store.commits
    await asyncio.gather(
        store.settle([Delivered(e.seq) for e in leased]),
        *(store.submit([action(clock, agent=a)]) for a in agents),
    )
    assert commits + 1 == store.commits  # the deliveries and the new events: one group
    ledger = rows(store, "SELECT agent_key, received, delivered FROM ledger ORDER BY agent_key")
    assert [(a, 1, 1) for a in agents] == ledger
    lines = await store.ledger(None, None, None)
    assert [(a, 2, 1) for a in agents] == [(r.agent_key, r.received, r.delivered) for r in lines]
    c = store.counts()
    assert (22, 11, 11) == (c.received, c.queued, c.delivered)


def _stored(store: Store) -> list[list[tuple[object, ...]]]:
    """Every row of the events, the keys and the ledger, as stored (not as read back)."""
    return [
        rows(store, f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4")
        for table in ("events", "keys", "ledger")
    ]


async def test_a_large_group_stores_the_rows_the_statements_store(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    """The same events, each in a group of its own (the statements) and all in one group
    (one statement through the TEMP view), leave the same rows: the key rows leave out
    the same derivable id and ``created_at``, and the ledger rows (four agents, actions and
    outcomes with values) add up the same."""
    events = [
        action(clock, key=f"key-{i}" if i % 3 == 0 else None, agent=f"agent-{i % 4}")
        if i % 2
        else outcome(clock, value=i / 4, key=f"out-{i}" if i % 5 == 0 else None)
        for i in range(40)
    ]
    # The first commit of a file reserves seqs (``writes.SEQ_RESERVE``), which takes the
    # statements: one event first, in both files, so that the group after it is one call.
    first = action(clock)
    one_by_one = await open_store(tmp_path / "small")
    for e in [first, *events]:
        await one_by_one.submit([e])
    together = await open_store(tmp_path / "large")
    await together.submit([first])
    commits = together.commits
    await asyncio.gather(*(together.submit([e]) for e in events))
    assert commits + 1 == together.commits  # one group of 40 submissions: one call
    assert _stored(one_by_one) == _stored(together)
    assert 41 == together.counts().queued == one_by_one.counts().queued
    # The keys de-duplicate after a reopen as before it.
    await together.close()
    reopened = await open_store(tmp_path / "large")
    again = await asyncio.gather(*(reopened.submit([e]) for e in events if e.idem_key != e.id))
    assert all(acc[0].duplicate for acc in again)
    assert (41, len(again)) == (reopened.counts().queued, reopened.counts().duplicates)


async def test_a_group_of_the_sidecars_own_keys_answers_each_submission_in_order(
    open_store: OpenStore, clock: Clock
) -> None:
    """A group whose every key is the sidecar's own is planned in one pass: each
    submission (single events and a batch among them) gets its own events' ids, the
    events take seqs in the order submitted, and each kind is counted once an event."""
    store = await open_store()
    await store.submit([action(clock)])  # the first commit reserves seqs: statements
    singles = [action(clock) if i % 3 else outcome(clock, value=i) for i in range(12)]
    batch = [outcome(clock, value=0.5), action(clock), action(clock)]
    commits = store.commits
    answers = await asyncio.gather(
        *(store.submit([e]) for e in singles[:6]),
        store.submit(batch),
        *(store.submit([e]) for e in singles[6:]),
    )
    assert commits + 1 == store.commits
    submitted = [[e] for e in singles[:6]] + [batch] + [[e] for e in singles[6:]]
    assert [[(e.id, e.created_at, False) for e in sub] for sub in submitted] == [
        [(a.id, a.created_at, a.duplicate) for a in answer] for answer in answers
    ]
    leased = await store.lease(100, frozenset())
    in_order = [e for sub in submitted for e in sub]
    assert [e.id for e in in_order] == [e.id for e in leased[1:]]
    assert sorted(e.seq for e in leased) == [e.seq for e in leased]
    kinds = [e.kind for e in in_order]
    assert {"action": 1 + kinds.count("action"), "outcome": kinds.count("outcome")} == (
        store.stats.received
    )


async def test_a_large_group_that_does_not_fit_stores_nothing(
    open_store: OpenStore, clock: Clock
) -> None:
    """A disk full in the middle of the one statement fails every submission of the group
    and leaves no row of any: the statement is its own transaction."""
    store = await open_store()
    await store.submit([action(clock)])
    before = _stored(store)
    ((pages,),) = rows(store, "PRAGMA page_count")
    await store.writer_connection.fetchall(f"PRAGMA max_page_count = {pages}")
    big = b'{"agent_key": "a", "action_type": "x", "metadata": {"blob": "' + b"x" * 3_000 + b'"}}'
    events = [parse_one("action", big, now=clock()) for _ in range(40)]
    commits = store.commits
    results = await asyncio.gather(*(store.submit([e]) for e in events), return_exceptions=True)
    assert [StoreError] * 40 == [type(r) for r in results]
    assert commits == store.commits
    assert before == _stored(store)
    assert (1, 1) == (store.counts().received, store.counts().queued)
    await store.writer_connection.fetchall("PRAGMA max_page_count = 1073741823")
    await wait_until(lambda: store.writable, 10, "the writer's probe to find room again")
    await asyncio.gather(*(store.submit([e]) for e in events))
    assert 41 == store.counts().queued


def _last_commit_pages(wal: Path) -> set[int]:
    """The pages the WAL's last commit wrote: its frames after the commit before it."""
    data = wal.read_bytes()
    page_size = int.from_bytes(data[8:12], "big")
    salts = data[16:24]
    pages: list[int] = []
    last: set[int] = set()
    at = 32
    while at + 24 + page_size <= len(data) and data[at + 8 : at + 16] == salts:
        pages.append(int.from_bytes(data[at : at + 4], "big"))
        if int.from_bytes(data[at + 4 : at + 8], "big"):  # a commit's last frame
            last, pages = set(pages), []
        at += 24 + page_size
    return last


async def test_the_highest_seq_is_recorded_once_a_block_not_in_every_commit(
    open_store: OpenStore, clock: Clock
) -> None:
    """``AUTOINCREMENT``'s record of the highest seq (``sqlite_sequence``) is a page of
    its own: moved a block ahead, it leaves a commit's WAL frames until a commit goes
    past it, whether written as statements or, for a large group, in one call."""
    store = await open_store()
    wal = Path(f"{store.path}-wal")
    sequence = "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
    await store.submit([action(clock)])
    ((page,),) = rows(store, "SELECT rootpage FROM sqlite_schema WHERE name = 'sqlite_sequence'")
    assert page in _last_commit_pages(wal)
    assert [(1 + writes.SEQ_RESERVE,)] == rows(store, sequence)
    for _ in range(3):
        await store.submit([action(clock)])
        assert page not in _last_commit_pages(wal)
    # Seqs 5 to 1028: past the block, so it moves ahead from the last of them.
    await store.submit([action(clock) for _ in range(writes.SEQ_RESERVE)])
    assert page in _last_commit_pages(wal)
    assert [(4 + 2 * writes.SEQ_RESERVE,)] == rows(store, sequence)
    # Large groups (the block ends at 2,052): one within it, seqs 2,033 to 2,048, is one
    # call that leaves the page out; one past it, 2,049 to 2,064, takes the statements.
    group = 2 * writes.ONE_CALL_MIN_SUBMITS
    await store.submit([action(clock) for _ in range(writes.SEQ_RESERVE - 4 - group)])
    for past in (False, True):
        commits = store.commits
        await asyncio.gather(*(store.submit([action(clock)]) for _ in range(group)))
        assert (commits + 1, past) == (store.commits, page in _last_commit_pages(wal))
    last = 2 * writes.SEQ_RESERVE + group
    assert [(last, last + writes.SEQ_RESERVE)] == rows(
        store, f"SELECT max(e.seq), ({sequence}) FROM events e"
    )
    assert last == store.counts().queued


async def test_seqs_are_never_reused_after_a_restart_or_a_requeue(
    open_store: OpenStore, clock: Clock
) -> None:
    """A seq names one event for good (a late outcome of a send, a dead letter): after
    every event was delivered and the sidecar restarted, and after a re-queue, new seqs
    go on past every seq given before, leaving a gap of one block at most."""
    store = await open_store()
    await store.submit([action(clock) for _ in range(3)])
    delivered = await store.lease(10, frozenset())
    await store.settle([Delivered(e.seq) for e in delivered])
    assert 0 == store.counts().queued
    used = max(e.seq for e in delivered)
    await store.close()

    store = await open_store()
    await dead_letter(store, 2)
    dead = await store.dead_letters()
    assert used < min(d.seq for d in dead)
    assert max(d.seq for d in dead) <= used + writes.SEQ_RESERVE + 2
    assert 2 == await store.requeue_dead_letters(DeadLetterFilter(), 10)
    requeued = await store.lease(10, frozenset())
    assert max(d.seq for d in dead) < min(e.seq for e in requeued)
    await store.submit([action(clock)])
    (new,) = [
        e for e in await store.lease(10, frozenset()) if e.seq not in {r.seq for r in requeued}
    ]
    assert max(e.seq for e in requeued) < new.seq
    await store.close()

    store = await open_store()
    await store.submit([action(clock)])
    seqs = [e.seq for e in await store.lease(10, frozenset())]
    assert 4 == len(seqs)
    assert new.seq < seqs[-1] <= new.seq + writes.SEQ_RESERVE + 1
