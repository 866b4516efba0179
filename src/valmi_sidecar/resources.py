"""The resources of one sidecar, in start-up order: the store, the ops listener, the
upstream client and the flusher's task.

Each is one aiohttp cleanup context (``contexts``), so that they are torn down in reverse
order, each only if its start succeeded: the flusher's final flush runs while the client
and the store are still open, and the ops listener closes after it, so that probes and
scrapes see the whole drain.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

import structlog
from aiohttp import web

from .config import Settings, env_proxy, url_without_credentials
from .flusher import Flusher
from .listening import CLOSE_TIMEOUT_S, ops_listener
from .receiver import INGEST, REFUSED, STORE, Lifecycle, build_ops_app
from .store import Store
from .upstream import Upstream

log = structlog.get_logger("valmi_sidecar.service")

TaskCallback = Callable[[asyncio.Task[None]], None]
CleanupContext = Callable[[web.Application], AsyncIterator[None]]

#: Why nothing is forwarded when no API key is set, and what to do.
NO_KEY: Final = (
    "no API key: set VALMI_API_KEY or VALMI_API_KEY_FILE and restart; "
    "events are accepted and kept until then"
)


class Resources:
    """The store, the ops listener, the upstream client and the flusher of one sidecar,
    each ``None`` until its context started. ``settings`` gives the settings in force
    (a reload replaces them); ``on_task_done`` hears of the store's writer and the flusher
    ending; ``metrics`` renders a scrape for the ops listener."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        lifecycle: Lifecycle,
        *,
        on_task_done: TaskCallback,
        metrics: Callable[[web.Application], bytes],
    ) -> None:
        self._settings = settings
        self._lifecycle = lifecycle
        self._on_task_done = on_task_done
        self._metrics = metrics
        self.store: Store | None = None
        self.upstream: Upstream | None = None
        self.flusher: Flusher | None = None
        self.flusher_task: asyncio.Task[None] | None = None
        #: Where the ops listener listens (``ops_listen``), once it does.
        self.ops_address: tuple[str, int] | None = None
        #: Forwarding stops at once instead of after a final flush (a second signal).
        self.hurried = False
        #: When the final flush ends (``time.monotonic``), once it began.
        self.flush_until: float | None = None
        self._stopper: asyncio.Task[None] | None = None

    def contexts(self) -> list[CleanupContext]:
        """The cleanup contexts, in start-up order."""
        return [self._store_ctx, self._ops_ctx, self._upstream_ctx, self._flusher_ctx]

    async def _store_ctx(self, app: web.Application) -> AsyncIterator[None]:
        s = self._settings()
        self.store = await Store.open(
            s.data_dir,
            durability=s.durability,
            max_queue_bytes=s.max_queue_bytes,
            max_queue_events=s.max_queue_events,
            max_body_bytes=s.max_body_bytes,
            dedup_window_s=s.dedup_window_s,
            recover_corrupt=True,  # a damaged file is moved aside: never a crash loop
        )
        app[STORE] = self.store
        app[INGEST] = self.store
        self.store.writer_task.add_done_callback(self._on_task_done)
        try:
            yield
        finally:
            await asyncio.wait_for(self.store.close(), CLOSE_TIMEOUT_S)

    async def _ops_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """The ops listener, in this process only (ingest workers never serve it)."""
        s = self._settings()
        if not s.ops_listen:
            yield
            return
        assert self.store is not None
        ops = build_ops_app(s, self._lifecycle, lambda: self._metrics(app), app[REFUSED])
        ops[STORE] = self.store
        async with ops_listener(ops, s) as self.ops_address:
            yield

    async def _upstream_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        s = self._settings()
        if s.api_key is None:
            log.warning("forwarding_disabled", reason=NO_KEY)
            yield
            return
        proxy = env_proxy(s.api_url, os.environ) if s.proxy_from_env else None
        if proxy is not None:
            log.info("upstream_proxy", proxy=url_without_credentials(proxy))
        self.upstream = Upstream(
            s.api_url,
            s.api_key,
            timeout_s=s.upstream_timeout_s,
            max_connections=s.upstream_concurrency,
            proxy=proxy,
        )
        try:
            yield
        finally:
            await asyncio.wait_for(self.upstream.aclose(), CLOSE_TIMEOUT_S)

    async def _flusher_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        assert self.store is not None
        self.flusher = Flusher(self.store, self.upstream, self._settings())
        task = asyncio.create_task(self.flusher.run(), name="flusher")
        task.add_done_callback(self._on_task_done)
        self.flusher_task = task
        try:
            yield
        finally:
            await self._final_flush(self.flusher, task)

    async def _final_flush(self, flusher: Flusher, task: asyncio.Task[None]) -> None:
        bound = 0.0 if self.hurried else self._settings().final_flush_s
        self.flush_until = time.monotonic() + bound
        if not task.done():
            try:
                await asyncio.wait_for(flusher.drain(bound), bound + CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.error("final_flush_overran", bound_s=bound)
        if not task.done():
            task.cancel()
        # Wait for the task to end; its own failure was already reported by the callback.
        await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
        if self._stopper is not None:
            await asyncio.wait({self._stopper}, timeout=CLOSE_TIMEOUT_S)

    def stop_forwarding(self, on_done: TaskCallback) -> None:
        """Stop the flusher now (events not yet sent stay queued with their keys); the
        final flush then waits for it. ``on_done`` hears of it ending."""
        flusher, task = self.flusher, self.flusher_task
        if flusher is not None and task is not None and not task.done():
            self._stopper = asyncio.create_task(flusher.drain(0.0), name="flusher-stop")
            self._stopper.add_done_callback(on_done)
