"""One SQLite connection and the one thread that uses it.

The store needs a whole transaction to cost one trip to the thread and one back: under
load every trip back waits behind the requests the event loop is serving, so a commit
made of several awaited statements takes many times longer than the same statements run
together. aiosqlite offers only one trip per statement through its public API, so the
store owns its threads (what aiosqlite does inside: the standard library's ``sqlite3`` on
a dedicated thread) and hands each thread a whole function to run.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")


class ConnectionClosedError(RuntimeError):
    """The connection was closed: a call after ``close()`` is a bug, not a full disk."""


class SqliteThread:
    """A ``sqlite3.Connection`` made, used and closed on one thread of its own.

    ``call(fn)`` runs ``fn(connection)`` there and returns its result: one trip each way,
    whatever ``fn`` does. Calls run one at a time in the order made.
    """

    def __init__(self, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._executor = executor
        self._conn = conn
        self._closed = False

    @classmethod
    async def connect(cls, path: Path | str, *, name: str, **options: Any) -> SqliteThread:
        """Open ``path`` with ``sqlite3.connect(path, **options)`` on a new thread."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, lambda: sqlite3.connect(path, **options))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn)

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(connection)`` on the connection's thread."""
        if self._closed:
            raise ConnectionClosedError("the database connection is closed")
        conn = self._conn
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)

    async def fetchall(self, sql: str, params: Any = ()) -> list[Any]:
        """The rows of one statement."""
        return await self.call(lambda db: db.execute(sql, params).fetchall())

    async def close(self) -> None:
        """Close the connection on its thread, then let the thread end."""
        if self._closed:
            return
        self._closed = True
        # Submitted once and shielded: a caller cancelled while the thread is busy must not
        # take the close with it (the connection, its file and its WAL would stay open).
        closing = asyncio.wrap_future(self._executor.submit(self._conn.close))
        self._executor.shutdown(wait=False)
        await asyncio.shield(closing)

    def stop(self) -> None:
        """Let the thread end without waiting (a close that was cancelled): the connection
        is closed when the thread's last call returns."""
        if not self._closed:
            self._closed = True
            self._executor.submit(self._conn.close)
        self._executor.shutdown(wait=False)
