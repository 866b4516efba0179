"""The upstream client: classification of answers (pure) and the exact request it sends."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from valmi_sidecar import __version__
from valmi_sidecar.config import Secret
from valmi_sidecar.store import QueuedEvent
from valmi_sidecar.upstream import (
    EXCERPT_CHARS,
    Answer,
    Upstream,
    classify,
    classify_exception,
    delivered,
    excerpt,
    key_problem,
    parse_rate_limit,
    parse_retry_after,
)

KEY = "sk_test_0123456789abcdef"
Stub = Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[str]]
NOW = 1_700_000_000.0
BODY = b'{"agent_key":"agent_1","action_type":"llm_call","timestamp":"2024-01-15T10:30:00.000Z"}'


def queued(kind: str = "action", idem_key: str = "evt_key_1", body: bytes = BODY) -> QueuedEvent:
    return QueuedEvent(
        seq=1,
        id="evt_0001",
        idem_key=idem_key,
        kind=kind,  # type: ignore[arg-type]
        body=body,
        received_at=NOW,
        attempts=0,
    )


# --- classify ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    answer = classify(status, {}, "")
    assert ("delivered", status, "") == (answer.verdict, answer.status, answer.error)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-RateLimit-Remaining": "3"},
        {"x-ratelimit-reset": "12"},
        {"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": str(int(NOW + 40))},
        {"X-RateLimit-Remaining": "many", "X-RateLimit-Reset": "later", "Retry-After": "9"},
    ],
)
@pytest.mark.parametrize("status", [200, 202, 299])
def test_a_2xx_is_delivered_with_exactly_the_rate_limit_headers_it_carries(
    status: int, headers: dict[str, str]
) -> None:
    """The 2xx fast path reads only the rate-limit headers, and reads each one present."""
    remaining, reset_s = parse_rate_limit(headers, now=NOW)
    expected = Answer("delivered", status, "", None, remaining, reset_s)
    assert expected == classify(status, headers, "ignored body", now=NOW)
    assert expected == delivered(status, CIMultiDictProxy(CIMultiDict(headers)), now=NOW)


def test_409_counts_as_delivered() -> None:
    """A 409 on an idempotency key means upstream already has the event."""
    answer = classify(409, {}, '{"error":{"code":"conflict"}}')
    assert "delivered" == answer.verdict
    assert "409" in answer.error


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_retryable_statuses_are_retried(status: int) -> None:
    answer = classify(status, {}, "busy")
    assert "retry" == answer.verdict
    assert status == answer.status
    assert f"HTTP {status}" in answer.error


@pytest.mark.parametrize("status", [400, 413, 422])
def test_permanent_refusals_dead_letter_with_status_and_excerpt(status: int) -> None:
    answer = classify(status, {}, '{"error": {"code": "invalid_request", "message": "bad value"}}')
    assert "dead_letter" == answer.verdict
    assert status == answer.status
    assert f"HTTP {status}" in answer.error
    assert "bad value" in answer.error


def test_dead_letter_excerpt_is_at_most_500_characters() -> None:
    answer = classify(400, {}, "x" * 10_000)
    prefix = "HTTP 400: "
    assert answer.error.startswith(prefix)
    assert EXCERPT_CHARS == len(answer.error) - len(prefix)


def test_dead_letter_with_empty_body_says_so() -> None:
    assert "HTTP 422: (empty body)" == classify(422, {}, "").error


@pytest.mark.parametrize(
    ("status", "hint"), [(401, "check api_key"), (403, "check api_key"), (404, "check api_url")]
)
def test_auth_and_not_found_pause_with_a_hint(status: int, hint: str) -> None:
    answer = classify(status, {}, '{"error":{"code":"unauthorized","message":"Invalid API key"}}')
    assert "pause" == answer.verdict
    assert status == answer.status
    assert hint in answer.error


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_pause_and_name_the_target(status: int) -> None:
    """A redirect means the URL is wrong: pause, never dead-letter."""
    answer = classify(status, {"Location": "https://api.valmi.io/v1/actions"}, "")
    assert "pause" == answer.verdict
    assert "https://api.valmi.io/v1/actions" in answer.error
    assert "api_url" in answer.error


@pytest.mark.parametrize("status", [402, 405, 410, 418, 451, 499, 100, 600])
def test_other_statuses_pause_and_say_what_to_check(status: int) -> None:
    answer = classify(status, {}, "teapot")
    assert "pause" == answer.verdict
    assert "check api_url and api_key" in answer.error


def test_429_carries_retry_after_seconds() -> None:
    answer = classify(429, {"Retry-After": "7"}, "")
    assert ("retry", 7.0) == (answer.verdict, answer.retry_after_s)


def test_503_carries_retry_after_http_date() -> None:
    date = formatdate(NOW + 30, usegmt=True)
    answer = classify(503, {"retry-after": date}, "", now=NOW)
    assert 30.0 == answer.retry_after_s


def test_rate_limit_headers_are_in_every_answer() -> None:
    headers = {"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "12"}
    for status in (200, 400, 429, 503):
        answer = classify(status, headers, "")
        assert (3, 12.0) == (answer.rate_limit_remaining, answer.rate_limit_reset_s)


def test_answers_without_headers_carry_no_hints() -> None:
    answer = classify(503, {}, "")
    assert Answer("retry", 503, "HTTP 503: (empty body)") == answer


# --- Retry-After and X-RateLimit parsing -----------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("1", 1.0), (" 120 ", 120.0), ("0.25", 0.25), ("-5", 0.0)],
)
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert expected == parse_retry_after(value)


def test_retry_after_http_date_in_the_future() -> None:
    assert 90.0 == parse_retry_after(formatdate(NOW + 90, usegmt=True), now=NOW)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    assert 0.0 == parse_retry_after(formatdate(NOW - 90, usegmt=True), now=NOW)


def test_retry_after_obsolete_asctime_date() -> None:
    """RFC 9110 asks recipients to accept the asctime format too."""
    assert 60.0 == parse_retry_after("Tue Nov 14 22:14:20 2023", now=NOW)


@pytest.mark.parametrize("value", [None, "", "soon", "nan", "inf", "Mon, 99 Foo 2024"])
def test_retry_after_unreadable_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_rate_limit_reset_in_seconds() -> None:
    assert (10, 30.0) == parse_rate_limit(
        {"X-RateLimit-Remaining": "10", "X-RateLimit-Reset": "30"}, now=NOW
    )


def test_rate_limit_reset_as_unix_time() -> None:
    """A reset above 1e9 is an epoch time, turned into seconds from now."""
    assert (0, 45.0) == parse_rate_limit(
        {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW + 45))}, now=NOW
    )


def test_rate_limit_reset_in_the_past_is_zero() -> None:
    assert (5, 0.0) == parse_rate_limit(
        {"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": str(int(NOW - 3))}, now=NOW
    )


def test_rate_limit_headers_read_from_case_insensitive_headers() -> None:
    headers = CIMultiDictProxy(
        CIMultiDict({"X-RATELIMIT-REMAINING": "7", "X-RateLimit-Reset": "1.5"})
    )
    assert (7, 1.5) == parse_rate_limit(headers)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-RateLimit-Remaining": "many", "X-RateLimit-Reset": "later"},
        {"X-RateLimit-Remaining": "inf", "X-RateLimit-Reset": "nan"},
    ],
)
def test_rate_limit_absent_or_unreadable_is_none(headers: dict[str, str]) -> None:
    assert (None, None) == parse_rate_limit(headers, now=NOW)


def test_excerpt_is_one_line_and_bounded() -> None:
    text = excerpt(b"line one\n\n   line\ttwo " + b"y" * 1000)
    assert "\n" not in text
    assert text.startswith("line one line two y")
    assert EXCERPT_CHARS == len(text)


# --- exceptions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientConnectionError("connection refused"),
        aiohttp.ServerTimeoutError("timed out"),
        TimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("connection reset"),
    ],
)
def test_transport_errors_and_timeouts_are_retried(exc: Exception) -> None:
    answer = classify_exception(exc)
    assert ("retry", None) == (answer.verdict, answer.status)
    assert answer.error.startswith(type(exc).__name__)


def test_bad_url_scheme_pauses() -> None:
    answer = classify_exception(aiohttp.InvalidURL("ftp://api.valmi.test"))
    assert "pause" == answer.verdict
    assert "api_url" in answer.error


@pytest.mark.parametrize(
    "exc",
    [
        UnicodeError("encoding with 'idna' codec failed (UnicodeError: label empty or too long)"),
        ValueError("something the client refuses"),
        TypeError("an unexpected failure inside the client"),
    ],
)
def test_other_client_exceptions_pause_and_never_dead_letter(exc: Exception) -> None:
    """Not about the event's content: sending the next event would fail the same way."""
    answer = classify_exception(exc)
    assert ("pause", None) == (answer.verdict, answer.status)
    assert answer.error.startswith(type(exc).__name__)
    assert "check api_url" in answer.error


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("evt_key_1", None),
        ("k\tk", None),  # a tab is allowed in a header value
        ("clé-ü", None),  # printable, not ASCII: sent UTF-8 encoded
        ("k\r\nX-Injected: 1", "control character"),
        ("k\x00", "control character"),
        ("k\x7f", "control character"),
        ("k\udcff", "not valid Unicode"),
    ],
)
def test_key_problem_names_keys_the_client_cannot_send(key: str, expected: str | None) -> None:
    problem = key_problem(key)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None
        assert expected in problem


@pytest.mark.parametrize(
    "url", ["https://api..valmi.test", f"https://{'a' * 64}.valmi.test", "https://10.0.0.999"]
)
async def test_a_host_the_client_cannot_use_pauses_rather_than_dead_lettering(url: str) -> None:
    """Such a URL is refused by the settings; given anyway, it must not empty the queue."""
    upstream = Upstream(url, Secret(KEY), timeout_s=1.0, max_connections=1)
    try:
        answer = await upstream.send(queued())
    finally:
        await upstream.aclose()
    assert ("pause", None) == (answer.verdict, answer.status)
    assert "api_url" in answer.error


async def test_a_url_without_a_usable_scheme_pauses_rather_than_raising() -> None:
    upstream = Upstream("ftp://api.valmi.test", Secret(KEY), timeout_s=1.0, max_connections=1)
    try:
        answer = await upstream.send(queued())
    finally:
        await upstream.aclose()
    assert "pause" == answer.verdict
    assert "api_url" in answer.error


# --- the client, against a real server on 127.0.0.1 ----------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]


@pytest.fixture
async def stub() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start a real aiohttp server whose every request goes to ``handler``."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


async def sent_with(url: str, event: QueuedEvent, timeout_s: float = 5.0) -> Answer:
    upstream = Upstream(url, Secret(KEY), timeout_s=timeout_s, max_connections=4)
    try:
        return await upstream.send(event)
    finally:
        await upstream.aclose()


async def test_send_posts_the_stored_body_with_key_and_auth(stub: Stub) -> None:
    seen: list[Seen] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(Seen(request.method, request.path, await request.read(), dict(request.headers)))
        return web.json_response({"id": "action_1", "status": "processed"})

    answer = await sent_with(await stub(handler), queued())
    assert "delivered" == answer.verdict
    [request] = seen
    assert ("POST", "/v1/actions") == (request.method, request.path)
    assert BODY == request.body
    assert f"Bearer {KEY}" == request.headers["Authorization"]
    assert "application/json" == request.headers["Content-Type"]
    assert "evt_key_1" == request.headers["Idempotency-Key"]
    assert f"valmi-sidecar/{__version__}" == request.headers["User-Agent"]


async def test_outcomes_go_to_their_path_under_a_base_path(stub: Stub) -> None:
    paths: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        paths.append(request.path)
        return web.Response(status=202)

    await sent_with(await stub(handler) + "/valmi/", queued(kind="outcome"))
    assert ["/valmi/v1/outcomes"] == paths


async def test_every_attempt_carries_the_same_idempotency_key(stub: Stub) -> None:
    keys: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        keys.append(request.headers["Idempotency-Key"])
        return web.Response(status=503 if len(keys) < 3 else 200)

    url = await stub(handler)
    upstream = Upstream(url, Secret(KEY), timeout_s=5.0, max_connections=4)
    event = queued(idem_key="client-key-42")
    try:
        verdicts = [(await upstream.send(event)).verdict for _ in range(3)]
    finally:
        await upstream.aclose()
    assert ["retry", "retry", "delivered"] == verdicts
    assert ["client-key-42"] * 3 == keys


async def test_connection_refused_becomes_a_retry_answer_without_the_key() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = await sent_with(f"http://127.0.0.1:{port}", queued())
    assert ("retry", None) == (answer.verdict, answer.status)
    assert KEY not in answer.error


async def test_timeouts_become_retry_answers(stub: Stub) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=200)

    url = await stub(handler)
    try:
        answer = await sent_with(url, queued(), timeout_s=0.2)
    finally:
        release.set()
    assert ("retry", None) == (answer.verdict, answer.status)
    assert "Timeout" in answer.error


async def test_error_bodies_echoing_the_key_are_scrubbed(stub: Stub) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=401, text=f"key {request.headers['Authorization']} is not valid")

    answer = await sent_with(await stub(handler), queued())
    assert "pause" == answer.verdict
    assert KEY not in answer.error
    assert "[redacted]" in answer.error


async def test_a_2xx_echoing_the_key_is_delivered_with_its_rate_limit_and_no_error(
    stub: Stub,
) -> None:
    """Nothing of a delivery's body reaches its answer; its rate-limit headers do."""

    async def handler(request: web.Request) -> web.Response:
        headers = {"X-RateLimit-Remaining": "41", "X-RateLimit-Reset": "30"}
        text = f"processed for {request.headers['Authorization']}"
        return web.Response(status=201, text=text, headers=headers)

    answer = await sent_with(await stub(handler), queued())
    assert Answer("delivered", 201, "", None, 41, 30.0) == answer


async def test_dead_letter_answer_carries_the_body_excerpt(stub: Stub) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "value must be a number"}}, status=422)

    answer = await sent_with(await stub(handler), queued())
    assert ("dead_letter", 422) == (answer.verdict, answer.status)
    assert "value must be a number" in answer.error


async def test_a_key_that_cannot_be_a_header_is_dead_lettered_not_sent(stub: Stub) -> None:
    """A control character in a (salvaged) key: aiohttp refuses to write the header, and
    sending again cannot help. Nothing reaches Valmi, and the flusher keeps running."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Idempotency-Key", ""))
        return web.json_response({}, status=202)

    answer = await sent_with(await stub(handler), queued(idem_key="k\r\nX-Injected: 1"))
    assert ("dead_letter", None) == (answer.verdict, answer.status)
    assert answer.error.startswith("not sendable: ")
    assert [] == seen


async def test_redirects_are_not_followed(stub: Stub) -> None:
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(status=301, headers={"Location": "/elsewhere/v1/actions"})

    answer = await sent_with(await stub(handler), queued())
    assert ["/v1/actions"] == calls
    assert "pause" == answer.verdict
    assert "/elsewhere/v1/actions" in answer.error


@pytest.mark.parametrize("bad", ["", "   ", "sk_live_\nx", "sk_live_é"])
def test_unusable_api_key_is_refused_without_showing_it(bad: str) -> None:
    with pytest.raises(ValueError, match="api_key") as info:
        Upstream("https://api.valmi.test", Secret(bad), timeout_s=1.0, max_connections=1)
    assert bad.strip() == "" or bad not in str(info.value)
