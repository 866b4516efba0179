"""The files around the database: the data directory's lock, the clean-shutdown record,
private modes."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
from pathlib import Path

import pytest

from valmi_sidecar.store import DB_NAME, DataDirLockedError, Delivered

from .conftest import Clock, OpenStore, action


async def test_second_open_in_same_process_is_refused(open_store: OpenStore) -> None:
    await open_store()
    with pytest.raises(DataDirLockedError, match=rf"pid {os.getpid()}\b.*--data-dir"):
        await open_store()


async def test_open_is_refused_while_another_process_holds_the_lock(
    open_store: OpenStore, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    holder = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        holder,
        str(data_dir / "lock"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            assert b"locked\n" == await proc.stdout.readline()
        with pytest.raises(DataDirLockedError, match=rf"pid {proc.pid}\b"):
            await open_store()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        async with asyncio.timeout(10):
            await proc.wait()
    await open_store()  # free again once the holder exited


async def test_lock_is_released_on_close(open_store: OpenStore) -> None:
    store = await open_store()
    await store.close()
    await open_store()


async def test_start_after_a_clean_close_skips_the_check_and_knows_the_queue(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    """A clean close leaves a record (0600) that the next start uses instead of reading
    the whole file; the start deletes it, so a crash after it never leaves a stale one."""
    record = tmp_path / "data" / "clean-shutdown"
    first = await open_store(recover_corrupt=True)
    assert "passed" == first.startup_check  # a new file: nothing recorded yet
    await first.submit([action(clock) for _ in range(25)])
    before = first.counts()
    await first.close()
    assert 0o600 == stat.S_IMODE(record.stat().st_mode)

    second = await open_store(recover_corrupt=True)
    assert not record.exists()
    assert "skipped" == second.startup_check
    after = second.counts()
    assert (25, before.queued_bytes) == (after.queued, after.queued_bytes)
    assert before.queued_bytes > 0
    (leased,) = await second.lease(1, ())
    await second.settle([Delivered(leased.seq)])
    assert (24, before.queued_bytes - len(leased.body)) == (
        second.counts().queued,
        second.counts().queued_bytes,
    )


async def test_a_file_changed_after_the_clean_close_is_checked_and_counted_again(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    first = await open_store(recover_corrupt=True)
    await first.submit([action(clock) for _ in range(10)])
    await first.close()
    with sqlite3.connect(tmp_path / "data" / DB_NAME) as conn:  # someone else's change
        conn.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events LIMIT 4)")
    conn.close()

    second = await open_store(recover_corrupt=True)
    assert "passed" == second.startup_check
    assert 6 == second.counts().queued  # the file's own count, not the record's 10


_CRASH_AFTER_SUBMIT = """
import asyncio, os, sys
from pathlib import Path
from valmi_sidecar.events import parse_one
from valmi_sidecar.store import Store

async def main():
    store = await Store.open(Path(sys.argv[1]), recover_corrupt=True, prune_interval_s=None)
    await store.submit([parse_one("action", b'{"agent_key": "a", "action_type": "t"}')])
    os._exit(0)  # no close: as a SIGKILL or a power cut would leave it

asyncio.run(main())
"""


async def test_a_store_that_did_not_close_cleanly_is_checked_at_the_next_start(
    open_store: OpenStore, clock: Clock, tmp_path: Path
) -> None:
    first = await open_store(recover_corrupt=True)
    await first.submit([action(clock)])
    await first.close()
    assert (tmp_path / "data" / "clean-shutdown").exists()
    crash = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASH_AFTER_SUBMIT, str(tmp_path / "data")
    )
    assert 0 == await asyncio.wait_for(crash.wait(), 60)
    assert not (tmp_path / "data" / "clean-shutdown").exists()
    second = await open_store(recover_corrupt=True)
    assert "passed" == second.startup_check
    assert 2 == second.counts().queued


async def test_data_dir_and_files_are_private(open_store: OpenStore, tmp_path: Path) -> None:
    data_dir = tmp_path / "deep" / "data"
    store = await open_store(data_dir)
    assert 0o700 == stat.S_IMODE(data_dir.stat().st_mode)
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", "lock"):
        assert (name, 0o600) == (name, stat.S_IMODE((data_dir / name).stat().st_mode))
    assert store.path == data_dir / DB_NAME


async def test_existing_data_dir_is_made_private(open_store: OpenStore, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    await open_store(data_dir)
    assert 0o700 == stat.S_IMODE(data_dir.stat().st_mode)
