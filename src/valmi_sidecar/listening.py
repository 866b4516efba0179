"""Where a sidecar listens: binding the API (in this process, or through ingest workers)
and the ops listener, what a failed bind means for the person running it, and the
address record operator commands read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web

from . import __version__
from .config import ADDRESS_NAME, Settings, split_listen
from .receiver import make_runner
from .workers import IngestWorkers, listen_sockets

log = structlog.get_logger("valmi_sidecar.service")

#: Extra seconds allowed for closing a listener's runner.
CLOSE_TIMEOUT_S: Final = 10.0
#: Seconds the ops listener lets a request in flight finish when it closes.
OPS_SHUTDOWN_S: Final = 1.0
#: How a person gives the sidecar another listen address.
LISTEN_FLAG: Final = "--listen HOST:PORT or VALMI_SIDECAR_LISTEN"


class ListenError(Exception):
    """The listen address cannot be bound; the message says which and what to do."""

    def __init__(self, message: str, action: str) -> None:
        super().__init__(message)
        self.action = action


def listen_error(exc: OSError, listen: str, flag: str = LISTEN_FLAG) -> ListenError | None:
    """What a failed bind means for the person running the server (``None`` when ``exc``
    is not about the address); ``flag`` is how they give it another address."""
    port = split_listen(listen)[1]
    if exc.errno == errno.EADDRINUSE:
        return ListenError(
            f"cannot listen on {listen}: the address is already in use",
            f"another program listens there, perhaps another valmi-sidecar (`ss -ltnp "
            f"'sport = :{port}'` names it); stop it, or choose another address with {flag}",
        )
    if exc.errno == errno.EACCES:
        return ListenError(
            f"cannot listen on {listen}: permission denied",
            f"ports below 1024 need privileges; choose a port from 1024 up with {flag}",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(
            f"cannot listen on {listen}: no network interface of this host has that address",
            f"listen on 127.0.0.1 or on an address of this host ({flag})",
        )
    return None


def address_text(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Makes the ingest workers, given the shared listening sockets and the loopback port
#: of the whole API (the caller keeps them, to stop them later).
WorkersFactory = Callable[[list[socket.socket], int], IngestWorkers]


async def listen(
    runner: web.AppRunner, settings: Settings, make_workers: WorkersFactory
) -> tuple[str, int]:
    """Serve ``runner``'s application on ``settings.listen``, in this process or through
    ingest workers; the address bound. ``ListenError`` when the address cannot be bound."""
    s = settings
    try:
        if s.ingest_processes > 1:
            host, port = await _start_workers(runner, s, make_workers)
        else:
            await web.TCPSite(runner, s.host, s.port, backlog=1024).start()
            host, port = runner.addresses[0][:2]
    except OSError as exc:
        problem = listen_error(exc, s.listen)
        if problem is None:
            raise
        raise problem from exc
    return host, port


async def _start_workers(
    runner: web.AppRunner, settings: Settings, make_workers: WorkersFactory
) -> tuple[str, int]:
    """Serve the whole API on a loopback port of its own for the workers to pass on
    what they do not serve, and start the workers on the shared listening socket."""
    ops = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await ops.start()
    socks = listen_sockets(settings.host, settings.port)
    try:
        address = socks[0].getsockname()
        ops_port = runner.addresses[-1][1]
        await make_workers(socks, ops_port).start()
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    log.info("ingest_workers_listening", internal=f"127.0.0.1:{ops_port}")
    return address[0], address[1]


@contextlib.asynccontextmanager
async def ops_listener(ops: web.Application, settings: Settings) -> AsyncIterator[tuple[str, int]]:
    """Serve the ops application on ``settings.ops_listen`` while the block runs; yields
    the address bound."""
    # Its handlers read memory only: nothing in flight there is worth waiting for.
    runner = make_runner(ops, settings, shutdown_timeout_s=OPS_SHUTDOWN_S)
    await runner.setup()
    try:
        host, port = split_listen(settings.ops_listen)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise OSError(
                exc.errno, f"ops_listen {settings.ops_listen!r}: {exc.strerror or exc}"
            ) from exc
        bound_host, bound_port = runner.addresses[0][:2]
        yield bound_host, bound_port
    finally:
        await asyncio.wait_for(runner.cleanup(), CLOSE_TIMEOUT_S)


def record_address(data_dir: Path, url: str) -> Path | None:
    """Write where this sidecar listens into its data directory (``ADDRESS_NAME``), for
    operator commands, which trust it only while this process holds the directory's lock;
    the file written, or ``None`` if it could not be. Blocks: run it off the event loop."""
    path = data_dir / ADDRESS_NAME
    tmp = path.with_name(path.name + ".tmp")
    record = json.dumps({"url": url, "pid": os.getpid(), "version": __version__})
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(record + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        # Not fatal: commands then need --url, as they did before this file existed.
        log.warning("address_not_recorded", path=str(path), error=exc.strerror)
        return None
    return path


def url_of(host: str, port: int) -> str:
    """The base URL of ``host:port``."""
    return f"http://{address_text(host, port)}"
