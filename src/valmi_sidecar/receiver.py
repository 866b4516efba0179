"""The local HTTP API (aiohttp): routes, limits, and one error shape for every refusal.

An event is answered ``202`` only after the store committed it. Every refusal has the
shape ``{"error": {"code": ..., "message": ..., "details": [...]}}`` and stores nothing,
except ``outcome_unknown``: a commit that was interrupted may have completed.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec
import structlog
from aiohttp import ClientPayloadError, web

from . import events, openapi
from .api_errors import (
    RETRY_AFTER_DRAINING_S,
    ApiError,
    store_api_error,
    too_large,
)
from .config import Secret, Settings
from .events import Kind, NewEvent, ValidationError
from .guard import Policy
from .store import (
    IdempotencyConflictError,
    Store,
    StoreError,
)

log = structlog.get_logger("valmi_sidecar.receiver")

_encode: Final = msgspec.json.Encoder().encode
_JSON: Final = "application/json"
#: The longest request line or header field, and the most header fields, a client may send.
MAX_HEADER_LINE_BYTES: Final = 8190
MAX_HEADERS: Final = 128
#: Seconds aiohttp reads and discards the rest of a body it refused, before closing.
LINGERING_S: Final = 2.0


@dataclass
class Lifecycle:
    """What the receiver must know of the service's state: ready to accept, or draining;
    with ingest workers, whether none of them is running (all restarting)."""

    ready: bool = False
    draining: bool = False
    no_ingest_worker: bool = False


@dataclass
class IngestToken:
    """The ingest token clients must send, or ``None``; its value may be replaced while
    running (a reload), never added or removed (that changes the Host policy)."""

    secret: Secret | None


StatusFn = Callable[[], dict[str, Any]]
MetricsFn = Callable[[], bytes]


class Submitter(Protocol):
    """Where the ingest routes put events: the ``Store`` itself, or in an ingest worker
    process the channel to the main process that owns it (the same answers and errors).
    ``submit_soon``'s future resolves after the commit; it raises at once when nothing
    can be taken (closing)."""

    def submit_soon(self, events: Sequence[NewEvent]) -> asyncio.Future[list[Any]]: ...


SETTINGS: Final = web.AppKey("settings", Settings)
STORE: Final = web.AppKey("store", Store)
INGEST: Final = web.AppKey[Submitter]("ingest")
LIFECYCLE: Final = web.AppKey("lifecycle", Lifecycle)
STATUS: Final = web.AppKey[StatusFn]("status")
METRICS: Final = web.AppKey[MetricsFn]("metrics")
POLICY: Final = web.AppKey("policy", Policy)
TOKEN: Final = web.AppKey("ingest_token", IngestToken)
#: Requests refused, by error code (``valmi_sidecar_refused_requests_total``): every
#: refusal of an ingest route, and on every route those of the local-only guard.
REFUSED: Final = web.AppKey[dict[str, int]]("refused")
#: The handlers behind the guard (``guarded``): every route's must be one.
GUARDED: Final = web.AppKey[set[Any]]("guarded")
_INGEST_PATHS: Final = frozenset({"/v1/actions", "/v1/outcomes", "/v1/batch"})
_GUARD_CODES: Final = frozenset(
    {"host_not_allowed", "origin_not_allowed", "unsupported_media_type"}
)
#: What a browser page on an allowed origin may send (CORS preflight answer).
_CORS_HEADERS: Final = "Authorization, Content-Type, Idempotency-Key"
_CORS_MAX_AGE_S: Final = 600


_HTTP_CODES: Final = {
    404: ("not_found", "no such endpoint; see the README for the local API"),
    405: ("method_not_allowed", "this endpoint does not take that method"),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(app: web.Application, handler: Handler, *, token: bool, routed: bool = True) -> Handler:
    """``handler`` behind the local-only guard and the one error shape; with ``token``,
    behind the ingest token too when one is set. Every route is added through it
    (``add_get``, ``add_post``; checked when the application starts).

    In order: refuse what a web page can send (see ``guard.py``) before the handler sees
    it; then the ingest token; then the handler. Every refusal, aiohttp's own included,
    is rendered in the one error shape, and an origin listed in ``allowed_origins`` gets
    the CORS answers a browser needs on every answer, refusals of the handler and of the
    token included. ``routed`` is false for the handler that answers 404 and 405
    (``_no_route``): then the body's declared type is not checked, the status says more.

    A wrapper around each route, not an aiohttp middleware: aiohttp runs an application's
    middlewares through two more coroutines and a chain of calls on every request, and
    every event pays them (docs/PERFORMANCE.md, "The guard around each route"). The
    application's policy and ingest token are read once, here: both are set before any
    route is added, and nothing replaces them (a reload changes the token's value, in
    place, not the policy)."""
    policy = app[POLICY]
    holder = app[TOKEN] if token else None

    async def guard(request: web.Request) -> web.StreamResponse:
        headers = request.headers
        method = request.method
        refusal = policy.refusal(method, headers, routed=routed)
        if refusal is not None:
            _count_refusal(request, refusal.code)
            return ApiError(refusal.status, refusal.code, refusal.message).response()
        origin = headers.get("Origin")
        cors = origin is not None and policy.origin_allowed(origin)
        response: web.StreamResponse
        if cors and method == "OPTIONS" and "Access-Control-Request-Method" in headers:
            response = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = _CORS_HEADERS
            response.headers["Access-Control-Max-Age"] = str(_CORS_MAX_AGE_S)
        else:
            try:
                secret = holder.secret if holder is not None else None
                if secret is not None:
                    check_token(secret, request)
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - every failure is rendered, see _error_response
                response = _error_response(request, exc)
        if cors:
            assert origin is not None
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    return guard


def add_get(app: web.Application, path: str, handler: Handler) -> None:
    """Add ``GET`` (and ``HEAD``) ``path`` behind the guard (``guarded``): under ``/v1/``
    with the ingest token, when the application takes one."""
    app.router.add_get(path, _guard_route(app, path, handler))


def add_post(app: web.Application, path: str, handler: Handler) -> None:
    """Add ``POST path`` behind the guard, as ``add_get``."""
    app.router.add_post(path, _guard_route(app, path, handler))


def _guard_route(app: web.Application, path: str, handler: Handler) -> Handler:
    # Every route under /v1/ (ingest, status, the operator's) takes the token: a route
    # added there is guarded without asking.
    route = guarded(app, handler, token=TOKEN in app and path.startswith("/v1/"))
    app[GUARDED].add(route)
    return route


async def _no_route(request: web.Request) -> web.StreamResponse:
    """The catch-all resource's handler, for what no route takes: 405 with ``Allow`` when
    a resource has the path with other methods, else 404 (what aiohttp's router answers
    when nothing matches); a CORS preflight is answered by its guard before."""
    this = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not this:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound


def _add_fallback(app: web.Application, handler: Handler, *, routed: bool) -> None:
    """Send what no route takes to ``handler``, behind the guard (without the token: a
    404 or a proxied request, whose own server checks it); and check, when the
    application starts, that every route is behind the guard."""
    route = guarded(app, handler, token=False, routed=routed)
    app[GUARDED].add(route)
    # A catch-all resource is tried after every other: aiohttp walks a path's prefixes
    # from the longest, and this one's is "/".
    app.router.add_route("*", "/{tail:.*}", route)
    app.on_startup.append(_check_guarded)


async def _check_guarded(app: web.Application) -> None:
    guarded_handlers = app[GUARDED]
    for route in app.router.routes():
        if route.handler not in guarded_handlers:
            raise RuntimeError(
                f"the route {route.method} {route.resource.canonical if route.resource else ''}"
                " is not behind the local-only guard: add it with receiver.add_get or add_post"
            )


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    """Render a refusal, aiohttp's own included, in the one error shape; an HTTP exception
    that is not an error (a redirect) is raised again, for aiohttp to answer."""
    if isinstance(exc, ApiError):
        _count_refusal(request, exc.code)
        return exc.response()
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        _count_refusal(request, "payload_too_large")
        return too_large(request.app[SETTINGS].max_body_bytes, exc.text).response()
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        _count_refusal(request, code)
        response = ApiError(exc.status, code, message).response()
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    # A bug, not a refusal: say so without detail (the log has it), and store nothing.
    log.exception("request_failed", path=request.path)
    return ApiError(
        500, "internal_error", "the sidecar failed to handle this request; see its log"
    ).response()


def _count_refusal(request: web.Request, code: str) -> None:
    if request.path in _INGEST_PATHS or code in _GUARD_CODES:
        refused = request.app[REFUSED]
        refused[code] = refused.get(code, 0) + 1


def check_token(token: Secret, request: web.Request) -> None:
    """Refuse the request (401) unless it carries ``token``, the ingest token set. (An
    agent's own Authorization header, its Valmi key, is ignored when none is set: the
    guard calls this only when one is.)"""
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    expected = token.reveal().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
        raise ApiError(
            401,
            "unauthorized",
            "this sidecar requires its ingest token: send 'Authorization: Bearer <token>'",
        )


def check_accepting(request: web.Request) -> None:
    if request.app[LIFECYCLE].draining:
        raise _draining()


def _draining() -> ApiError:
    return ApiError(
        503,
        "shutting_down",
        "the sidecar is shutting down; retry shortly (events already accepted are kept)",
        retry_after_s=RETRY_AFTER_DRAINING_S,
    )


def _body_at_hand(request: web.Request, limit: int) -> bytes | None:
    """The body when it came whole with the headers (the usual case), taken as it lies in
    the buffer; else ``None``: ``_read_json_body`` waits for it. The declared type was
    checked by the guard, before the route."""
    declared = request.content_length  # parsed from the header on every read
    if declared is not None and declared > limit:
        raise too_large(limit)
    content = request.content
    if not content.is_eof():
        return None
    try:
        raw = content.read_nowait()
    except (ConnectionError, ClientPayloadError) as exc:
        raise _incomplete() from exc
    # Without a Content-Length (chunked) nothing was checked yet.
    if len(raw) > limit:
        raise too_large(limit)
    return raw


async def _read_json_body(request: web.Request, settings: Settings) -> bytes:
    """The body within ``max_body_bytes``, waited for at most ``client_timeout_s``."""
    raw = _body_at_hand(request, settings.max_body_bytes)
    if raw is not None:
        return raw
    try:
        async with asyncio.timeout(settings.client_timeout_s):
            raw = await request.read()
    except TimeoutError:
        # A client trickling its body holds only its own connection, and not for long.
        raise ApiError(
            408,
            "request_timeout",
            f"the body did not arrive within {settings.client_timeout_s:g} s; send it at once",
        ) from None
    except (ConnectionError, ClientPayloadError) as exc:
        raise _incomplete() from exc
    return raw  # within client_max_size, which aiohttp's read enforces


def _incomplete() -> ApiError:
    # The client closed before the whole body arrived: nothing to store or answer.
    return ApiError(400, "incomplete_body", "the connection ended before the whole body arrived")


def _idempotency_key(key: str) -> str:
    """``key``, the ``Idempotency-Key`` header given, when it is a valid key."""
    problem = events.check_idempotency_key(key)
    if problem is not None:
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key {problem}",
            [{"field": "Idempotency-Key", "message": problem}],
        )
    return key


async def _store(request: web.Request, new: list[NewEvent]) -> list[Any]:
    try:
        return await request.app[INGEST].submit_soon(new)
    except (StoreError, IdempotencyConflictError) as exc:
        raise store_api_error(request, exc, ingest=True) from exc


def _refuse(exc: ValidationError) -> ApiError:
    return ApiError(
        400,
        "invalid_request",
        str(exc),
        [p.as_dict() for p in exc.problems],
    )


def _ingest_one(app: web.Application, kind: Kind) -> Handler:
    """The route of one event of ``kind`` in ``app``. Every event takes it: one coroutine
    under the guard's, ``_store`` written out in it. The lifecycle and the settings are
    read once, here (both are set before any route is added, and nothing replaces them);
    the store is read from ``app`` on each request, as it is set only when the
    application starts."""
    lifecycle = app[LIFECYCLE]
    settings = app[SETTINGS]

    limit = settings.max_body_bytes

    async def ingest(request: web.Request) -> web.Response:
        if lifecycle.draining:
            raise _draining()
        # The body at hand (the usual case) is taken without a coroutine to wait for it.
        raw = _body_at_hand(request, limit)
        if raw is None:
            raw = await _read_json_body(request, settings)
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            key = _idempotency_key(key)
        try:
            event = events.parse_one(kind, raw, idem_key=key)
        except ValidationError as exc:
            raise _refuse(exc) from exc
        try:
            (accepted,) = await app[INGEST].submit_soon([event])
        except (StoreError, IdempotencyConflictError) as exc:
            raise store_api_error(request, exc, ingest=True) from exc
        headers = {"Idempotent-Replayed": "true"} if accepted.duplicate else None
        body = {"id": accepted.id, "status": "queued", "created_at": accepted.created_at}
        return web.Response(status=202, body=_encode(body), content_type=_JSON, headers=headers)

    return ingest


async def post_batch(request: web.Request) -> web.Response:
    check_accepting(request)
    raw = await _read_json_body(request, request.app[SETTINGS])
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        key = _idempotency_key(key)
    try:
        batch = events.parse_batch(raw, idem_key=key)
    except ValidationError as exc:
        raise _refuse(exc) from exc
    accepted = await _store(request, batch)
    body = {
        "status": "queued",
        "events": [
            {"kind": ev.kind, "id": a.id, "created_at": a.created_at}
            for ev, a in zip(batch, accepted, strict=True)
        ],
    }
    headers = {"Idempotent-Replayed": "true"} if all(a.duplicate for a in accepted) else None
    return web.Response(status=202, body=_encode(body), content_type=_JSON, headers=headers)


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(body=_encode({"status": "alive"}), content_type=_JSON)


async def readyz(request: web.Request) -> web.Response:
    lifecycle = request.app[LIFECYCLE]
    store = request.app[STORE]
    settings = request.app[SETTINGS]
    counts = store.counts()
    problems = []
    if not lifecycle.ready:
        problems.append("starting")
    if lifecycle.draining:
        problems.append("shutting down")
    if lifecycle.no_ingest_worker:
        problems.append("no ingest worker is running (restarting; see the log)")
    if not store.writable:
        problems.append("the database is not writable (disk full or failing?)")
    if counts.queued >= settings.max_queue_events:
        problems.append("the queue is full (max_queue_events)")
    if store.full:
        problems.append(
            "the data directory is at its disk budget (max_queue_bytes): new events get "
            "503 queue_full until forwarding frees room"
        )
    if problems:
        body = {"status": "not_ready", "reasons": problems}
        return web.Response(status=503, body=_encode(body), content_type=_JSON)
    return web.Response(body=_encode({"status": "ready"}), content_type=_JSON)


async def status(request: web.Request) -> web.Response:
    return web.Response(body=_encode(request.app[STATUS]()), content_type=_JSON)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS](), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


async def openapi_json(_request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of this API, as shipped in the package."""
    return web.Response(body=openapi.document_bytes(), content_type=_JSON)


def ingest_app(
    settings: Settings, lifecycle: Lifecycle, *, fallback: Handler | None = None
) -> web.Application:
    """An application with the ingest routes' limits, error shape and refusal counts; the
    caller adds the routes (``add_get``, ``add_post``) and sets ``app[INGEST]``. What no
    route takes goes to ``fallback`` behind the guard (an ingest worker's proxy to the
    main process), by default a 404 or 405 in the error shape."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[POLICY] = Policy.build(
        settings.host,
        settings.allowed_hosts,
        settings.allowed_origins,
        token_set=settings.ingest_token is not None,
    )
    app[LIFECYCLE] = lifecycle
    app[TOKEN] = IngestToken(settings.ingest_token)
    app[REFUSED] = {}
    app[GUARDED] = set()
    if fallback is None:
        _add_fallback(app, _no_route, routed=False)
    else:
        _add_fallback(app, fallback, routed=True)
    return app


def add_ingest_routes(app: web.Application) -> None:
    add_post(app, "/v1/actions", _ingest_one(app, "action"))
    add_post(app, "/v1/outcomes", _ingest_one(app, "outcome"))
    add_post(app, "/v1/batch", post_batch)


def build_app(
    settings: Settings,
    lifecycle: Lifecycle,
    status_fn: StatusFn,
    metrics_fn: MetricsFn,
) -> web.Application:
    """The local API. The caller owns the lifecycle and sets ``app[STORE]`` and
    ``app[INGEST]`` in a cleanup context before the first request; this module only
    serves them."""
    app = ingest_app(settings, lifecycle)
    app[STATUS] = status_fn
    app[METRICS] = metrics_fn
    add_ingest_routes(app)
    add_get(app, "/v1/status", status)
    add_get(app, "/healthz", healthz)
    add_get(app, "/readyz", readyz)
    add_get(app, "/metrics", metrics)
    add_get(app, "/openapi.json", openapi_json)
    return app


def build_ops_app(
    settings: Settings, lifecycle: Lifecycle, metrics_fn: MetricsFn, refused: dict[str, int]
) -> web.Application:
    """The ops listener: ``/metrics``, ``/healthz`` and ``/readyz``, and nothing that takes
    or shows events. Any ``Host`` is accepted, an ``Origin`` never (``Policy.ops``);
    refusals count in ``refused``, the local API's own counts. The caller sets
    ``app[STORE]`` before it serves."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[POLICY] = Policy.ops()
    app[LIFECYCLE] = lifecycle
    app[REFUSED] = refused
    app[METRICS] = metrics_fn
    app[GUARDED] = set()
    _add_fallback(app, _no_route, routed=False)
    add_get(app, "/healthz", healthz)
    add_get(app, "/readyz", readyz)
    add_get(app, "/metrics", metrics)
    return app


def make_runner(
    app: web.Application, settings: Settings, *, shutdown_timeout_s: float | None = None
) -> web.AppRunner:
    """The runner of the local API, with its connection limits (the same in every process
    that serves it); requests in flight at shutdown get ``shutdown_timeout_s``, by default
    ``shutdown_grace_s``."""
    # No access log line per request unless asked: aiohttp's own logger, then routed
    # through structlog by logs.configure_logging.
    extra: dict[str, Any] = {} if settings.access_log else {"access_log": None}
    return web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=(
            settings.shutdown_grace_s if shutdown_timeout_s is None else shutdown_timeout_s
        ),
        # A connection must finish its first request's headers, and later stay idle,
        # at most this long (aiohttp starts the timer when the connection opens), so
        # a slow or idle client cannot hold a socket forever. Bodies: _read_json_body.
        keepalive_timeout=settings.client_timeout_s,
        # Header limits (aiohttp's defaults, stated): beyond them, 400 and close.
        max_line_size=MAX_HEADER_LINE_BYTES,
        max_field_size=MAX_HEADER_LINE_BYTES,
        max_headers=MAX_HEADERS,
        # A refused body is read and discarded this long at most before the close.
        lingering_time=LINGERING_S,
        **extra,
    )
