"""The files around the database: the lock, the clean-shutdown record, moving a damaged
file aside, and who owns them. Blocking: the store runs these with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import msgspec
import structlog

from .records import DataDirLockedError, StoreError
from .schema import CLEAN_NAME, DB_NAME, LOCK_NAME, MOVED_ASIDE_MARK, SCHEMA_VERSION
from .sql import JSON

log = structlog.get_logger("valmi_sidecar.store")


def private_copy(path: Path, wal: Path) -> Path:
    """A copy of a database and its WAL in a new private temporary directory."""
    copy_dir = Path(tempfile.mkdtemp(prefix="valmi-sidecar-read-"))
    try:
        shutil.copyfile(path, copy_dir / DB_NAME)
        shutil.copyfile(wal, copy_dir / (DB_NAME + "-wal"))
    except OSError as exc:
        shutil.rmtree(copy_dir, ignore_errors=True)
        raise StoreError(
            f"cannot copy {path} and its WAL to {copy_dir.parent} to read them without "
            f"changing them: {exc.strerror}; set TMPDIR to a directory with room for "
            f"{path.stat().st_size + wal.stat().st_size} bytes"
        ) from exc
    return copy_dir


def moved_aside_files(data_dir: Path) -> list[Path]:
    """The corrupt databases moved aside in ``data_dir`` (not their -wal/-shm files)."""
    return sorted(
        p
        for p in Path(data_dir).glob(f"{DB_NAME}{MOVED_ASIDE_MARK}*")
        if not p.name.endswith(("-wal", "-shm"))
    )


def move_aside(path: Path) -> Path:
    """Rename a damaged database (with its -wal and -shm) to ``queue.db.corrupt-<UTC time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}{MOVED_ASIDE_MARK}{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}{MOVED_ASIDE_MARK}{stamp}-{n}")
    os.rename(path, dest)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.rename(side, dest.with_name(dest.name + suffix))
    _fsync_dir(path.parent)
    return dest


def _fsync_dir(directory: Path) -> None:
    """Make renames and deletions in ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def lock_data_dir(data_dir: Path) -> int:
    """Create ``data_dir`` (0700), take its exclusive lock, write our pid; return the fd.
    Run as root on another user's directory, give that user back any file of ours that
    is root's (see ``give_files``)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = data_dir.stat()
    if stat.S_IMODE(st.st_mode) != 0o700:
        if st.st_uid == os.geteuid():
            data_dir.chmod(0o700)
        else:
            log.warning(
                "data_dir_not_private", path=str(data_dir), mode=oct(stat.S_IMODE(st.st_mode))
            )
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except PermissionError:
        raise StoreError(_not_ours(path)) from None
    try:
        _give_fd(fd, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise DataDirLockedError(
                f"another valmi-sidecar (pid {holder}) is using {data_dir}; "
                "stop it or choose another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        give_files(data_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_ours(path: Path) -> str:
    """Why a file of the data directory cannot be opened, and what to do about it."""
    try:
        owner = path.stat().st_uid
    except OSError:
        owner = -1
    return (
        f"cannot open {path}: permission denied: it belongs to uid {owner} and this "
        f"process runs as uid {os.geteuid()} (a command run as another user, such as "
        "root, left it); stop every valmi-sidecar on this directory and give its files to "
        f"the user the service runs as: chown -R {os.geteuid()}:{os.getegid()} {path.parent}"
    )


def _foreign_owner(data_dir: Path) -> tuple[int, int] | None:
    """The owner and group that the files this process makes in ``data_dir`` must have,
    when they are not its own: run as root on a directory of another user (the service
    account), files left as root's would lock that user out. ``None`` otherwise."""
    if os.geteuid() != 0:
        return None
    st = os.stat(data_dir)
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def _give_fd(fd: int, path: Path) -> None:
    """Give the open file ``path`` to the owner of its directory, when that is due (see
    ``_foreign_owner``)."""
    owner = _foreign_owner(path.parent)
    if owner is None:
        return
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != owner and _only_name(st, path):
        _fchown(fd, owner, str(path))


def _only_name(st: os.stat_result, path: Path) -> bool:
    """Whether the open file ``st`` is a regular file whose only name is ``path`` (not a
    link planted there to a file elsewhere, which root must not give away)."""
    try:
        named = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_nlink == 1
        and (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino)
    )


def _fchown(fd: int, owner: tuple[int, int], where: str) -> bool:
    try:
        os.fchown(fd, *owner)
    except OSError as exc:  # a user namespace that does not map the owner, say
        log.warning(
            "file_owner_not_restored",
            path=where,
            uid=owner[0],
            error=f"{type(exc).__name__}: {exc.strerror}",
        )
        return False
    return True


def give_files(data_dir: Path) -> None:
    """Run as root on another user's data directory: give that user the sidecar's files
    in it that are not theirs yet (the lock, the database and its -wal and -shm, the
    clean-shutdown record, moved-aside files), those made now and any a command run as
    root left before. Each is opened without following a link and changed only if it is
    a regular file with no other name, so a link planted in the directory gives nothing
    else away."""
    owner = _foreign_owner(data_dir)
    if owner is None:
        return
    names = [LOCK_NAME, *(p.name for p in data_dir.glob(f"{DB_NAME}*"))]
    names += [p.name for p in data_dir.glob(f"{CLEAN_NAME}*")]
    for name in names:
        try:
            fd = os.open(
                data_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError:
            continue  # gone meanwhile, or a link: not ours to change
        try:
            st = os.fstat(fd)
            path = data_dir / name
            if (
                (st.st_uid, st.st_gid) != owner
                and _only_name(st, path)
                and _fchown(fd, owner, str(path))
            ):
                log.info("file_owner_restored", path=str(path), uid=owner[0])
        finally:
            os.close(fd)


def create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (or make it 0600 if ours),
    owned like the directory when run as root on another user's (SQLite then gives its
    -wal and -shm files the database's owner)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except PermissionError:
        raise StoreError(_not_ours(path)) from None
    try:
        _give_fd(fd, path)
    finally:
        os.close(fd)
    for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        # SQLite would say only "unable to open database file".
        try:
            os.close(os.open(side, os.O_RDWR | os.O_CLOEXEC))
        except FileNotFoundError:
            continue
        except PermissionError:
            raise StoreError(_not_ours(side)) from None
    chmod_private(path)


def chmod_private(path: Path) -> None:
    """Make the database and its WAL and shared-memory files 0600 (those we own)."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if stat.S_IMODE(st.st_mode) != 0o600 and st.st_uid == os.geteuid():
            p.chmod(0o600)


def _identity(path: Path) -> list[int] | None:
    """The database file's inode, size and modification time, or ``None`` when there is
    no file or its WAL has content (then it was not closed cleanly, or is in use)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    with contextlib.suppress(FileNotFoundError):
        if path.with_name(path.name + "-wal").stat().st_size:
            return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def take_clean_record(data_dir: Path) -> tuple[int, int] | None:
    """Delete the clean-shutdown record (durably, before any write to the database) and
    return the queue's size it holds, ``(events, bytes)``, when the database file is still
    the one it describes; ``None`` when there is none or it does not match."""
    record = data_dir / CLEAN_NAME
    try:
        raw = record.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        # Not readable by this user (another user's, such as root's, or not a file): it
        # cannot vouch for the database, so start-up runs the full check, as after a
        # crash. It is removed so that the next clean close can write one again.
        removed = True
        try:
            record.unlink()
            _fsync_dir(data_dir)
        except OSError:
            removed = False  # never read, so never trusted: only the check's time is lost
        log.warning(
            "clean_record_unreadable",
            path=str(record),
            error=f"{type(exc).__name__}: {exc.strerror}",
            removed=removed,
            action="running the full start-up check, as after a crash",
        )
        return None
    record.unlink()
    _fsync_dir(data_dir)
    try:
        saved = msgspec.json.decode(raw)
        identity = _identity(data_dir / DB_NAME)
        if (
            identity is None
            or saved.get("schema") != SCHEMA_VERSION
            or saved.get("identity") != identity
        ):
            return None
        return int(saved["queued"]), int(saved["queued_bytes"])
    except (msgspec.DecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None


def write_clean_record(data_dir: Path, queued: int, queued_bytes: int) -> None:
    """Record a clean close (after the connections closed and SQLite removed the WAL)."""
    identity = _identity(data_dir / DB_NAME)
    if identity is None:
        return
    body = JSON.encode(
        {
            "schema": SCHEMA_VERSION,
            "identity": identity,
            "queued": queued,
            "queued_bytes": queued_bytes,
        }
    )
    tmp = data_dir / (CLEAN_NAME + ".tmp")
    # A new file, never one found there: a link would make this write land elsewhere.
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _give_fd(fd, tmp)
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, data_dir / CLEAN_NAME)
