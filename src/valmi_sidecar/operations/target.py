"""Which sidecar an operator command acts on, and through what: its API when it answers,
else its database. The choice is made once, when the command starts."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import ADDRESS_NAME, Settings, split_listen
from ..store import DB_NAME, LOCK_NAME
from .http import HttpOperations
from .interface import OperationError, Operations
from .local import LocalOperations


@dataclass(frozen=True)
class Target:
    """Where an operator command acts: the running sidecar's API, else the data directory."""

    settings: Settings
    base: str
    timeout: float
    #: Why ``base``: ``--url``, the address the running sidecar recorded, or ``listen``.
    why: str = "listen"
    #: No sidecar holds the data directory: read its database without asking any API
    #: (another sidecar may listen on the default address, with other numbers).
    offline: bool = False

    @property
    def db(self) -> Path:
        return self.settings.data_dir / DB_NAME

    def source(self, *, api: bool) -> str:
        """Whose numbers these are, for the output."""
        if api:
            return f"{self.base} ({self.why})"
        return f"{self.db} (no sidecar running)"


def status_url(settings: Settings) -> str:
    """``http://HOST:PORT/v1/status`` for the sidecar that ``settings`` describe; a wildcard
    listen address is asked on loopback."""
    host, port = split_listen(settings.listen)
    if host in ("0.0.0.0", ""):  # noqa: S104 - mapping the wildcard to loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1/status"


def recorded_url(data_dir: Path) -> str | None:
    """The URL the sidecar holding ``data_dir`` recorded there (``ADDRESS_NAME``)."""
    try:
        record = json.loads((data_dir / ADDRESS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    url = record.get("url") if isinstance(record, dict) else None
    return url if isinstance(url, str) and url.startswith("http") else None


def sidecar_holds(data_dir: Path) -> bool:
    """Whether a sidecar holds the data directory's lock (it runs, wherever it listens)."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise OperationError(f"cannot read {data_dir / LOCK_NAME}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def target_for(settings: Settings, *, url: str | None, timeout: float) -> Target:
    """The sidecar of ``settings``: at ``url`` when given, else at the address the sidecar
    holding the data directory recorded, else at ``listen``."""
    if url is not None:
        return Target(settings, url.split("/v1/", 1)[0].rstrip("/"), timeout, "--url")
    default = status_url(settings).removesuffix("/v1/status")
    data_dir = settings.data_dir
    if sidecar_holds(data_dir):
        recorded = recorded_url(data_dir)
        if recorded is not None:
            return Target(settings, recorded, timeout, f"the sidecar holding {data_dir}")
        return Target(settings, default, timeout)
    return Target(settings, default, timeout, offline=(data_dir / DB_NAME).is_file())


async def choose(
    t: Target,
    path: str,
    *,
    announce: Callable[[str], None] | None,
    create: bool = False,
) -> Operations:
    """The one implementation a command uses: the API when it answers there, else the data
    directory's database. ``path`` is the command's route, for the messages; ``create``
    when the command may be the first to write the database. ``announce`` is told whose
    answers they are (the API's at its first answer, the database's now)."""
    if not t.offline:
        token = t.settings.ingest_token
        api = HttpOperations(
            t.base,
            t.source(api=True),
            token=None if token is None else token.reveal(),
            timeout=t.timeout,
            max_body_bytes=t.settings.max_body_bytes,
            announce=announce,
        )
        try:
            if await api.answers(path):
                return api
        except BaseException:
            await api.aclose()
            raise
        await api.aclose()
    return await asyncio.to_thread(_local, t, path, announce, create)


def _local(
    t: Target, path: str, announce: Callable[[str], None] | None, create: bool
) -> LocalOperations:
    data_dir = t.settings.data_dir
    if sidecar_holds(data_dir):
        raise OperationError(
            f"a sidecar holds {data_dir} but nothing answers at {t.base}{path}; "
            "pass --url with its listen address"
        )
    if not create and not t.db.is_file():
        raise OperationError(
            f"no sidecar answering at {t.base}{path}; is `valmi-sidecar run` running? "
            f"(and no database at {t.db} to read instead; pass --data-dir)"
        )
    source = t.source(api=False)
    if announce is not None:
        announce(source)
    return LocalOperations.of_file(t.db, source, settings=t.settings)
