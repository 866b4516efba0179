"""A Valmi API emulator with fault injection, for local development, demos and tests.

``FakeValmi`` is a real aiohttp server that answers ``POST /v1/actions`` and
``POST /v1/outcomes`` the way Valmi documents them (Bearer key, ``{"id", "status":
"processed", "created_at"}``), and adds what Valmi leaves undocumented as options:
de-duplication by an ``Idempotency-Key`` header, ``X-RateLimit-*`` headers with ``429``,
and a ``409`` for a repeated key when asked for. Tests change ``fake.faults`` live to make
it fail: errors, latency, hangs, refused keys, rate limits, and connections dropped after
the event was stored.

Control endpoints (no auth; a development tool meant for loopback):

- ``GET /_fake/received[?kind=action|outcome]``: stored events and counters.
- ``GET /_fake/faults``, ``POST /_fake/faults`` with a JSON object of ``Faults`` fields.
- ``POST /_fake/reset``: forget stored events and counters (faults are kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import socket
import struct
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

import structlog
from aiohttp import web

from valmi_sidecar.events import (
    KINDS,
    PATHS,
    Kind,
    Problem,
    ValidationError,
    check_body,
    check_idempotency_key,
    decode,
    rfc3339,
)
from valmi_sidecar.fake_faults import Faults, FaultsError, RateWindow, check_faults

__all__ = ["DEFAULT_KEY", "FakeValmi", "Faults", "FaultsError", "Received", "serve"]

DEFAULT_KEY: Final = "sk_test_fake"
#: How long ``stop()`` / ``go_down()`` wait for handlers still running (per phase).
SHUTDOWN_TIMEOUT_S: Final = 2.0

log = structlog.get_logger(__name__)


@dataclass
class Received:
    """One event the fake stored (the first attempt with a given idempotency key).

    ``idem_key`` is ``None`` when the client sent no ``Idempotency-Key``; such events are
    stored under a generated key and never de-duplicated.
    """

    idem_key: str | None
    kind: str
    body: dict[str, Any]
    id: str
    attempts: int = 1
    created_at: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "idem_key": self.idem_key,
            "kind": self.kind,
            "body": self.body,
            "id": self.id,
            "attempts": self.attempts,
            "created_at": self.created_at,
        }


def _error(code: str, message: str, details: list[dict[str, str]] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


def _seconds_header(seconds: float) -> str:
    """``1.0`` → ``"1"``, ``0.25`` → ``"0.25"``: whole seconds unless a test asks for less."""
    return f"{seconds:g}"


class FakeValmi:
    """A Valmi API emulator: a real server on ``host:port`` with live fault injection.

    State (stored events, counters, faults) lives on this object and survives
    ``go_down()`` / ``go_up()``; only ``reset()`` clears it.
    """

    def __init__(
        self,
        *,
        api_keys: Collection[str] = (DEFAULT_KEY,),
        rate_limit_per_min: int | None = None,
        conflict_on_duplicate: bool = False,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(api_keys, str):
            raise TypeError("api_keys must be a collection of keys, not one string")
        if not api_keys:
            raise ValueError("api_keys must name at least one key")
        if rate_limit_per_min is not None and rate_limit_per_min < 1:
            raise ValueError(f"rate_limit_per_min must be at least 1, not {rate_limit_per_min}")
        self.api_keys = frozenset(api_keys)
        self.rate_limit_per_min = rate_limit_per_min
        self.conflict_on_duplicate = conflict_on_duplicate
        self._random = random.Random(seed)  # noqa: S311 - fault injection, not security
        self._clock = clock

        self._faults = Faults()
        self.received: dict[str, Received] = {}
        #: Requests to /v1/actions and /v1/outcomes, answered or not.
        self.requests = 0
        #: Repeats of an idempotency key already stored.
        self.duplicates = 0
        #: Requests whose connection was dropped without an answer.
        self.dropped = 0
        #: Answers sent, by HTTP status.
        self.status_counts: dict[int, int] = {}
        #: ``clock()`` (``time.monotonic`` by default) at each request's arrival.
        self.arrival_times: list[float] = []
        self._window = None if rate_limit_per_min is None else RateWindow(rate_limit_per_min)

        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = asyncio.Event()
        self._changed = asyncio.Event()
        self._attach(self._faults)

    # -- state --------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        object.__setattr__(self._faults, "_listener", None)
        self._faults = faults
        self._attach(faults)
        self._notify()

    def _attach(self, faults: Faults) -> None:
        object.__setattr__(faults, "_listener", self._notify)

    def set_faults(self, **changes: Any) -> Faults:
        """Change several faults at once, checked like ``POST /_fake/faults``."""
        problems = check_faults(changes)
        if problems:
            raise FaultsError(problems)
        for name, value in changes.items():
            setattr(self._faults, name, value)
        return self._faults

    def events(self, kind: Kind | None = None) -> list[Received]:
        """Stored events in arrival order, of one kind or all."""
        return [r for r in self.received.values() if kind is None or r.kind == kind]

    def reset(self) -> None:
        """Forget stored events, counters and the rate-limit window; faults are kept."""
        self.received.clear()
        self.requests = 0
        self.duplicates = 0
        self.dropped = 0
        self.status_counts.clear()
        self.arrival_times.clear()
        if self._window is not None:
            self._window = RateWindow(self._window.limit)
        self._notify()

    def snapshot(self, kind: Kind | None = None) -> dict[str, Any]:
        """What ``GET /_fake/received`` answers."""
        return {
            "events": [r.as_dict() for r in self.events(kind)],
            "requests": self.requests,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "status_counts": dict(self.status_counts),
        }

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Return once ``predicate()`` holds; raise ``TimeoutError`` after ``timeout_s``.

        The predicate is checked whenever a request arrives or is answered, an event is
        stored, or a fault changes, so no polling interval is involved.
        """
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        loop = self._loop
        if loop is None:
            self._fire()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._fire()
        else:
            loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; return the base URL (``http://127.0.0.1:PORT``)."""
        if self._runner is not None:
            raise RuntimeError("the fake API is already listening")
        self.host = host
        self.port = port
        await self._listen()
        return self.url

    async def stop(self) -> None:
        """Stop listening and close every connection; requests still held are dropped."""
        await self._close()

    async def go_down(self) -> None:
        """Stop listening (connections refused) but keep state and the port for go_up().

        The port is free meanwhile: a server that binds port 0 then (a sidecar under test)
        may be given it and forward to itself, so start such a server first."""
        await self._close()

    async def go_up(self) -> None:
        """Listen again on the port the fake had before ``go_down()``."""
        if self._runner is not None:
            return
        if self.port == 0:
            raise RuntimeError("go_up() needs a port: call start() first")
        await self._listen()

    async def _listen(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post(PATHS["action"], self._on_action)
        app.router.add_post(PATHS["outcome"], self._on_outcome)
        app.router.add_get("/_fake/received", self._on_received)
        app.router.add_get("/_fake/faults", self._on_get_faults)
        app.router.add_post("/_fake/faults", self._on_set_faults)
        app.router.add_post("/_fake/reset", self._on_reset)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def _close(self) -> None:
        runner = self._runner
        if runner is None:
            return
        self._runner = None
        self._closing.set()
        self._notify()
        await runner.cleanup()

    # -- the Valmi API ------------------------------------------------------------------

    async def _on_action(self, request: web.Request) -> web.StreamResponse:
        return await self._on_event(request, "action")

    async def _on_outcome(self, request: web.Request) -> web.StreamResponse:
        return await self._on_event(request, "outcome")

    async def _on_event(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        self.requests += 1
        self.arrival_times.append(self._clock())
        self._notify()
        raw = await request.read()
        dropped = await self._delay(request)
        if dropped is not None:
            return dropped
        headers: dict[str, str] = {}
        refused = self._refuse(request, headers)
        if refused is not None:
            return refused
        idem_key = request.headers.get("Idempotency-Key")
        try:
            body = self._validate(kind, raw, idem_key)
        except ValidationError as exc:
            details = [p.as_dict() for p in exc.problems]
            return self._answer(400, _error("invalid_request", str(exc), details), headers=headers)
        stored = self.received.get(idem_key) if idem_key is not None else None
        if stored is not None:
            return self._repeat(request, stored, headers)
        return self._store(request, kind, body, idem_key, headers)

    async def _delay(self, request: web.Request) -> web.Response | None:
        """Wait out the injected latency and hang; the dropped answer if the fake closes
        meanwhile (or, for a hang, the client leaves), else ``None``."""
        faults = self._faults
        if faults.latency_s > 0:
            # A slow upstream still processes the request even if the client gave up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), faults.latency_s)
            if self._closing.is_set():
                return self._drop(request)
        if self._faults.hang:
            # A black hole: a request whose client left while held is never processed.
            await self._hold_while_hanging()
            if self._closing.is_set() or _client_gone(request):
                return self._drop(request)
        return None

    def _refuse(self, request: web.Request, headers: dict[str, str]) -> web.Response | None:
        """The answer refusing the request before its body is looked at (a bad key, the
        rate limit, an injected 429 or error), else ``None``; adds the rate headers."""
        faults = self._faults
        if faults.unauthorized or not self._authorized(request):
            self._rate_headers(headers, take=False)
            return self._answer(401, _error("unauthorized", "Invalid API key"), headers=headers)
        if not self._rate_headers(headers, take=True):
            return self._answer(
                429,
                _error("rate_limited", "Rate limit exceeded; retry after the window resets"),
                headers=headers,
            )
        if faults.rate_limited:
            headers["Retry-After"] = _seconds_header(faults.retry_after_s)
            return self._answer(
                429, _error("rate_limited", "Rate limit exceeded (injected)"), headers=headers
            )
        if faults.error_rate > 0 and self._random.random() < faults.error_rate:
            status = faults.error_status
            return self._answer(
                status,
                _error("injected_error", f"Injected fault: HTTP {status}"),
                headers=headers,
            )
        return None

    def _repeat(
        self, request: web.Request, stored: Received, headers: Mapping[str, str]
    ) -> web.Response:
        """Answer a repeat of an idempotency key already stored."""
        stored.attempts += 1
        self.duplicates += 1
        self._notify()
        if self._faults.reset_after_store:
            return self._drop(request)
        if self.conflict_on_duplicate:
            message = f"An event with this Idempotency-Key was already processed as {stored.id}"
            return self._answer(409, _error("conflict", message), headers=headers)
        return self._answer(200, _processed(stored), headers=headers)

    def _store(
        self,
        request: web.Request,
        kind: Kind,
        body: dict[str, Any],
        idem_key: str | None,
        headers: Mapping[str, str],
    ) -> web.Response:
        """Store a new event and answer it as processed."""
        now = time.time()
        event = Received(
            idem_key=idem_key,
            kind=kind,
            body=body,
            id=f"{kind}_{secrets.token_hex(12)}",
            created_at=rfc3339(now),
        )
        self.received[idem_key if idem_key is not None else f"_gen_{secrets.token_hex(12)}"] = event
        self._notify()
        if self._faults.reset_after_store:
            return self._drop(request)
        return self._answer(200, _processed(event), headers=headers)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and key.strip() in self.api_keys

    def _rate_headers(self, headers: dict[str, str], *, take: bool) -> bool:
        """Add the ``X-RateLimit-*`` headers; with ``take``, spend one request of budget.

        Return ``False`` (and add ``Retry-After``) when the budget is spent.
        """
        window = self._window
        if window is None:
            return True
        return window.stamp(headers, self._clock(), time.time, take=take)

    @staticmethod
    def _validate(kind: Kind, raw: bytes, idem_key: str | None) -> dict[str, Any]:
        problems: list[Problem] = []
        if idem_key is not None:
            problem = check_idempotency_key(idem_key)
            if problem is not None:
                problems.append(Problem("Idempotency-Key", problem))
        obj = decode(raw)
        problems.extend(check_body(kind, obj))
        if problems:
            raise ValidationError(problems)
        assert isinstance(obj, dict)  # check_body refuses anything else
        return obj

    async def _hold_while_hanging(self) -> None:
        while self._faults.hang and not self._closing.is_set():
            changed = self._changed
            await changed.wait()

    def _answer(
        self, status: int, body: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        self.status_counts[status] = self.status_counts.get(status, 0) + 1
        self._notify()
        return web.json_response(body, status=status, headers=headers)

    def _drop(self, request: web.Request) -> web.Response:
        """Close the connection with a TCP reset and no answer, like a network failure."""
        transport = request.transport
        if transport is not None and not transport.is_closing():
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    # Linger 0: close() sends RST rather than FIN, as a failed network does.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        self.dropped += 1
        self._notify()
        # aiohttp cannot write this to the aborted transport and closes quietly.
        return web.Response(status=500)

    # -- control endpoints --------------------------------------------------------------

    async def _on_received(self, request: web.Request) -> web.StreamResponse:
        kind = request.query.get("kind")
        if kind is not None and kind not in KINDS:
            problem = Problem("kind", f"must be one of {', '.join(KINDS)}")
            return web.json_response(
                _error("invalid_request", "unknown kind", [problem.as_dict()]), status=400
            )
        return web.json_response(self.snapshot(kind))

    async def _on_get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(asdict(self._faults))

    async def _on_set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            obj = decode(await request.read())
        except ValidationError as exc:
            details = [p.as_dict() for p in exc.problems]
            return web.json_response(_error("invalid_request", str(exc), details), status=400)
        if not isinstance(obj, dict):
            problem = Problem("", "must be a JSON object of Faults fields")
            return web.json_response(
                _error("invalid_request", problem.message, [problem.as_dict()]), status=400
            )
        try:
            self.set_faults(**obj)
        except FaultsError as exc:
            details = [p.as_dict() for p in exc.problems]
            return web.json_response(_error("invalid_request", str(exc), details), status=400)
        return web.json_response(asdict(self._faults))

    async def _on_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response(self.snapshot())


def _processed(event: Received) -> dict[str, str]:
    return {"id": event.id, "status": "processed", "created_at": event.created_at}


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def serve(
    host: str, port: int, *, api_keys: Collection[str], rate_limit_per_min: int | None
) -> None:
    """Run a fake Valmi API on ``host:port`` until cancelled, then stop it cleanly."""
    fake = FakeValmi(api_keys=api_keys, rate_limit_per_min=rate_limit_per_min)
    url = await fake.start(host, port)
    try:
        log.info(
            "fake_api_listening",
            url=url,
            api_keys=len(fake.api_keys),
            rate_limit_per_min=rate_limit_per_min,
        )
        await asyncio.get_running_loop().create_future()  # until cancelled
    finally:
        await fake.stop()
        log.info("fake_api_stopped", url=url)
