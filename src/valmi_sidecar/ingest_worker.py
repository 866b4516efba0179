"""An ingest worker process (``ingest_processes`` > 1): the worker's side of ``workers.py``.

A worker serves ingest on the listening sockets it inherited and sends each validated
event to the main process over its channel (``MainLink``); every other route it passes,
unchanged, to the main process's loopback port. It drains when the main process says so
or on SIGTERM, and stops at once when its channel ends.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Final

import structlog
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from yarl import URL

from . import runtime
from .api_errors import RETRY_AFTER_STORE_ERROR_S, ApiError
from .channel import (
    Answers,
    ChannelClosedError,
    Drain,
    Failed,
    Hello,
    Ok,
    Ready,
    Refused,
    Reload,
    Submission,
    Submit,
    read_frame,
    write_frame,
)
from .config import Secret, Settings
from .events import NewEvent
from .receiver import (
    INGEST,
    LIFECYCLE,
    REFUSED,
    TOKEN,
    Lifecycle,
    Submitter,
    add_ingest_routes,
    check_accepting,
    ingest_app,
    make_runner,
)
from .store import (
    Accepted,
    IdempotencyConflictError,
    OutcomeUnknownError,
    QueueFullError,
    StoreError,
)

# One logger name for both sides of the ingest workers (see ``workers.py``).
log = structlog.get_logger("valmi_sidecar.workers")

#: How often a worker reports its refusal counts, at most.
REFUSED_REPORT_S: Final = 1.0
#: Extra seconds after ``shutdown_grace_s`` before a worker that did not exit is killed.
KILL_AFTER_S: Final = 5.0
#: Headers that belong to one hop, not passed on by the proxy (RFC 9110, 7.6.1).
_HOP_HEADERS: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class MainLink:
    """The worker's store: each submission goes to the main process, batched per loop
    pass, and returns (or raises) what the main process's store did."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._waiting: dict[int, asyncio.Future[list[Accepted]]] = {}
        self._out: list[Submission] = []
        self._ids = itertools.count()
        self.gone: str | None = None

    def submit_soon(self, events: Sequence[NewEvent]) -> asyncio.Future[list[Accepted]]:
        """Send ``events`` with the next frame; the future resolves with the main process's
        answer. Raises ``StoreError`` at once when the main process is gone."""
        if self.gone is not None:
            raise StoreError(f"the sidecar's main process is gone ({self.gone})")
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        future: asyncio.Future[list[Accepted]] = loop.create_future()
        self._waiting[rid] = future
        # Forgotten once answered, failed or cancelled (its client left).
        future.add_done_callback(lambda _: self._waiting.pop(rid, None))
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(Submission(rid, list(events)))
        return future

    def _flush(self) -> None:
        write_frame(self._writer, Submit(self._out))
        self._out = []

    def answered(self, items: Sequence[Ok | Failed]) -> None:
        for item in items:
            future = self._waiting.get(item.rid)
            if future is None or future.done():
                continue
            match item:
                case Ok(_, stored):
                    future.set_result([Accepted(s.id, s.created_at, s.duplicate) for s in stored])
                case Failed(_, "queue_full", message, retry_after_s):
                    future.set_exception(QueueFullError(message, retry_after_s))
                case Failed(_, "conflict", key):
                    future.set_exception(IdempotencyConflictError(key))
                case Failed(_, "store", message):
                    future.set_exception(StoreError(message))
                case Failed(_, _, message):  # "unknown", or "internal": it may be committed
                    future.set_exception(OutcomeUnknownError(message))

    def close(self, reason: str) -> None:
        """The main process is gone. A submission still in ``_out`` never left this
        process: nothing of it was stored. One that was written to the channel may have
        been committed before the main process stopped, unanswered."""
        self.gone = reason
        unsent = {submission.rid for submission in self._out}
        self._out = []
        for rid, future in self._waiting.items():
            if future.done():
                continue
            if rid in unsent:
                future.set_exception(StoreError(f"the sidecar's main process is gone ({reason})"))
            else:
                future.set_exception(
                    OutcomeUnknownError("the sidecar's main process stopped before it answered")
                )


OPS: Final = web.AppKey("ops", ClientSession)
OPS_URL: Final = web.AppKey("ops_url", str)


async def _proxy(request: web.Request) -> web.StreamResponse:
    """Pass a request the worker does not serve itself to the main process, unchanged."""
    session = request.app[OPS]
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
    body = await request.read()
    url = URL(request.app[OPS_URL] + request.raw_path, encoded=True)
    try:
        async with session.request(
            request.method,
            url,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            auto_decompress=False,
        ) as answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in _HOP_HEADERS:
                    response.headers.add(name, value)
            if answer.content_length is not None:
                response.content_length = answer.content_length
            await response.prepare(request)
            async for chunk in answer.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response
    except ClientError as exc:
        check_accepting(request)  # draining: the same 503 as the main process's
        raise ApiError(
            503,
            "main_unavailable",
            "the sidecar's main process did not answer; retry shortly",
            retry_after_s=RETRY_AFTER_STORE_ERROR_S,
        ) from exc


async def _ops_session(app: web.Application) -> AsyncIterator[None]:
    # No total timeout: an export of many dead letters streams for as long as it takes.
    timeout = ClientTimeout(total=None, sock_connect=5.0)
    async with ClientSession(
        connector=TCPConnector(limit=0), timeout=timeout, auto_decompress=False
    ) as session:
        app[OPS] = session
        yield


async def _report_refused(
    writer: asyncio.StreamWriter, refused: dict[str, int], sent: dict[str, int]
) -> None:
    while True:
        await asyncio.sleep(REFUSED_REPORT_S)
        _send_refused(writer, refused, sent)


def _send_refused(
    writer: asyncio.StreamWriter, refused: dict[str, int], sent: dict[str, int]
) -> None:
    delta = {code: n - sent.get(code, 0) for code, n in refused.items() if n != sent.get(code, 0)}
    if delta:
        write_frame(writer, Refused(delta))
        sent.update(refused)


def worker_app(settings: Settings, ops_port: int, link: Submitter) -> web.Application:
    """A worker's application: ingest served here, with ``link`` as its store; every
    other route passed to the main process's loopback port ``ops_port``."""
    lifecycle = Lifecycle(ready=True)
    app = ingest_app(settings, lifecycle, fallback=_proxy)
    add_ingest_routes(app)
    app[INGEST] = link
    app[OPS_URL] = f"http://127.0.0.1:{ops_port}"
    app.cleanup_ctx.append(_ops_session)
    return app


def _reload(app: web.Application, changes: Reload) -> None:
    from .logs import redact_also, set_level  # noqa: PLC0415 - as configure_logging

    token = changes.ingest_token
    if token:
        redact_also(token)
    app[TOKEN].secret = Secret(token) if token else None
    set_level(changes.log_level)


async def _follow_main(
    reader: asyncio.StreamReader, link: MainLink, stop: asyncio.Event, app: web.Application
) -> bool:
    """Read the main process's frames until it says drain (True) or the channel ends
    (False: the main process is gone)."""
    try:
        while True:
            match await read_frame(reader):
                case Answers(items):
                    link.answered(items)
                case Reload() as changes:
                    _reload(app, changes)
                case Drain():
                    stop.set()
                case _:
                    pass  # a frame for the main process: not sent this way
    except ChannelClosedError as exc:
        link.close(str(exc) or "its channel closed")
        gone = not stop.is_set()
        if gone:
            log.error("ingest_worker_lost_main")
        stop.set()
        return not gone


async def run_worker(listen_fds: Sequence[int], channel_fd: int) -> int:
    """One ingest worker, until its main process says drain, SIGTERM, or the channel ends."""
    from .logs import configure_logging  # noqa: PLC0415 - after the exec, once

    listeners = [socket.socket(fileno=fd) for fd in listen_fds]
    channel = socket.socket(fileno=channel_fd)
    reader, writer = await asyncio.open_unix_connection(sock=channel, limit=2**20)
    try:
        hello = await read_frame(reader)
    except ChannelClosedError:
        return 1
    if not isinstance(hello, Hello):
        return 1
    settings = hello.settings.settings()
    configure_logging(
        settings.log_level, settings.log_format, settings.secrets(), access_log=settings.access_log
    )
    structlog.contextvars.bind_contextvars(ingest_worker=hello.index)
    link = MainLink(writer)
    app = worker_app(settings, hello.ops_port, link)
    runner = make_runner(app, settings)
    await runner.setup()
    for listener in listeners:
        await web.SockSite(runner, listener, backlog=1024).start()

    stop = asyncio.Event()
    # SIGHUP: a closed terminal or `systemctl kill -s HUP` reaches the workers too; the
    # main process reloads and sends the result over the channel.
    handlers = {**dict.fromkeys(runtime.STOP_SIGNALS, stop.set), signal.SIGHUP: _ignore}
    with runtime.signal_handlers(handlers):
        return await _serve_main(
            runner, settings, reader=reader, writer=writer, link=link, stop=stop
        )


def _ignore() -> None:
    pass


async def _serve_main(
    runner: web.AppRunner,
    settings: Settings,
    *,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    link: MainLink,
    stop: asyncio.Event,
) -> int:
    """Serve until ``stop``, then drain; the worker's exit code."""
    app = runner.app
    loop = asyncio.get_running_loop()
    refused: dict[str, int] = app[REFUSED]
    sent: dict[str, int] = {}
    follow = loop.create_task(_follow_main(reader, link, stop, app), name="channel")
    report = loop.create_task(_report_refused(writer, refused, sent), name="refused")
    write_frame(writer, Ready())
    exit_code = 0
    try:
        await stop.wait()
        app[LIFECYCLE].draining = True
        bound = settings.shutdown_grace_s + KILL_AFTER_S
        try:
            await asyncio.wait_for(runner.cleanup(), bound)
        except TimeoutError:
            log.error("shutdown_overran", bound_s=bound)
            exit_code = 1
        _send_refused(writer, refused, sent)
    finally:
        report.cancel()
        if not follow.done():
            follow.cancel()
        await asyncio.wait({report, follow}, timeout=1.0)
        writer.close()
    if follow.done() and not follow.cancelled() and follow.result() is False:
        exit_code = 1
    return exit_code


def main(argv: Sequence[str]) -> int:
    """``LISTEN_FD[,LISTEN_FD...] CHANNEL_FD``, as ``IngestWorkers`` passes them."""
    listen_fds = [int(fd) for fd in argv[0].split(",")]
    channel_fd = int(argv[1])
    return runtime.run(run_worker(listen_fds, channel_fd))
