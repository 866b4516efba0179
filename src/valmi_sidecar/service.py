"""Wiring and lifecycle: start-up order, signals, the bounded drain, exit codes.

Start-up: settings (given), data-directory lock and database (the store), the upstream
HTTP client, the flusher, then listen; ``/readyz`` turns 200 only after all of them.
SIGHUP reloads: the settings are read again and the API key, the ingest token and the
log level taken from them, without a restart (others are logged as needing one).
Shutdown (SIGTERM/SIGINT): ``/readyz`` and new posts turn 503, the listener closes,
requests in flight finish (``shutdown_grace_s``), the flusher gets a final flush
(``final_flush_s``), then the client and the store close, in reverse order. Each
resource is one aiohttp cleanup context, torn down only if its start succeeded. A second
signal stops forwarding at once: the events not yet sent stay queued, with their keys.
On a terminal, the drain says what it is doing once a second.

What it wires lives in modules of their own: ``resources.py`` (the store, the ops
listener, the upstream client and the flusher, one cleanup context each),
``listening.py`` (binding, what a failed bind means, the address record), ``status.py``
(the status page, the scrape, the lines it prints) and ``reload.py`` (what a SIGHUP
changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TextIO

import structlog
from aiohttp import web
from yarl import URL

from . import __version__, runtime
from .admin import add_admin_routes
from .config import ConfigError, Settings, env_proxy
from .listening import (
    CLOSE_TIMEOUT_S,
    LISTEN_FLAG,
    ListenError,
    address_text,
    listen,
    listen_error,
    record_address,
    url_of,
)
from .logs import configure_logging
from .metrics import render_metrics
from .receiver import REFUSED, TOKEN, Lifecycle, build_app, make_runner
from .reload import RELOADABLE, announce, apply_reload
from .resources import Resources
from .runtime import STOP_SIGNALS, signal_handlers
from .sdnotify import Notifier
from .status import (
    Console,
    Facts,
    drain_line,
    metrics_source,
    status_json,
    status_line,
    upstream_state,
)
from .store import Store, StoreError, moved_aside_files
from .workers import IngestWorkers

__all__ = [
    "CLOSE_TIMEOUT_S",
    "LISTEN_FLAG",
    "RELOADABLE",
    "ListenError",
    "Sidecar",
    "listen_error",
    "run",
]

log = structlog.get_logger("valmi_sidecar.service")

#: How often systemd's STATUS= line is refreshed with the queue depth.
STATUS_INTERVAL_S: Final = 5.0


class Sidecar:
    """One running sidecar: the resources, their order, and the exit code.

    ``reload`` builds the settings again (as at start) for a SIGHUP; ``owns_logging``
    lets a reload change the process's log level; ``console`` is a terminal to tell how
    the shutdown goes.
    """

    def __init__(
        self,
        settings: Settings,
        reload: Callable[[], Settings] | None = None,
        *,
        owns_logging: bool = False,
        console: TextIO | None = None,
    ) -> None:
        """``console``: a terminal to tell how the shutdown goes (a person waits there)."""
        self.settings = settings
        self._console = Console(console)
        self._reload = reload
        self._owns_logging = owns_logging
        self._reload_requested = asyncio.Event()
        self._app: web.Application | None = None
        self.lifecycle = Lifecycle()
        self.exit_code = 0
        self.address: tuple[str, int] | None = None
        self._parts = Resources(
            lambda: self.settings,
            self.lifecycle,
            on_task_done=self._on_background_done,
            metrics=self._metrics,
        )
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self._started_at = time.time()
        self._notifier = Notifier.from_env()
        self._notify_tasks: list[asyncio.Task[None]] = []
        self._address_file: Path | None = None
        self._moved_aside: list[Path] = []
        self._workers: IngestWorkers | None = None
        self._grace_until: float | None = None

    @property
    def store(self) -> Store | None:
        """The store, once started (``None`` before, and if it could not be opened)."""
        return self._parts.store

    @property
    def workers(self) -> IngestWorkers | None:
        """The ingest workers, once their start began (``ingest_processes`` > 1)."""
        return self._workers

    @property
    def ops_address(self) -> tuple[str, int] | None:
        """Where the ops listener listens (``ops_listen``), once it does."""
        return self._parts.ops_address

    def _on_background_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            if not self._stopping:
                log.error("background_task_cancelled", task=task.get_name())
                self.request_stop(exit_code=1)
            return
        exc = task.exception()
        if exc is not None:
            log.error("background_task_crashed", task=task.get_name(), exc_info=exc)
            self.request_stop(exit_code=1)
        elif not self._stopping:
            log.error("background_task_ended", task=task.get_name())
            self.request_stop(exit_code=1)

    # --- status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The JSON for ``/v1/status``: counts that reconcile, queue age, upstream state,
        the drain forecast."""
        store = self._parts.store
        assert store is not None
        now = time.time()
        facts = Facts(
            counts=store.counts(),
            rates=store.rates(),
            flusher=self._parts.flusher,
            forwarding=self._parts.upstream is not None,
            ready=self.lifecycle.ready,
            draining=self.lifecycle.draining,
            uptime_s=now - self._started_at,
            writable=store.writable,
            unwritable=store.unwritable(),
            path=store.path,
            disk=store.disk(),
            moved_aside=self._moved_aside,
            now=now,
        )
        return status_json(self.settings, facts)

    def _status_line(self) -> str:
        """One line for systemd's STATUS=: queue depth and upstream state."""
        counts = self._parts.store.counts() if self._parts.store is not None else None
        return status_line(counts, upstream_state(self._parts.flusher))

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self._notifier.status(self._status_line())

    def _metrics(self, app: web.Application) -> bytes:
        store, upstream = self._parts.store, self._parts.upstream
        assert store is not None
        refused: dict[str, int] = app[REFUSED]
        source = metrics_source(
            self.settings,
            store,
            self._parts.flusher,
            upstream=upstream.stats if upstream is not None else None,
            refused=refused,
            ready=self.lifecycle.ready and not self.lifecycle.draining,
            workers=self._workers,
            now=time.time(),
        )
        return render_metrics(source)

    # --- lifecycle ----------------------------------------------------------------

    def request_stop(self, exit_code: int = 0) -> None:
        """Ask for a graceful shutdown (what SIGTERM does). The first non-zero code wins."""
        if exit_code and not self.exit_code:
            self.exit_code = exit_code
        self._stop_requested.set()

    def _on_signal(self) -> None:
        """SIGTERM/SIGINT: the first drains; the second stops forwarding at once."""
        if not self._stop_requested.is_set():
            self.request_stop()
        elif not self._parts.hurried:
            self.hurry()
        else:
            self._console.say("still closing the store cleanly; every queued event stays queued")

    def hurry(self) -> None:
        """Stop forwarding now instead of at the end of the final flush. Events not yet
        forwarded stay queued with their keys; requests in flight upstream are cancelled
        and sent again, with the same key, after the next start."""
        self._parts.hurried = True
        queued = self._parts.store.counts().queued if self._parts.store is not None else 0
        log.warning("shutdown_hurried", queued=queued)
        self._console.say(
            f"stopping now: forwarding stops; {queued} queued events stay queued and are "
            "forwarded after the next start"
        )
        self._parts.stop_forwarding(self._on_stopper_done)

    def _on_stopper_done(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("background_task_crashed", task=task.get_name(), exc_info=exc)
            self.exit_code = self.exit_code or 1

    def _drain_line(self) -> str:
        return drain_line(
            queued=self._parts.store.counts().queued if self._parts.store is not None else 0,
            hurried=self._parts.hurried,
            grace_until=self._grace_until,
            flush_until=self._parts.flush_until,
            final_flush_s=self.settings.final_flush_s,
            now=time.monotonic(),
        )

    async def start(self) -> None:
        """Open every resource in order, then listen. Raises if any step fails (after
        tearing down what had started)."""
        s = self.settings
        app = build_app(s, self.lifecycle, self.status, lambda: self._metrics(app))
        self._app = app
        add_admin_routes(app)
        app.cleanup_ctx.extend(self._parts.contexts())
        runner = make_runner(app, s)
        self._runner = runner
        try:
            await runner.setup()
            host, port = await listen(runner, s, functools.partial(self._make_workers, app))
        except BaseException:
            self._stopping = True
            await runner.cleanup()
            raise
        self.address = (host, port)
        self._address_file = await asyncio.to_thread(record_address, s.data_dir, url_of(host, port))
        self._moved_aside = await asyncio.to_thread(moved_aside_files, s.data_dir)
        self.lifecycle.ready = True
        if self._notifier.enabled:
            self._notifier.ready(self._status_line())
            for coro, name in (
                (self._notifier.watchdog_loop(), "sd_watchdog"),
                (self._status_loop(), "sd_status"),
            ):
                task = asyncio.create_task(coro, name=name)
                task.add_done_callback(self._on_background_done)
                self._notify_tasks.append(task)
        log.info(
            "sidecar_ready",
            listen=address_text(host, port),
            ops_listen=None if self.ops_address is None else address_text(*self.ops_address),
            data_dir=str(s.data_dir),
            durability=s.durability,
            forwarding=self._parts.upstream is not None,
            rate_limit_per_min=s.rate_limit_per_min_effective,
            rate_limit_source=s.rate_limit_source,
            queued=self._parts.store.counts().queued if self._parts.store else 0,
            version=__version__,
        )

    def _make_workers(
        self, app: web.Application, socks: list[socket.socket], ops_port: int
    ) -> IngestWorkers:
        assert self._parts.store is not None

        def on_alive(n: int) -> None:
            self.lifecycle.no_ingest_worker = n == 0

        self._workers = IngestWorkers(
            self.settings,
            self._parts.store,
            app[REFUSED],
            socks,
            ops_port=ops_port,
            on_alive=on_alive,
        )
        return self._workers

    async def stop(self) -> None:
        """The bounded drain: stop intake, finish requests, final flush, close in reverse."""
        if self._stopping:
            return
        self._stopping = True
        self.lifecycle.draining = True
        self._notifier.stopping("draining: " + self._status_line())
        log.info("shutdown_started")
        self._grace_until = time.monotonic() + self.settings.shutdown_grace_s
        console = (
            asyncio.create_task(
                self._console.keep_telling(self._drain_line), name="shutdown-console"
            )
            if self._console.attached
            else None
        )
        try:
            await self._drain()
        finally:
            if console is not None:
                console.cancel()
                await asyncio.wait({console}, timeout=1.0)
        counts = self._parts.store.counts() if self._parts.store is not None else None
        if counts is not None:
            self._console.say(
                f"stopped: {counts.queued} events stay queued"
                if counts.queued
                else "stopped: the queue is empty"
            )

    async def _drain(self) -> None:
        if self._workers is not None:
            # First, while the store and the main API are open: the workers finish their
            # requests (which need both) and exit.
            await self._workers.stop(self.settings.shutdown_grace_s)
        runner = self._runner
        if runner is not None:
            bound = (
                self.settings.shutdown_grace_s + self.settings.final_flush_s + 3 * CLOSE_TIMEOUT_S
            )
            try:
                await asyncio.wait_for(runner.cleanup(), bound)
            except TimeoutError:
                log.error("shutdown_overran", bound_s=bound)
                self.exit_code = self.exit_code or 1
        # The watchdog keeps pinging through the drain; it stops only now.
        for task in self._notify_tasks:
            task.cancel()
        if self._notify_tasks:
            await asyncio.wait(self._notify_tasks, timeout=1.0)
        counts = self._parts.store.counts() if self._parts.store is not None else None
        if self._address_file is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._address_file.unlink)
        # The last STATUS= stays on `systemctl status` after the exit: say it stopped,
        # with the counts at the end, not the drain's first line.
        self._notifier.status("stopped: " + self._status_line())
        log.info(
            "shutdown_complete",
            queued=counts.queued if counts else None,
            delivered=counts.delivered if counts else None,
            exit_code=self.exit_code,
        )

    # --- reload (SIGHUP) --------------------------------------------------------------

    async def reload(self) -> None:
        """Read the settings again and apply the API key, the ingest token and the log
        level; log what changed (never a secret) and what needs a restart. Never raises:
        a bad setting is logged and the settings in force stay."""
        if self._reload is None:
            log.warning("reload_unsupported", reason="this sidecar was not started by `run`")
            return
        try:
            # Reading the config and secret files blocks: off the event loop.
            new = await asyncio.to_thread(self._reload)
        except ConfigError as exc:
            log.error(
                "reload_failed",
                error=str(exc),
                action="fix it and send SIGHUP again; the settings in force are kept",
            )
            return
        old = self.settings
        done = apply_reload(
            old,
            new,
            upstream=self._parts.upstream,
            token=self._app[TOKEN] if self._app is not None else None,
            on_new_key=self._probe_now,
        )
        self.settings = done.settings
        if self._workers is not None and done.for_workers:
            self._workers.reload(self.settings)
        announce(done, old.log_level, owns_logging=self._owns_logging)

    def _probe_now(self) -> None:
        if self._parts.flusher is not None:
            self._parts.flusher.probe_now()

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            self._notifier.send(
                "RELOADING=1",
                f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
            )
            await self.reload()
            self._notifier.ready(self._status_line())

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT or a background failure, reloading on SIGHUP; return
        the exit code."""
        # SIGHUP too: without a handler it ends the process at once, without a drain, and
        # with a status that systemd's Restart=on-failure takes for a clean exit.
        handlers = {
            **dict.fromkeys(STOP_SIGNALS, self._on_signal),
            signal.SIGHUP: self._reload_requested.set,
        }
        with signal_handlers(handlers):
            reloads = asyncio.create_task(self._reload_loop(), name="reload")
            reloads.add_done_callback(self._on_background_done)
            try:
                return await self._serve()
            finally:
                self._stopping = True
                reloads.cancel()
                await asyncio.wait({reloads}, timeout=CLOSE_TIMEOUT_S)

    async def _serve(self) -> int:
        try:
            await self.start()
        except ListenError as exc:
            log.error("startup_failed", error=str(exc), action=exc.action)
            return 1
        except (StoreError, OSError) as exc:
            log.error("startup_failed", error=str(exc))
            return 1
        except ConfigError as exc:
            log.error("startup_failed", error=str(exc))
            return 2
        await self._stop_requested.wait()
        await self.stop()
        return self.exit_code


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """Run the sidecar in the foreground; the exit code for the process. ``reload`` builds
    the settings again for a SIGHUP. ``ConfigError`` for an unusable proxy variable (only
    ``run`` reads them: the operator commands never go upstream)."""
    proxy = env_proxy(settings.api_url, os.environ) if settings.proxy_from_env else None
    proxy_secrets = _proxy_secrets(proxy)
    configure_logging(
        settings.log_level,
        settings.log_format,
        [*settings.secrets(), *proxy_secrets],
        access_log=settings.access_log,
    )

    console = sys.stderr if sys.stderr.isatty() else None

    async def serve() -> int:
        return await Sidecar(settings, reload, owns_logging=True, console=console).serve()

    return runtime.run(serve())


def _proxy_secrets(proxy: str | None) -> list[str]:
    """The proxy's password as written and decoded, for the log redactor."""
    if proxy is None:
        return []
    url = URL(proxy)
    return [p for p in (url.raw_password, url.password) if p]
