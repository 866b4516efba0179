"""Ingest over several processes (``ingest_processes`` > 1): one sidecar, N+1 processes.

One Python process serves HTTP on one core. With ``ingest_processes = N`` the main
process starts N **ingest workers**. They share its listening socket (the kernel hands
each new connection to one of them) and do what costs CPU per request: HTTP, the token
check, reading and validating the body. Each validated event goes to the main process
over the worker's own Unix socket pair; the main process alone owns the store, commits it
(the same group commit, the same all-or-nothing submit, the same idempotency checks), and
answers. The worker answers the client ``202`` only then: nothing is acknowledged before
it is durable, as with one process.

Every other request (status, metrics, readiness, the operator routes) is passed by the
worker to the main process over HTTP on a loopback port of its own (port 0, chosen at
start), unchanged, so that each route has one implementation.

The channel carries length-prefixed msgpack frames, all the submissions (or answers) of
one event-loop pass in one frame; ``channel.py`` defines them.

Lifecycle: a worker that exits while the sidecar runs is started again (backoff 1 s,
doubling to 30 s). At shutdown the main process tells every worker to drain (stop
accepting, finish its requests within ``shutdown_grace_s``, exit), waits for them, and only
then closes the store. A worker whose main process is gone (its channel ends) stops at
once: nothing more could be stored, and a submission the main process received but did
not answer is answered ``503 outcome_unknown`` (it may have been committed). SIGTERM to a
worker (systemd sends it to every process of the unit) is a drain of that worker; a worker ignores SIGHUP (its main process reloads
and passes the new settings on).

This module is the main process's side (``IngestWorkers``) and the worker's entry point
(``python -m valmi_sidecar.workers``); the worker process's side (``MainLink``,
``worker_app``, ``run_worker``) is in ``ingest_worker.py`` and importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

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
    Stored,
    Submission,
    Submit,
    WorkerSettings,
    read_frame,
    write_frame,
)
from .config import ENV_API_KEY, ENV_INGEST_TOKEN, Settings
from .ingest_worker import KILL_AFTER_S, MainLink, main, run_worker, worker_app
from .store import (
    Accepted,
    IdempotencyConflictError,
    OutcomeUnknownError,
    QueueFullError,
    Store,
    StoreError,
)

__all__ = [
    "KILL_AFTER_S",
    "IngestWorkers",
    "MainLink",
    "listen_sockets",
    "main",
    "run_worker",
    "worker_app",
]

log = structlog.get_logger("valmi_sidecar.workers")

#: Seconds a worker has to start and listen.
START_TIMEOUT_S: Final = 30.0
#: Restart backoff of a worker that exited: from 1 s, doubling, at most 30 s; a worker
#: that ran this long starts again from 1 s.
RESTART_BASE_S: Final = 1.0
RESTART_CAP_S: Final = 30.0
RESTART_RESET_AFTER_S: Final = 60.0


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """The listening sockets the workers share: one per address ``host`` resolves to
    (``localhost``: 127.0.0.1 and ::1; empty: every interface), as the one-process site
    binds, with its backlog. With port 0, every address gets the port the first got."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, _, _, _, resolved in infos:
            key = (int(family), str(resolved[0]))
            if key in seen:
                continue
            seen.add(key)
            address = resolved
            if socks and port == 0:
                address = (resolved[0], socks[0].getsockname()[1], *resolved[2:])
            sock = socket.create_server(address, family=family, backlog=1024)  # v6: V6ONLY
            sock.setblocking(False)
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _worker_env() -> dict[str, str]:
    """The environment of a worker: the main process's, without the secrets (a worker gets
    the ingest token over its channel and never needs the API key)."""
    secret = {ENV_API_KEY, ENV_INGEST_TOKEN}
    return {k: v for k, v in os.environ.items() if k not in secret}


def _error_answer(rid: int, exc: BaseException) -> Failed:
    if isinstance(exc, QueueFullError):
        return Failed(rid, "queue_full", str(exc), exc.retry_after_s)
    if isinstance(exc, IdempotencyConflictError):
        return Failed(rid, "conflict", exc.key)
    if isinstance(exc, OutcomeUnknownError):
        return Failed(rid, "unknown", str(exc))
    if isinstance(exc, StoreError):
        return Failed(rid, "store", str(exc))
    return Failed(rid, "internal", f"{type(exc).__name__}")


# --- the main process's side ------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    started: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    out: list[Ok | Failed] = field(default_factory=list)

    def answer(self, item: Ok | Failed) -> None:
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(item)

    def _flush(self) -> None:
        write_frame(self.writer, Answers(self.out))
        self.out = []


class IngestWorkers:
    """The main process's side: start the workers, serve their channels, restart them,
    drain them. Every task it starts is its own and ends in ``stop``."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        refused: dict[str, int],
        socks: Sequence[socket.socket],
        *,
        ops_port: int,
        on_alive: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._refused = refused
        self._socks = list(socks)
        self._ops_port = ops_port
        self._on_alive = on_alive
        self._count = settings.ingest_processes
        self._workers: dict[int, _Worker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._restarting: set[asyncio.Task[None]] = set()
        self._draining = False
        self._fails: dict[int, int] = {}
        self.restarts = 0

    @property
    def configured(self) -> int:
        return self._count

    @property
    def alive(self) -> int:
        return sum(1 for w in self._workers.values() if w.ready.is_set())

    async def start(self) -> None:
        """Start every worker and wait until each listens; raises ``OSError`` if one
        cannot (after stopping those that did)."""
        try:
            for index in range(1, self._count + 1):
                await self._start_one(index)
        except BaseException:
            await self.stop(0.0)
            raise
        log.info("ingest_workers_started", n=self._count, pids=self.pids())

    def reload(self, settings: Settings) -> None:
        """Pass a new ingest token and log level to every worker (and to those started
        later)."""
        self._settings = settings
        for worker in self._workers.values():
            write_frame(worker.writer, self._reloadable())

    def _reloadable(self) -> Reload:
        hello = WorkerSettings.of(self._settings)
        return Reload(hello.ingest_token, hello.log_level)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers.values()]

    def _hello(self, index: int) -> Hello:
        return Hello(WorkerSettings.of(self._settings), index, self._ops_port)

    async def _start_one(self, index: int) -> None:
        assert self._socks
        listen_fds = [sock.fileno() for sock in self._socks]
        mine, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "valmi_sidecar.workers",
                ",".join(map(str, listen_fds)),
                str(theirs.fileno()),
                pass_fds=(*listen_fds, theirs.fileno()),
                stdin=subprocess.DEVNULL,
                env=_worker_env(),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=mine, limit=2**20)
        except BaseException:
            mine.close()
            process.kill()
            await process.wait()
            raise
        worker = _Worker(index, process, writer, reader, time.monotonic())
        self._workers[index] = worker
        write_frame(writer, self._hello(index))
        serve = self._spawn(self._serve(worker), f"ingest_worker_{index}")
        ready = asyncio.ensure_future(worker.ready.wait())
        try:
            await asyncio.wait(
                {ready, serve}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        if not worker.ready.is_set():
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            if process.returncode is not None:
                raise OSError(
                    f"ingest worker {index} exited before it listened "
                    f"(exit code {process.returncode}; its error is in the log above)"
                )
            raise OSError(
                f"ingest worker {index} did not start listening within {START_TIMEOUT_S:g} s"
            )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve(self, worker: _Worker) -> None:
        """Serve one worker's channel until it ends, then wait for the process and start
        it again (unless draining)."""
        try:
            while True:
                match await read_frame(worker.reader):
                    case Submit(items):
                        self._submit(worker, items)
                    case Refused(counts):
                        for reason, n in counts.items():
                            self._refused[reason] = self._refused.get(reason, 0) + n
                    case Ready():
                        worker.ready.set()
                        self._on_alive(self.alive)
                    case _:
                        pass  # a frame for a worker: not sent this way
        except ChannelClosedError:
            pass
        finally:
            worker.writer.close()
        code = await worker.process.wait()
        was_ready = worker.ready.is_set()
        worker.ready.clear()
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        self._on_alive(self.alive)
        if self._draining:
            return
        ran_s = time.monotonic() - worker.started
        log.error(
            "ingest_worker_exited", worker=worker.index, exit_code=code, ran_s=round(ran_s, 1)
        )
        if was_ready:
            restart = self._spawn(
                self._restart(worker.index, ran_s), f"ingest_worker_{worker.index}_restart"
            )
            self._restarting.add(restart)  # stop() cancels these
            restart.add_done_callback(self._restarting.discard)

    async def _restart(self, index: int, ran_s: float) -> None:
        """Start worker ``index`` again after a backoff: 1 s, doubling with each exit in a
        row that came sooner than ``RESTART_RESET_AFTER_S`` after its start, 30 s at most."""
        fails = self._fails.get(index, 0) + 1 if ran_s < RESTART_RESET_AFTER_S else 1
        self._fails[index] = fails
        delay = min(RESTART_CAP_S, RESTART_BASE_S * 2 ** min(fails - 1, 5))
        while True:  # until started, or cancelled by stop()
            await asyncio.sleep(delay)
            self.restarts += 1
            try:
                await self._start_one(index)
            except OSError as exc:
                log.error("ingest_worker_restart_failed", worker=index, error=str(exc))
                delay = min(RESTART_CAP_S, delay * 2)
                continue
            log.info("ingest_worker_restarted", worker=index, pid=self._workers[index].process.pid)
            return

    def _submit(self, worker: _Worker, items: list[Submission]) -> None:
        store = self._store
        for item in items:
            rid = item.rid
            try:
                future = store.submit_soon(item.events)
            except StoreError as exc:
                worker.answer(_error_answer(rid, exc))
                continue
            future.add_done_callback(functools.partial(self._answered, worker, rid))

    @staticmethod
    def _answered(worker: _Worker, rid: int, future: asyncio.Future[list[Accepted]]) -> None:
        if future.cancelled():  # it may have been in a transaction already
            unknown = OutcomeUnknownError("the submission was cancelled")
            worker.answer(_error_answer(rid, unknown))
            return
        exc = future.exception()
        if exc is not None:
            if not isinstance(exc, StoreError | IdempotencyConflictError):
                log.error("ingest_submit_failed", error=repr(exc))
            worker.answer(_error_answer(rid, exc))
            return
        accepted = future.result()
        worker.answer(Ok(rid, [Stored(a.id, a.created_at, a.duplicate) for a in accepted]))

    async def stop(self, grace_s: float) -> None:
        """Drain every worker: stop accepting, finish requests within ``grace_s``, exit.
        Kills a worker still running ``KILL_AFTER_S`` later. The store stays open meanwhile."""
        self._draining = True
        for sock in self._socks:
            sock.close()  # the workers hold their own copies until they exit
        self._socks = []
        for task in self._restarting:
            task.cancel()
        workers = list(self._workers.values())
        for worker in workers:
            write_frame(worker.writer, Drain())
        processes = [w.process for w in workers]
        if processes:
            waits = [asyncio.ensure_future(p.wait()) for p in processes]
            _, pending = await asyncio.wait(waits, timeout=grace_s + KILL_AFTER_S)
            for worker in workers:
                if worker.process.returncode is None:
                    log.error("ingest_worker_killed", worker=worker.index, bound_s=grace_s)
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            if pending:
                await asyncio.wait(pending, timeout=KILL_AFTER_S)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=KILL_AFTER_S)
        for task in list(self._tasks):
            task.cancel()


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) != 2 or not all(a.isdigit() for a in [*args[0].split(","), args[1]]):
        sys.stderr.write("valmi_sidecar.workers is started by `valmi-sidecar run`, not by hand\n")
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1:]))
