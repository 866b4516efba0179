"""A lean floor for the sidecar's cost per event (issue 19): not part of the product.

    python benchmarks/floor.py --listen 127.0.0.1:0 --data-dir DIR --api-url URL \\
        [--upstream-concurrency 16]

The least a durable, forwarding sidecar must do, in one Python process (uvloop when
installed, aiohttp): ``POST /v1/actions`` and ``/v1/outcomes`` decode and check the body
exactly as the sidecar does (``valmi_sidecar.events``: what the sidecar refuses with
``400`` this refuses too, and the upstream body is byte for byte the sidecar's); one writer
thread (stdlib ``sqlite3``, WAL, ``synchronous=FULL``) commits everything waiting in one
transaction and answers the whole group with one hop back to the loop; ``202`` only after
that commit. Committed events go in memory to a fixed pool of sender tasks, each posting
with the event's ``Idempotency-Key`` through one ``aiohttp.ClientSession``; a delivery
(``2xx`` or ``409``) deletes the row in the next ingest commit, or alone after
``RIDE_S``. Rows left at start-up (a crash) are sent again, with their keys.

What it leaves out, which the sidecar must do: client ``Idempotency-Key`` de-duplication,
the ledger, counters and metrics, dead letters, backoff with jitter, rate limiting, the
queue's size limits, the local-only guard (``Host``, ``Origin``), the ingest token, the
batch route and the operator routes. A retryable failure is tried again after
``RETRY_S``; any other refusal keeps its row and stops sending it.

Settings as the sidecar's, from flags or the same environment variables
(``VALMI_SIDECAR_LISTEN``, ``VALMI_SIDECAR_DATA_DIR``, ``VALMI_API_URL``,
``VALMI_SIDECAR_UPSTREAM_CONCURRENCY``); the API key from ``VALMI_API_KEY`` only. Without
a key nothing is forwarded (ingest only), as with the sidecar. Logs are JSON lines on
stdout; ``floor_ready`` carries the address it listens on. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgspec
import structlog
from aiohttp import web
from yarl import URL

from valmi_sidecar.events import (
    PATHS,
    Kind,
    ValidationError,
    check_body,
    check_idempotency_key,
    decode,
    new_event_id,
    rfc3339,
)

log = structlog.get_logger("floor")

#: Seconds a delivery waits for an ingest commit to ride on before it is committed alone.
RIDE_S: Final = 0.1
#: Seconds before a retryable failure (transport error, 408, 429, 5xx) is sent again.
RETRY_S: Final = 1.0
#: The sidecar's default ``max_body_bytes``.
MAX_BODY_BYTES: Final = 1024 * 1024
UPSTREAM_TIMEOUT_S: Final = 30.0

_decoder: Final = msgspec.json.Decoder()
_encode: Final = msgspec.json.Encoder().encode
_JSON: Final = "application/json"


# -- the body check: pure ------------------------------------------------------------------


def upstream_body(kind: Kind, raw: bytes, created_at: str) -> bytes:
    """The exact body the sidecar would send upstream for ``raw``, with a missing (or
    ``null``) ``timestamp`` filled with ``created_at``; raise ``ValidationError`` for
    whatever the sidecar refuses.

    The fast path is the sidecar's: when ``raw`` minified equals the decoded object
    re-encoded, no key repeats and the re-encoding is the body. Anything else goes
    through ``events.decode``, which refuses what the sidecar refuses, with its messages.
    """
    encoded: bytes | None
    try:
        obj = _decoder.decode(raw)
        encoded = _encode(obj)
        if msgspec.json.format(raw, indent=-1) != encoded:
            encoded = None
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        encoded = None
    if encoded is None:
        obj = decode(raw)
    problems = check_body(kind, obj)
    if problems:
        raise ValidationError(problems)
    if obj.get("timestamp") is not None:
        return encoded if encoded is not None else _encode(obj)
    if encoded is not None and "timestamp" not in obj:
        # check_body requires fields, so the object is not empty: append the member last,
        # as encoding ``{**obj, "timestamp": created_at}`` would (nothing to escape).
        return b'%s,"timestamp":"%s"}' % (encoded[:-1], created_at.encode())
    filled = {k: v for k, v in obj.items() if k != "timestamp"}
    filled["timestamp"] = created_at
    return _encode(filled)


def error_body(code: str, message: str, details: list[dict[str, str]] | None = None) -> bytes:
    """The sidecar's one error shape."""
    return _encode({"error": {"code": code, "message": message, "details": details or []}})


# -- the writer thread ---------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    """A checked event; ``seq`` is its row, given by the writer before the insert."""

    kind: Kind
    idem_key: str
    body: bytes
    seq: int = 0


Committed = Callable[[list[tuple[Event, asyncio.Future[None]]], BaseException | None], None]


class Writer:
    """The one thread that owns the database. Every event waiting and every delivery
    recorded since the last commit go in one transaction; the loop hears of the commit
    once per group (one ``call_soon_threadsafe``)."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop, committed: Committed) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
            "idem_key TEXT NOT NULL, body BLOB NOT NULL)"
        )
        self._loop = loop
        self._committed = committed
        self._ready = threading.Condition()
        self._inserts: list[tuple[Event, asyncio.Future[None]]] = []
        self._deletes: list[int] = []
        self._first_delete_at = 0.0
        self._stopping = False
        row = self._db.execute("SELECT max(seq) FROM events").fetchone()
        self._next_seq = (row[0] or 0) + 1

    def left_over(self) -> list[Event]:
        """The rows a previous run left (call before ``run`` starts)."""
        rows = self._db.execute("SELECT seq, kind, idem_key, body FROM events ORDER BY seq")
        return [Event(kind, key, body, seq) for seq, kind, key, body in rows]

    def submit(self, event: Event, future: asyncio.Future[None]) -> None:
        with self._ready:
            self._inserts.append((event, future))
            self._ready.notify()

    def delivered(self, seq: int) -> None:
        with self._ready:
            self._deletes.append(seq)
            if len(self._deletes) == 1:
                # Wake the writer to start the ride window; later ones wait with it.
                self._first_delete_at = time.monotonic()
                self._ready.notify()

    def stop(self) -> None:
        """Commit what is waiting, then end ``run``."""
        with self._ready:
            self._stopping = True
            self._ready.notify()

    def run(self) -> None:
        try:
            while self._commit_next():
                pass
        finally:
            self._db.close()

    def close(self) -> None:
        """Close the database when ``run`` never started."""
        self._db.close()

    def _commit_next(self) -> bool:
        with self._ready:
            while not self._inserts:
                if self._deletes:
                    left = self._first_delete_at + RIDE_S - time.monotonic()
                    if left <= 0 or self._stopping:
                        break
                    self._ready.wait(left)
                elif self._stopping:
                    return False
                else:
                    self._ready.wait()
            group, self._inserts = self._inserts, []
            done, self._deletes = self._deletes, []
        for event, _ in group:
            event.seq = self._next_seq
            self._next_seq += 1
        error: BaseException | None = None
        try:
            self._db.execute("BEGIN")
            if group:
                self._db.executemany(
                    "INSERT INTO events (seq, kind, idem_key, body) VALUES (?, ?, ?, ?)",
                    [(e.seq, e.kind, e.idem_key, e.body) for e, _ in group],
                )
            if done:
                self._db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in done])
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            error = exc
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if done:
                with self._ready:
                    # Their rows stay; the deletes are tried again a ride window later (or
                    # the rows are sent again after a restart, with their keys).
                    self._deletes[:0] = done
                    self._first_delete_at = time.monotonic()
        if group:
            self._loop.call_soon_threadsafe(self._committed, group, error)
        return True


# -- forwarding ----------------------------------------------------------------------------


class Senders:
    """A fixed pool of sender tasks fed from one in-memory queue."""

    def __init__(
        self, session: aiohttp.ClientSession, api_url: str, api_key: str, writer: Writer
    ) -> None:
        self._session = session
        self._urls: Mapping[str, URL] = {k: URL(api_url.rstrip("/") + p) for k, p in PATHS.items()}
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": _JSON}
        self._writer = writer
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    async def run(self) -> None:
        while True:
            event = await self.queue.get()
            await self._send(event)

    async def _send(self, event: Event) -> None:
        headers = {**self._headers, "Idempotency-Key": event.idem_key}
        status: int | None
        try:
            async with self._session.post(
                self._urls[event.kind], data=event.body, headers=headers
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("floor_send_failed", seq=event.seq, error=type(exc).__name__)
            status = None
        if status is not None and (200 <= status < 300 or status == 409):
            self._writer.delivered(event.seq)
        elif status is None or status in (408, 429) or status >= 500:
            asyncio.get_running_loop().call_later(RETRY_S, self.queue.put_nowait, event)
        else:
            log.error("floor_refused_upstream", seq=event.seq, status=status)


# -- the HTTP side -------------------------------------------------------------------------


class Receiver:
    def __init__(self, writer: Writer, senders: Senders | None) -> None:
        self._writer = writer
        self._senders = senders
        # Held, as the sidecar's store holds it: asking for it makes a system call.
        self._loop = asyncio.get_running_loop()

    def committed(
        self, group: list[tuple[Event, asyncio.Future[None]]], error: BaseException | None
    ) -> None:
        """On the loop, once per commit: answer the group and hand its events to the
        senders (a client that left still had its event committed, so it is sent)."""
        for event, future in group:
            if error is None and self._senders is not None:
                self._senders.queue.put_nowait(event)
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    async def post(self, request: web.Request, kind: Kind) -> web.Response:
        if request.content_type != _JSON:
            return _refusal(
                415, "unsupported_media_type", "send the body with Content-Type: application/json"
            )
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            problem = check_idempotency_key(key)
            if problem is not None:
                details = [{"field": "Idempotency-Key", "message": problem}]
                return _refusal(
                    400, "invalid_idempotency_key", f"Idempotency-Key {problem}", details
                )
        raw = await request.read()
        now = time.time()
        created_at = rfc3339(now)
        try:
            body = upstream_body(kind, raw, created_at)
        except ValidationError as exc:
            details = [p.as_dict() for p in exc.problems]
            return _refusal(400, "invalid_request", str(exc), details)
        event_id = new_event_id(now)
        future: asyncio.Future[None] = self._loop.create_future()
        self._writer.submit(Event(kind, key if key is not None else event_id, body), future)
        try:
            await future
        except sqlite3.Error as exc:
            log.error("floor_commit_failed", error=str(exc))
            return _refusal(
                503, "store_unavailable", "could not write the event; retry, nothing was stored"
            )
        answer = {"id": event_id, "status": "queued", "created_at": created_at}
        return web.Response(status=202, body=_encode(answer), content_type=_JSON)

    async def actions(self, request: web.Request) -> web.Response:
        return await self.post(request, "action")

    async def outcomes(self, request: web.Request) -> web.Response:
        return await self.post(request, "outcome")


def _refusal(
    status: int, code: str, message: str, details: list[dict[str, str]] | None = None
) -> web.Response:
    return web.Response(status=status, body=error_body(code, message, details), content_type=_JSON)


# -- lifecycle -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    listen: str
    data_dir: Path
    api_url: str
    upstream_concurrency: int
    api_key: str | None


def options(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> Options:
    """Flags, else the sidecar's environment variables, else the sidecar's defaults."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", default=env.get("VALMI_SIDECAR_LISTEN", "127.0.0.1:8787"))
    parser.add_argument("--data-dir", type=Path, default=env.get("VALMI_SIDECAR_DATA_DIR"))
    parser.add_argument(
        "--api-url",
        default=env.get("VALMI_SIDECAR_API_URL", env.get("VALMI_API_URL", "https://api.valmi.io")),
    )
    parser.add_argument(
        "--upstream-concurrency",
        type=int,
        default=int(env.get("VALMI_SIDECAR_UPSTREAM_CONCURRENCY", "16")),
    )
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("give --data-dir DIR (or VALMI_SIDECAR_DATA_DIR): where the queue is kept")
    if args.upstream_concurrency < 1:
        parser.error("--upstream-concurrency must be at least 1")
    host, sep, port = str(args.listen).rpartition(":")
    if not host:
        parser.error(f"--listen {args.listen!r}: give HOST:PORT, such as 127.0.0.1:8787")
    if not sep or not port.isdigit():
        parser.error(f"--listen {args.listen!r}: give HOST:PORT, such as 127.0.0.1:8787")
    return Options(
        listen=args.listen,
        data_dir=Path(args.data_dir),
        api_url=args.api_url,
        upstream_concurrency=args.upstream_concurrency,
        api_key=env.get("VALMI_API_KEY") or None,
    )


async def serve(opts: Options) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.to_thread(opts.data_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
    receiver: Receiver | None = None

    def committed(
        group: list[tuple[Event, asyncio.Future[None]]], error: BaseException | None
    ) -> None:
        assert receiver is not None  # set before the writer thread starts
        receiver.committed(group, error)

    writer = await asyncio.to_thread(Writer, opts.data_dir / "floor.db", loop, committed)
    left_over = await asyncio.to_thread(writer.left_over)
    thread = threading.Thread(target=writer.run, name="floor-writer")
    session: aiohttp.ClientSession | None = None
    senders: Senders | None = None
    tasks: list[asyncio.Task[None]] = []
    runner: web.AppRunner | None = None
    try:
        if opts.api_key is not None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=opts.upstream_concurrency),
                timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT_S),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            senders = Senders(session, opts.api_url, opts.api_key, writer)
            for event in left_over:
                senders.queue.put_nowait(event)
        receiver = Receiver(writer, senders)
        thread.start()
        if senders is not None:

            def sender_done(task: asyncio.Task[None]) -> None:
                if not task.cancelled() and task.exception() is not None:
                    log.error("floor_sender_died", error=repr(task.exception()))
                    stop.set()

            for i in range(opts.upstream_concurrency):
                task = asyncio.create_task(senders.run(), name=f"floor-sender-{i}")
                task.add_done_callback(sender_done)
                tasks.append(task)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(PATHS["action"], receiver.actions)
        app.router.add_post(PATHS["outcome"], receiver.outcomes)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, _, port = opts.listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port), backlog=1024)
        await site.start()
        bound = runner.addresses[0]
        log.info(
            "floor_ready",
            listen=f"{bound[0]}:{bound[1]}",
            forwarding=senders is not None,
            left_over=len(left_over),
        )
        await stop.wait()
    finally:
        if runner is not None:
            await runner.cleanup()  # stop intake; requests in flight are answered
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # this coroutine itself was cancelled
            except Exception as exc:
                log.error("floor_sender_failed", error=repr(exc))
        if session is not None:
            await session.close()
        writer.stop()
        if thread.ident is None:
            writer.close()
        else:
            await asyncio.to_thread(thread.join)
        log.info("floor_stopped")


def main(argv: list[str] | None = None) -> None:
    opts = options(argv)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(),
    )
    runner: Any
    try:
        import uvloop  # noqa: PLC0415 - optional: plain asyncio without it

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(serve(opts))


if __name__ == "__main__":
    main()
