"""What every operator command shares: which sidecar it acts on, and the one
``Operations`` it uses for that, chosen when it starts."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

from ..config import Settings, default_data_dir, env_var, load_settings
from ..logs import configure_logging
from ..operations import (
    LocalOperations,
    OperationError,
    Operations,
    Target,
    choose,
    sidecar_holds,
    target_for,
)
from ..store import DB_NAME, ReadOnlyDatabase, StoreError
from .output import PROG, CliError, announce

_T = TypeVar("_T")

#: Where the systemd unit keeps the queue (``StateDirectory=valmi-sidecar``).
SYSTEMD_DATA_DIR: Final = Path("/var/lib/valmi-sidecar")


def service_data_dir(
    settings: Settings, explicit: bool, system_dir: Path = SYSTEMD_DATA_DIR
) -> Path:
    """The data directory an operator command reads: the configured one, except that an
    admin on a VM who names none and has no queue of their own gets the systemd service's
    (the unit sets ``$STATE_DIRECTORY`` for the service alone, not for a login shell)."""
    data_dir = settings.data_dir
    if explicit or data_dir != default_data_dir() or (data_dir / DB_NAME).exists():
        return data_dir
    try:
        if (system_dir / DB_NAME).is_file():
            return system_dir
    except PermissionError:
        raise CliError(
            f"the service's data directory {system_dir} is readable by root only; run the "
            f"command as root (sudo {PROG} …), or pass --data-dir"
        ) from None
    return data_dir


def target(args: argparse.Namespace) -> Target:
    """The sidecar the command's flags, config file and environment name."""
    given = getattr(args, "data_dir", None)
    settings = load_settings(argv_overrides={"data_dir": given}, config_file=args.config)
    explicit = given is not None or bool(os.environ.get(env_var("data_dir")))
    data_dir = service_data_dir(settings, explicit)
    if data_dir != settings.data_dir:
        settings = dataclasses.replace(settings, data_dir=data_dir)
    try:
        return target_for(settings, url=args.url, timeout=args.timeout)
    except OperationError as e:
        raise CliError(str(e)) from e


def quiet_logs() -> None:
    """Store logs go to stderr, warnings and worse only: stdout is the command's output."""
    configure_logging("warning", "console")


def run(work: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's work; its store and operation errors are the command's errors."""
    try:
        return asyncio.run(work)
    except (StoreError, OperationError) as e:
        raise CliError(str(e)) from e


@asynccontextmanager
async def operations(
    t: Target, path: str, *, announced: bool = True, create: bool = False, writes: bool = False
) -> AsyncIterator[Operations]:
    """The command's ``Operations``: the API when the sidecar answers, else the database
    (``writes``: the store is opened, its logs kept to warnings on stderr)."""
    ops = await choose(t, path, announce=announce if announced else None, create=create)
    if writes and isinstance(ops, LocalOperations):
        quiet_logs()
    try:
        yield ops
    finally:
        await ops.aclose()


def read_only(path: Path, *, untouched: bool = False) -> ReadOnlyDatabase:
    try:
        return ReadOnlyDatabase(path, untouched=untouched)
    except StoreError as e:
        raise CliError(str(e)) from e


def is_live(t: Target, path: Path) -> bool:
    """Whether ``path`` is a database a sidecar may be writing (the data directory's)."""
    return path.resolve() == t.db.resolve() or (path.name == DB_NAME and sidecar_holds(path.parent))


def file_operations(t: Target, path: Path) -> LocalOperations:
    """Reads of a database named on the command line (``--from``: a moved-aside one,
    usually), without creating anything beside it unless it is live."""
    source = f"{path} (--from)"
    announce(source)
    return LocalOperations.of_file(path, source, untouched=not is_live(t, path))
