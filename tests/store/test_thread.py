"""``SqliteThread``: one connection on one thread of its own, on real database files."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from valmi_sidecar.store.thread import ConnectionClosedError, SqliteThread

from .conftest import Clock, OpenStore, action


def threads_named(prefix: str) -> list[str]:
    """The live threads whose name starts with ``prefix`` (the executor adds ``_0``)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def open_fds(path: Path) -> int:
    """How many of this process's file descriptors point at ``path`` (Linux ``/proc``)."""
    target = str(path.resolve())
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:  # closed since the listing
            continue
    return n


async def occupy(conn: SqliteThread) -> tuple[threading.Event, asyncio.Future[bool]]:
    """Start a call that holds the connection's thread until the returned gate is set."""
    started, gate = threading.Event(), threading.Event()

    def hold(_db: sqlite3.Connection) -> bool:
        started.set()
        return gate.wait(30)

    busy = asyncio.ensure_future(conn.call(hold))
    await wait_until(started.is_set, 10, "the call running on the thread")
    return gate, busy


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[SqliteThread]:
    thread = await SqliteThread.connect(tmp_path / "t.db", name="sqlite-test", isolation_level=None)
    try:
        yield thread
    finally:
        await thread.close()


async def test_calls_run_one_at_a_time_in_order_on_one_thread_that_is_not_the_loops(
    conn: SqliteThread,
) -> None:
    seen: list[tuple[int, int, int]] = []  # (call, thread id, connection id)
    active = [0, 0]  # calls running now, the most at once

    def make(i: int) -> asyncio.Future[int]:
        def fn(db: sqlite3.Connection) -> int:
            active[0] += 1
            active[1] = max(active)
            seen.append((i, threading.get_ident(), id(db)))
            db.execute("SELECT 1").fetchall()
            active[0] -= 1
            return i

        return asyncio.ensure_future(conn.call(fn))

    results = await asyncio.gather(*(make(i) for i in range(50)))
    assert list(range(50)) == results
    assert list(range(50)) == [i for i, _, _ in seen]
    assert 1 == active[1]
    (thread_id,) = {t for _, t, _ in seen}
    assert threading.get_ident() != thread_id  # not the event loop's thread
    assert 1 == len({c for _, _, c in seen})  # the same connection every time
    assert [thread_id] == [t.ident for t in threading.enumerate() if t.name.startswith("sqlite-")]


async def test_a_submitted_job_never_holds_the_loop_while_the_thread_is_busy(
    conn: SqliteThread,
) -> None:
    """``submit`` only queues the job: a thread held by a long call does not hold the
    event loop with it, and the job runs, its reply on the loop, once the thread is free."""
    loop = asyncio.get_running_loop()
    replies: list[asyncio.Future[tuple[object, BaseException | None]]] = []

    def submit(sql: str) -> float:
        reply: asyncio.Future[tuple[object, BaseException | None]] = loop.create_future()
        replies.append(reply)
        started = time.monotonic()
        conn.submit(
            lambda db: db.execute(sql).fetchall(),
            lambda result, exc: reply.set_result((result, exc)),
        )
        return time.monotonic() - started

    submit("SELECT 1")
    assert ([(1,)], None) == await asyncio.wait_for(replies[0], 10)
    gate, busy = await occupy(conn)  # held until the gate opens (30 s at most)
    waited = submit("SELECT 2")
    assert waited < 1.0  # not the busy call's time
    assert not replies[1].done()
    gate.set()
    assert ([(2,)], None) == await asyncio.wait_for(replies[1], 10)
    assert await busy


async def test_a_call_after_close_raises_connection_closed_error(conn: SqliteThread) -> None:
    assert [(1,)] == await conn.fetchall("SELECT 1")
    await conn.close()
    with pytest.raises(ConnectionClosedError, match="closed"):
        await conn.call(lambda db: db.execute("SELECT 1").fetchall())
    with pytest.raises(ConnectionClosedError):
        await conn.fetchall("SELECT 1")
    await conn.close()  # a second close does nothing


async def test_an_exception_in_fn_reaches_the_caller_and_the_thread_goes_on(
    conn: SqliteThread,
) -> None:
    class BoomError(Exception):
        pass

    def fail(_db: sqlite3.Connection) -> None:
        raise BoomError("from the connection's thread")

    with pytest.raises(BoomError, match="from the connection's thread"):
        await conn.call(fail)
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await conn.fetchall("SELECT * FROM missing")
    assert [(2,)] == await conn.fetchall("SELECT 2")


async def test_stop_while_a_call_runs_lets_the_thread_end_and_closes_the_connection(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.db"
    conn = await SqliteThread.connect(path, name="sqlite-stop", isolation_level=None)
    gate, busy = await occupy(conn)
    assert 1 == open_fds(path)
    conn.stop()
    with pytest.raises(ConnectionClosedError):
        await conn.fetchall("SELECT 1")
    gate.set()
    assert await busy  # the running call finishes
    await wait_until(lambda: not threads_named("sqlite-stop"), 10, "the thread to end")
    await wait_until(lambda: 0 == open_fds(path), 10, "the connection closed")


async def test_a_close_from_a_cancelled_task_leaves_no_thread_running(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    conn = await SqliteThread.connect(path, name="sqlite-cancel", isolation_level=None)
    gate, busy = await occupy(conn)
    closing = asyncio.ensure_future(conn.close())
    await asyncio.sleep(0)  # close() is waiting behind the running call
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    gate.set()
    assert await busy
    await wait_until(lambda: not threads_named("sqlite-cancel"), 10, "the thread to end")


async def test_a_close_from_a_cancelled_task_still_closes_the_connection(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    conn = await SqliteThread.connect(path, name="sqlite-cancel-fd", isolation_level=None)
    gate, busy = await occupy(conn)
    closing = asyncio.ensure_future(conn.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    gate.set()
    assert await busy
    await wait_until(lambda: not threads_named("sqlite-cancel-fd"), 10, "the thread to end")
    assert 0 == open_fds(path)


async def test_a_store_close_cancelled_in_the_middle_of_a_commit_leaves_no_thread_running(
    open_store: OpenStore, clock: Clock
) -> None:
    """``Store.close`` cancelled before it closed its connections stops both threads
    (``stop()``): they end once the transaction they run ends."""
    store = await open_store()
    before = set(threads_named("store-"))
    blocker = sqlite3.connect(store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the commit waits for this lock
        submit = asyncio.ensure_future(store.submit([action(clock, key="in-commit")]))
        await wait_until(lambda: store.in_transaction, 10, "the writer inside the transaction")
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        blocker.execute("COMMIT")
    finally:
        blocker.close()
    await asyncio.wait({submit, store.writer_task}, timeout=10)
    assert (True, True) == (submit.done(), store.writer_task.done())
    await wait_until(lambda: not (set(threads_named("store-")) & before), 10, "threads to end")
    await wait_until(lambda: 0 == open_fds(store.path), 10, "the connections closed")
