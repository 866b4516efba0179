"""The operator's actions on the local database: the live ``Store`` inside the sidecar,
or a database file when no sidecar runs (read-only for reads; the store opened, its lock
taken, for writes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import Settings
from ..disk import data_dir_bytes
from ..events import NewEvent
from ..store import ReadOnlyDatabase, Store, moved_aside_files
from .forms import counts_json, dead_letter_json, ledger_json, moved_aside_json
from .interface import DeadLetterPage, DeadLetterQuery, ImportCounts, OperationError

StatusFn = Callable[[], dict[str, Any]]


class LocalOperations:
    """``Operations`` on the database itself. Made by ``live`` (in the sidecar, over its
    store) or ``of_file`` (the command line, over a file no sidecar holds)."""

    def __init__(
        self,
        source: str,
        *,
        store: Store | None = None,
        status: StatusFn | None = None,
        database: Callable[[], ReadOnlyDatabase] | None = None,
        open_store: Callable[[], Awaitable[Store]] | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.source = source
        self._store = store
        self._status = status
        self._database = database
        self._db: ReadOnlyDatabase | None = None
        self._open_store = open_store
        self._settings = settings

    @classmethod
    def live(cls, store: Store, status: StatusFn | None = None) -> LocalOperations:
        """Over the running sidecar's own store (the admin API)."""
        return cls(str(store.path), store=store, status=status)

    @classmethod
    def of_file(
        cls,
        path: Path,
        source: str,
        *,
        settings: Settings | None = None,
        untouched: bool = False,
    ) -> LocalOperations:
        """Over a database file: reads on a query-only connection (``untouched``: nothing
        created beside the file), writes on the store of ``settings.data_dir`` (opened at
        the first write; none without ``settings``)."""

        def database() -> ReadOnlyDatabase:
            return ReadOnlyDatabase(path, untouched=untouched)

        open_store = None
        if settings is not None:
            s = settings

            async def open_store() -> Store:
                return await Store.open(
                    s.data_dir,
                    durability=s.durability,
                    max_queue_bytes=s.max_queue_bytes,
                    max_queue_events=s.max_queue_events,
                    max_body_bytes=s.max_body_bytes,
                    dedup_window_s=s.dedup_window_s,
                    prune_interval_s=None,
                )

        return cls(source, database=database, open_store=open_store, settings=settings)

    # --- where reads and writes go ------------------------------------------------------

    async def _read_only(self) -> ReadOnlyDatabase:
        if self._db is None:
            assert self._database is not None
            self._db = await asyncio.to_thread(self._database)
        return self._db

    async def _writer(self) -> Store:
        if self._store is None:
            if self._open_store is None:
                raise OperationError(f"{self.source} is read-only here: nothing can change it")
            await self._close_reader()  # one connection at a time on the file
            self._store = await self._open_store()
        return self._store

    async def _close_reader(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    # --- the operations ---------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        if self._status is not None:
            return self._status()
        if self._settings is None or self._database is None:
            raise OperationError("no status here: ask the running sidecar")
        db = await self._read_only()
        return await asyncio.to_thread(offline_status, self._settings, db)

    async def ledger(
        self, agent_key: str | None = None, since: str | None = None, until: str | None = None
    ) -> dict[str, Any]:
        if self._database is None:
            assert self._store is not None
            rows = await self._store.ledger(agent_key, since, until)
        else:
            db = await self._read_only()
            rows = await asyncio.to_thread(db.ledger, agent_key, since, until)
        return ledger_json(rows)

    async def dead_letters(
        self, query: DeadLetterQuery, *, limit: int, after_seq: int = 0
    ) -> DeadLetterPage:
        flt = query.filter(time.time(), after_seq)
        if self._database is None:
            assert self._store is not None
            records = await self._store.dead_letters(limit, flt)
        else:
            db = await self._read_only()
            records = await asyncio.to_thread(db.dead_letters, limit, flt)
        last = records[-1].seq if len(records) == limit and records else None
        return DeadLetterPage([dead_letter_json(r) for r in records], last)

    async def dead_letter_summary(self) -> dict[str, Any]:
        if self._database is None:
            assert self._store is not None
            reasons = await self._store.dead_letter_summary()
            return {"reasons": reasons, "dead_lettered": self._store.counts().dead_lettered}
        db = await self._read_only()
        reasons = await asyncio.to_thread(db.dead_letter_summary)
        counts = await asyncio.to_thread(db.counts)
        return {"reasons": reasons, "dead_lettered": counts.dead_lettered}

    async def count_dead_letters(self, query: DeadLetterQuery) -> int:
        flt = query.filter(time.time())
        if self._database is None:
            assert self._store is not None
            return await self._store.count_dead_letters(flt)
        db = await self._read_only()
        return await asyncio.to_thread(db.count_dead_letters, flt)

    async def requeue_dead_letters(self, query: DeadLetterQuery, limit: int) -> int:
        store = await self._writer()
        return await store.requeue_dead_letters(query.filter(time.time()), limit)

    async def purge_dead_letters(self, query: DeadLetterQuery, limit: int) -> int:
        store = await self._writer()
        return await store.purge_dead_letters(query.filter(time.time()), limit)

    async def import_events(self, events: Sequence[NewEvent]) -> ImportCounts:
        store = await self._writer()
        result = await store.import_events(events)
        return ImportCounts(result.imported, result.duplicates, result.conflicts)

    async def aclose(self) -> None:
        """Close what the command line opened (a live store is its service's to close)."""
        await self._close_reader()
        if self._open_store is not None and self._store is not None:
            store, self._store = self._store, None
            await store.close()


def offline_status(settings: Settings, db: ReadOnlyDatabase) -> dict[str, Any]:
    """What ``/v1/status`` would say, read from the database of a stopped sidecar."""
    c = db.counts()
    now = time.time()
    return {
        "running": False,
        "data_dir": str(settings.data_dir),
        **counts_json(
            c,
            in_flight=0,
            max_events=settings.max_queue_events,
            max_bytes=settings.max_queue_bytes,
        ),
        "oldest_queued_age_s": (
            None if c.oldest_queued_at is None else round(now - c.oldest_queued_at, 3)
        ),
        "disk": {
            "bytes": data_dir_bytes(settings.data_dir),
            "max_bytes": settings.max_queue_bytes,
        },
        "upstream": {"state": "stopped", "last_error": None},
        "dead_letters": {"reasons": db.dead_letter_summary(), **db.operator_counts()},
        "moved_aside": moved_aside_json(moved_aside_files(settings.data_dir)),
    }
