"""The group-commit writer: commits shared by concurrent submits, a submit resolved only
after its commit, failed commits, a crashed writer, a close in the middle of a commit, and
the writer's probe that finds the disk writable again."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.conftest import wait_until
from valmi_sidecar.events import parse_one
from valmi_sidecar.store import (
    Accepted,
    Delivered,
    OutcomeUnknownError,
    ReadOnlyDatabase,
    Store,
    StoreError,
)
from valmi_sidecar.store import core as store_core
from valmi_sidecar.store import space as store_space
from valmi_sidecar.store import writer as store_writer

from .conftest import Clock, OpenStore, action, rows


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


async def test_close_commits_pending_submits(open_store: OpenStore, clock: Clock) -> None:
    store = await open_store()
    tasks = [asyncio.ensure_future(store.submit([action(clock)])) for _ in range(20)]
    await asyncio.sleep(0)  # the submits are queued, not yet committed
    await store.close()
    assert 20 == len(await asyncio.gather(*tasks))
    assert [(20,)] == rows(store, "SELECT count(*) FROM events")


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


_BIG = b'{"agent_key": "a", "action_type": "x", "metadata": {"blob": "' + b"x" * 50_000 + b'"}}'


async def _fail_three_then_recover(store: Store, clock: Clock) -> None:
    await store.submit([action(clock)])
    await store.writer_connection.fetchall("PRAGMA max_page_count = 1")  # no room: "disk full"
    for _ in range(3):
        with pytest.raises(StoreError):
            await store.submit([parse_one("action", _BIG, now=clock())])
    await store.writer_connection.fetchall("PRAGMA max_page_count = 1073741823")
    await store.submit([action(clock)])


async def test_a_full_disk_is_logged_once_while_it_lasts_then_its_end_with_the_count(
    open_store: OpenStore, clock: Clock
) -> None:
    """Every request fails while the disk is full: one error line says so (which was full
    and how much the file system has left), not one a request, and the line that says it
    is over counts the commits that failed meanwhile."""
    store = await open_store()
    with capture_logs() as logs:
        await _fail_three_then_recover(store, clock)
    (failed,) = [e for e in logs if e["event"] == "commit_failed"]
    assert "error" == failed["log_level"]
    assert "disk_full" == failed["reason"]
    assert failed["fs_free_bytes"] > 0
    # The database's share was full (max_page_count), not the file system: no action on it.
    assert "action" not in failed
    (again,) = [e for e in logs if e["event"] == "store_writable_again"]
    assert 3 == again["failed_commits"]
    assert again["unwritable_s"] >= 0
    assert 3 == store.stats.commit_failures  # the metric still counts each


async def test_a_full_file_system_is_named_with_what_to_do(
    open_store: OpenStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When SQLite finds no room and the file system has less than a transaction left, the
    log names the file system and says what to do. (The file system's reading is the one
    thing replaced: filling a real disk cannot run here.)"""
    store = await open_store()
    monkeypatch.setattr(store_space, "fs_free_bytes", lambda _path: 0)
    with capture_logs() as logs:
        await _fail_three_then_recover(store, clock)
    (failed,) = [e for e in logs if e["event"] == "commit_failed"]
    assert 0 == failed["fs_free_bytes"]
    assert "is full before max_queue_bytes=" in failed["action"]
    assert "nothing queued is lost" in failed["action"]


async def test_a_file_system_smaller_than_the_budget_is_said_at_start(
    open_store: OpenStore, tmp_path: Path
) -> None:
    """A budget the file system cannot hold: at start the log says so, with the most the
    budget can be there; a budget it holds says nothing."""
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    with capture_logs() as logs:
        await open_store(tmp_path / "big", max_queue_bytes=free + 2**40)
        await open_store(tmp_path / "small", max_queue_bytes=64 * 2**20)
    (warned,) = [e for e in logs if e["event"] == "disk_smaller_than_budget"]
    assert free + 2**40 == warned["max_queue_bytes"]
    most = warned["data_dir_bytes"] + warned["fs_free_bytes"]
    assert most < warned["max_queue_bytes"]
    assert f"lower max_queue_bytes to at most {most}" in warned["action"]


async def test_writer_crash_fails_submits_and_ends_writer_task(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    await store.writer_connection.close()  # the writer's next call fails with an unexpected error
    with pytest.raises(StoreError) as raised:
        await store.submit([action(clock)])
    # Never handed to the thread: nothing was stored, and the error must not say "maybe".
    assert not isinstance(raised.value, OutcomeUnknownError)
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


async def held_thread(store: Store) -> tuple[threading.Event, asyncio.Future[bool]]:
    """The writer's thread kept busy by a job of its own until the event is set: a
    transaction the writer hands over meanwhile waits, not begun, as it waits under load
    for the GIL."""
    started, gate = threading.Event(), threading.Event()

    def hold(_db: sqlite3.Connection) -> bool:
        started.set()
        return gate.wait(10)

    held = asyncio.ensure_future(store.writer_connection.call(hold))
    await wait_until(started.is_set, 10, "the writer's thread held")
    return gate, held


async def test_submissions_made_before_the_thread_begins_join_its_transaction(
    open_store: OpenStore, clock: Clock
) -> None:
    """Submissions that come after a transaction was handed to the thread, but before the
    thread began it, are written and committed with it: one commit, not two, and each
    resolved only after it."""
    store = await open_store()
    await store.submit([action(clock, key="before")])
    commits = store.commits
    gate, held = await held_thread(store)
    first = asyncio.ensure_future(store.submit([action(clock, key="first")]))
    await wait_until(lambda: store.in_transaction, 10, "the transaction handed over")
    later = [asyncio.ensure_future(store.submit([action(clock, key=f"k{i}")])) for i in range(5)]
    await asyncio.sleep(0)  # each submission reaches the writer
    assert not any(t.done() for t in (first, *later))  # nothing resolved before its commit
    gate.set()
    await held
    await asyncio.gather(first, *later)
    assert commits + 1 == store.commits
    # All stored, with their keys, in the order of submission.
    assert ["before", "first", *(f"k{i}" for i in range(5))] == [
        k for (k,) in rows(store, "SELECT idem_key FROM events ORDER BY seq")
    ]
    assert 7 == len(rows(store, "SELECT 1 FROM keys"))


@pytest.mark.parametrize("bound", ["events", "body_bytes"])
async def test_submissions_that_would_take_the_transaction_past_its_bound_wait_in_order(
    open_store: OpenStore, clock: Clock, monkeypatch: pytest.MonkeyPatch, bound: str
) -> None:
    """Joining keeps the group's bounds, on events and on body bytes (one transaction's
    WAL within the disk budget): past them, the submissions wait for the next
    transaction, all of them after the first that did not fit, in their order."""
    if bound == "events":
        monkeypatch.setattr(store_writer, "MAX_GROUP_EVENTS", 3)
        store = await open_store()
    else:  # a group takes up to max_body_bytes of bodies: here three events' worth
        store = await open_store(max_body_bytes=3 * len(action(clock).body))
    commits = store.commits
    gate, held = await held_thread(store)
    first = asyncio.ensure_future(store.submit([action(clock, key="a0")]))
    await wait_until(lambda: store.in_transaction, 10, "the transaction handed over")
    later = [asyncio.ensure_future(store.submit([action(clock, key=f"a{i}")])) for i in range(1, 7)]
    await asyncio.sleep(0)
    gate.set()
    await held
    await asyncio.gather(first, *later)
    assert commits + 3 == store.commits  # a0-a2 together (a0 counted), a3-a5, then a6
    assert [f"a{i}" for i in range(7)] == [
        k for (k,) in rows(store, "SELECT idem_key FROM events ORDER BY seq")
    ]


async def test_a_close_before_the_thread_begins_fails_the_joined_submissions_as_not_stored(
    open_store: OpenStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() that gives up while the thread has not begun the transaction handed to it:
    that transaction's submissions may still be written ("outcome unknown"), those that
    joined it were not taken yet, are never written, and say "not stored"."""
    monkeypatch.setattr(store_core, "CLOSE_DRAIN_S", 0.2)
    store = await open_store()
    gate, held = await held_thread(store)
    handed = asyncio.ensure_future(store.submit([action(clock, key="handed")]))
    await wait_until(lambda: store.in_transaction, 10, "the transaction handed over")
    joined = asyncio.ensure_future(store.submit([action(clock, key="joined")]))
    closing = asyncio.ensure_future(store.close())
    await asyncio.wait({handed, joined}, timeout=10)
    gate.set()
    await held
    await closing
    with pytest.raises(OutcomeUnknownError):
        handed.result()
    with pytest.raises(StoreError) as not_stored:
        joined.result()
    assert not isinstance(not_stored.value, OutcomeUnknownError)
    await wait_until(lambda: bool(rows(store, "SELECT 1 FROM keys")), 10, "the commit")
    assert [("handed",)] == rows(store, "SELECT idem_key FROM keys")


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


async def waiting_rider(store: Store, clock: Clock) -> asyncio.Future[None]:
    """A queued event's delivery, riding (``ride_s`` 30 s), seen by the writer, which
    waits with it for company."""
    await store.submit([action(clock)])
    (leased,) = await store.lease(1, frozenset())
    rider = asyncio.ensure_future(store.settle([Delivered(leased.seq)], ride_s=30.0))
    await wait_until(lambda: store.riders_waiting, 5, "the writer waiting with the rider")
    return rider


async def test_a_rider_gathers_company_then_joins_a_submission(
    open_store: OpenStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settlements given ``ride_s`` wait for a transaction of submissions and are recorded
    in it: one transaction for both, where they used to make two. They sit out the ones
    that come sooner than ``RIDERS_GATHER_S`` after them, so that riders board together
    (five at 100 events/s) rather than one with every event."""
    gather_s = 0.3  # long enough that the first submission surely comes sooner
    monkeypatch.setattr(store_core, "RIDERS_GATHER_S", gather_s)
    store = await open_store()
    await store.submit([action(clock, key="first")])
    (leased,) = await store.lease(1, frozenset())
    before = store.commits
    riding_since = time.monotonic()
    settling = asyncio.ensure_future(store.settle([Delivered(leased.seq)], ride_s=30.0))
    await asyncio.sleep(0)  # the writer sees only the rider: it waits
    assert not settling.done()
    await store.submit([action(clock, key="second")])
    assert time.monotonic() - riding_since < gather_s
    assert not settling.done()  # too soon: it sat that one out
    assert (0, 2) == (store.counts().delivered, store.counts().queued)
    # The rider's time to board passes: the next submission takes it along.
    await wait_until(
        lambda: time.monotonic() - riding_since > gather_s, 5, "the rider's time to board"
    )
    commits = store.commits
    await store.submit([action(clock, key="third")])
    await asyncio.wait_for(settling, 5)
    assert commits + 1 == store.commits
    assert before + 2 == store.commits  # never a transaction of its own
    assert (1, 2) == (store.counts().delivered, store.counts().queued)


async def test_riders_board_at_once_when_many_or_with_a_settlement_that_does_not_ride(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    n = store_writer.RIDERS_FULL
    await store.submit([action(clock) for _ in range(n + 1)])
    leased = await store.lease(n + 1, frozenset())
    riding = [
        asyncio.ensure_future(store.settle([Delivered(e.seq)], ride_s=30.0)) for e in leased[:n]
    ]
    await asyncio.sleep(0)
    commits = store.commits
    await store.submit([action(clock)])  # at once: RIDERS_FULL ride
    await asyncio.wait_for(asyncio.gather(*riding), 5)
    assert (commits + 1, n) == (store.commits, store.counts().delivered)
    rider = asyncio.ensure_future(store.settle([Delivered(leased[n].seq)], ride_s=30.0))
    await asyncio.sleep(0)
    await store.submit([action(clock)])
    assert not rider.done()  # one alone, too soon: it waits
    (fresh,) = await store.lease(1, frozenset(e.seq for e in leased))
    await store.settle([Delivered(fresh.seq)])  # one that does not ride takes it along
    await asyncio.wait_for(rider, 5)
    assert n + 2 == store.counts().delivered


async def test_settlements_join_a_rider_until_the_writer_takes_it(
    open_store: OpenStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settler's deliveries ride as one operation: each joins the one waiting, is
    recorded in its transaction and resolves with it; once the writer took it for a
    transaction, none joins (its thread reads it) and the next rides anew."""
    monkeypatch.setattr(store_core, "RIDERS_GATHER_S", 0.0)  # they board the next submission
    store = await open_store()
    await store.submit([action(clock) for _ in range(4)])
    a, b, c, d = await store.lease(4, frozenset())
    ride = store.ride_soon([Delivered(a.seq)], ride_s=30.0)
    assert ride.join(Delivered(b.seq))
    assert ride.join(Delivered(c.seq))
    await asyncio.sleep(0)
    commits = store.commits
    submitted = store.submit_soon([action(clock)])
    assert not ride.future.done()
    await asyncio.sleep(0)  # the writer takes the submission and the rider
    assert not ride.join(Delivered(d.seq))  # taken: too late to join
    await asyncio.wait_for(asyncio.gather(submitted, ride.future), 5)
    assert (commits + 1, 3, 2) == (
        store.commits,
        store.counts().delivered,
        store.counts().queued,
    )
    assert not ride.join(Delivered(d.seq))  # recorded: too late as well
    await store.settle([Delivered(d.seq)])
    assert (4, 1) == (store.counts().delivered, store.counts().queued)


async def test_the_store_tells_whether_events_are_being_received(
    open_store: OpenStore, clock: Clock
) -> None:
    """What the settler asks before a delivery rides: whether received events went into
    a transaction lately. A store just opened has received none; recording outcomes,
    without any event received, does not count."""
    store = await open_store()
    assert not store.received_within(3600)
    started = time.monotonic()
    await store.submit([action(clock) for _ in range(2)])
    assert store.received_within(time.monotonic() - started + 0.5)
    (a, _) = await store.lease(2, frozenset())
    since_received = time.monotonic()
    await store.settle([Delivered(a.seq)])
    # The settlement's transaction is not one: the last was before ``since_received``.
    assert not store.received_within(time.monotonic() - since_received)
    assert store.received_within(3600)


async def test_riders_board_at_once_when_their_outcomes_are_awaited(
    open_store: OpenStore, clock: Clock
) -> None:
    """The flusher waits for outcomes to be saved (its bound on unsaved ones): the riders
    are recorded at once, alone, rather than after their wait for company."""
    store = await open_store()
    rider = await waiting_rider(store, clock)
    commits = store.commits
    assert not rider.done()
    store.board_riders()
    await asyncio.wait_for(rider, 5)
    assert (commits + 1, 1) == (store.commits, store.counts().delivered)


async def test_a_rider_with_nothing_to_join_is_recorded_alone_after_its_wait(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    await store.submit([action(clock)])
    (leased,) = await store.lease(1, frozenset())
    started = time.monotonic()
    await asyncio.wait_for(store.settle([Delivered(leased.seq)], ride_s=0.3), 5)
    assert time.monotonic() - started >= 0.25
    assert 1 == store.counts().delivered


async def test_a_rider_is_recorded_at_once_when_the_store_closes(
    open_store: OpenStore, clock: Clock
) -> None:
    store = await open_store()
    await store.submit([action(clock)])
    (leased,) = await store.lease(1, frozenset())
    settling = asyncio.ensure_future(store.settle([Delivered(leased.seq)], ride_s=60.0))
    await asyncio.sleep(0)
    started = time.monotonic()
    await store.close()
    await asyncio.wait_for(settling, 1)
    assert time.monotonic() - started < 5
    with ReadOnlyDatabase(store.path) as db:
        assert 1 == db.counts().delivered


async def test_riders_that_sit_out_stay_pending_when_maintenance_goes_first(
    open_store: OpenStore, clock: Clock
) -> None:
    """A rider sitting out a transaction keeps its place when the writer takes an
    operation that runs alone (here the pruning of keys) before the submission."""
    store = await open_store()
    rider = await waiting_rider(store, clock)
    # In one loop iteration: the maintenance, then a submission, behind the rider.
    pruning = asyncio.ensure_future(store.prune())
    submitting = asyncio.ensure_future(store.submit([action(clock)]))
    await asyncio.wait_for(asyncio.gather(pruning, submitting), 5)
    store.board_riders()
    await asyncio.wait_for(rider, 5)
    assert (1, 1) == (store.counts().delivered, store.counts().queued)


async def test_maintenance_goes_alone_and_a_young_rider_waits_on_for_company(
    open_store: OpenStore, clock: Clock
) -> None:
    """An operation that runs alone does not make the riders board before their time: a
    transaction of their own costs several times what riding costs."""
    store = await open_store()
    rider = await waiting_rider(store, clock)
    await asyncio.wait_for(store.prune(), 5)
    assert not rider.done()
    assert 0 == store.counts().delivered
    await store.submit([action(clock)])  # too soon for it to board: it sits this one out
    assert not rider.done()
    store.board_riders()
    await asyncio.wait_for(rider, 5)
    assert (1, 1) == (store.counts().delivered, store.counts().queued)


async def test_a_rider_that_comes_while_others_wait_boards_with_them_at_their_time(
    open_store: OpenStore, clock: Clock
) -> None:
    """A second rider, enqueued once the writer set its wake-up for the first, is taken
    along by that wake-up: both are recorded in one transaction, at the first's time."""
    store = await open_store()
    await store.submit([action(clock), action(clock)])
    first, second = await store.lease(2, frozenset())
    commits = store.commits
    started = time.monotonic()
    riding = [asyncio.ensure_future(store.settle([Delivered(first.seq)], ride_s=0.3))]
    await wait_until(lambda: store.riders_waiting, 5, "the writer's wake-up for the first")
    riding.append(asyncio.ensure_future(store.settle([Delivered(second.seq)], ride_s=30.0)))
    await asyncio.wait_for(asyncio.gather(*riding), 5)
    assert time.monotonic() - started >= 0.25
    assert (commits + 1, 2) == (store.commits, store.counts().delivered)
