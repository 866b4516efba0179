"""Opening the database of a data directory: its two connections, checked, migrated and
set up for the disk budget. The lock and the clean-shutdown record are ``files``'."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from ..disk import DiskBudget, data_dir_bytes
from . import files
from .records import CorruptDatabaseError, StoreError
from .schema import BUSY_TIMEOUT_MS, DB_FILES, DB_NAME, is_corruption, quick_check, setup_writer
from .thread import SqliteThread
from .writes import prepare_group_writes

log = structlog.get_logger("valmi_sidecar.store")

#: How long closing waits for each connection.
CONNECTION_CLOSE_S: Final = 1.5
#: The writer's statement cache (sqlite3's default is 128): a statement per list length
#: for those that name short lists (``sql.bind_list``) plus everything else it runs.
_WRITER_CACHED_STATEMENTS: Final = 256


@dataclass(frozen=True, slots=True)
class Options:
    """What ``Store.open`` was asked for."""

    durability: str
    max_queue_bytes: int
    max_body_bytes: int
    max_queue_events: int
    dedup_window_s: float
    clock: Callable[[], float]


@dataclass(frozen=True, slots=True)
class Connections:
    """The writer's and the reader's connections, and the disk budget planned for them."""

    writer: SqliteThread
    reader: SqliteThread
    budget: DiskBudget

    async def close(self) -> None:
        """Close both after a failed open (errors then say nothing new)."""
        for conn in (self.reader, self.writer):
            with contextlib.suppress(Exception):
                await conn.close()


def open_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """What a ``sqlite3`` error while opening means: a damaged file, or one not usable."""
    kind = CorruptDatabaseError if is_corruption(exc) else StoreError
    error = kind(f"cannot open {path}: {exc}")
    error.__cause__ = exc
    return error


async def connect(data_dir: Path, options: Options, *, check: bool) -> Connections:
    """Connect to ``DIR/queue.db`` (created 0600 if new), check it when ``check`` (``PRAGMA
    quick_check``), migrate it, and plan the disk budget; on failure nothing stays open."""
    path = data_dir / DB_NAME
    writer: SqliteThread | None = None
    try:
        await asyncio.to_thread(files.create_private, path)
        writer = await SqliteThread.connect(
            path,
            name="store-writer",
            isolation_level="IMMEDIATE",
            cached_statements=_WRITER_CACHED_STATEMENTS,
        )
        if check:
            await writer.call(lambda db: quick_check(db, path))
        ((page_size,),) = await writer.fetchall("PRAGMA page_size")
        budget = DiskBudget.plan(
            options.max_queue_bytes,
            max_body_bytes=options.max_body_bytes,
            other_bytes=await asyncio.to_thread(data_dir_bytes, data_dir, exclude=DB_FILES),
            page_size=int(page_size),
        )
        synchronous = options.durability.upper()
        await writer.call(lambda db: setup_writer(db, path, synchronous=synchronous, budget=budget))
        await writer.call(prepare_group_writes)
        reader = await open_reader(path, "store-reader")
    except BaseException as exc:
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.close()
        if isinstance(exc, sqlite3.Error):
            raise open_error(path, exc) from exc
        raise
    conns = Connections(writer, reader, budget)
    try:
        await asyncio.to_thread(files.chmod_private, path)
    except BaseException:
        await conns.close()
        raise
    return conns


async def move_aside(path: Path, exc: CorruptDatabaseError) -> Path:
    """Move a damaged database aside (``files.move_aside``) and say what to do with it."""
    moved = await asyncio.to_thread(files.move_aside, path)
    log.error(
        "database_corrupt",
        path=str(path),
        moved_to=str(moved),
        error=str(exc),
        action=f"started with an empty queue; run 'valmi-sidecar salvage {moved}' "
        "to re-queue what can be read of it",
    )
    return moved


async def open_reader(path: Path, name: str) -> SqliteThread:
    """A query-only connection to ``path`` on a thread of its own (``name``)."""
    reader = await SqliteThread.connect(path, name=name, isolation_level=None)
    try:
        await reader.call(_setup_reader)
    except BaseException:
        await reader.close()
        raise
    return reader


def _setup_reader(db: sqlite3.Connection) -> None:
    for pragma in (f"busy_timeout = {BUSY_TIMEOUT_MS}", "query_only = ON"):
        db.execute(f"PRAGMA {pragma}")


async def close_all(conns: Iterable[SqliteThread]) -> bool:
    """Close each connection, each within ``CONNECTION_CLOSE_S``; whether all closed."""
    clean = True
    for conn in conns:
        try:
            await asyncio.wait_for(conn.close(), CONNECTION_CLOSE_S)
        except (sqlite3.Error, TimeoutError) as exc:
            clean = False
            log.error("store_close_failed", error=f"{type(exc).__name__}: {exc}")
    return clean


async def record_clean_close(data_dir: Path, queued: int, queued_bytes: int) -> None:
    """Write the clean-shutdown record (after both connections closed)."""
    try:
        await asyncio.to_thread(files.write_clean_record, data_dir, queued, queued_bytes)
    except OSError as exc:  # the next start checks the file: slower, no harm
        log.warning("clean_record_failed", error=str(exc))
