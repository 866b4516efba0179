"""One SQLite connection and the one thread that uses it.

The store needs a whole transaction to cost one trip to the thread and one back: under
load every trip back waits behind the requests the event loop is serving, so a commit
made of several awaited statements takes many times longer than the same statements run
together. aiosqlite offers only one trip per statement through its public API, so the
store owns its threads (what aiosqlite does inside: the standard library's ``sqlite3`` on
a dedicated thread, fed by a queue) and hands each thread a whole function to run. A
``concurrent.futures`` executor would do the same with more on every trip (its locks, a
semaphore, a second future chained to the loop's), and every event makes such trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from queue import SimpleQueue
from typing import Any, TypeVar

_T = TypeVar("_T")

#: What the loop is told of a job's outcome: ``(result, None)`` or ``(None, exception)``.
Reply = Callable[[Any, "BaseException | None"], None]
#: A job: what to run on the thread, and what to call on the loop with its outcome.
_Job = tuple[Callable[[], Any], "Reply | None"]


class ConnectionClosedError(RuntimeError):
    """The connection was closed: a call after ``close()`` is a bug, not a full disk."""


class SqliteThread:
    """A ``sqlite3.Connection`` made, used and closed on one thread of its own.

    ``call(fn)`` runs ``fn(connection)`` there and returns its result: one trip each way,
    whatever ``fn`` does. Calls run one at a time in the order made.
    """

    def __init__(self, name: str) -> None:
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._loop = asyncio.get_running_loop()
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @classmethod
    async def connect(cls, path: Path | str, *, name: str, **options: Any) -> SqliteThread:
        """Open ``path`` with ``sqlite3.connect(path, **options)`` on a new thread."""
        self = cls(name)
        try:
            self._conn = await self._run(lambda: sqlite3.connect(path, **options))
        except BaseException:
            self._jobs.put(None)
            raise
        return self

    def _serve(self) -> None:
        loop = self._loop
        while (job := self._jobs.get()) is not None:
            fn, reply = job
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                if reply is not None:
                    _hand_back(loop, reply, None, exc)
            else:
                if reply is not None:
                    _hand_back(loop, reply, result, None)

    def _run(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        future: asyncio.Future[_T] = self._loop.create_future()
        self._jobs.put((fn, functools.partial(_settle, future)))
        return future

    def submit(self, fn: Callable[[sqlite3.Connection], _T], reply: Reply) -> None:
        """Run ``fn(connection)`` on the thread and call ``reply(result, None)``, or
        ``reply(None, exception)``, on the loop: ``call`` without a future and the task
        step that awaiting one takes. Raises ``ConnectionClosedError`` after ``close()``.

        The loop does not wait for the thread to take the job. The thread needs the GIL
        to take it, which a busy loop lets go of once it runs out of work (or after
        ``sys.getswitchinterval()``): what the loop serves meanwhile joins the next
        transaction, so a busy store commits fewer, larger groups (docs/PERFORMANCE.md,
        "The GIL no longer handed over")."""
        conn = self._conn
        if self._closed or conn is None:
            raise ConnectionClosedError("the database connection is closed")
        self._jobs.put((lambda: fn(conn), reply))

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(connection)`` on the connection's thread."""
        conn = self._conn
        if self._closed or conn is None:
            raise ConnectionClosedError("the database connection is closed")
        return await self._run(lambda: fn(conn))

    async def fetchall(self, sql: str, params: Any = ()) -> list[Any]:
        """The rows of one statement."""
        return await self.call(lambda db: db.execute(sql, params).fetchall())

    async def close(self) -> None:
        """Close the connection on its thread, then let the thread end."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn is None:
            self._jobs.put(None)
            return
        # Queued once and shielded: a caller cancelled while the thread is busy must not
        # take the close with it (the connection, its file and its WAL would stay open).
        closing = self._run(conn.close)
        self._jobs.put(None)
        await asyncio.shield(closing)

    def stop(self) -> None:
        """Let the thread end without waiting (a close that was cancelled): the connection
        is closed when the thread's last call returns."""
        if not self._closed:
            self._closed = True
            if self._conn is not None:
                self._jobs.put((self._conn.close, None))
            self._jobs.put(None)


def _hand_back(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
