"""The HTTP client for the Valmi API, and the classification of its answers.

``classify`` and ``classify_exception`` are pure: they turn one upstream answer (a status,
headers and a body excerpt, or the exception a request raised) into an ``Answer`` that
says what it means for the event (delivered, retry, dead letter) and for the flusher
(pause; how long to wait). ``Upstream`` is the I/O edge: one pooled keep-alive client that
sends an event's stored body, byte for byte, with its idempotency key.

The client is aiohttp's, not httpx: its CPU per request is a fraction of httpx's (pool,
anyio and model layers), and that CPU is taken from the same event loop that answers the
agents (docs/PERFORMANCE.md has the side-by-side measurement).
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Final, Literal, Protocol

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import __version__
from .config import ConfigError, Secret, read_secret_file
from .events import PATHS, Kind
from .logs import redact_also
from .metrics import UpstreamStats

Verdict = Literal["delivered", "retry", "dead_letter", "pause"]

#: The longest body excerpt an ``Answer.error`` carries.
EXCERPT_CHARS: Final = 500
#: ``X-RateLimit-Reset`` values above this are Unix times; at or below, seconds from now.
EPOCH_THRESHOLD: Final = 1e9
USER_AGENT: Final = f"valmi-sidecar/{__version__}"

_RETRY_STATUSES: Final = frozenset({408, 425, 429})
_DEAD_LETTER_STATUSES: Final = frozenset({400, 413, 422})
_REDACTED: Final = "[redacted]"

log = structlog.get_logger("valmi_sidecar.upstream")

#: What identifies one version of a key file: a rotated Kubernetes Secret is a new file
#: behind the same path (a symlink swap), an edited one a new size or modification time.
_FileStamp = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Answer:
    """What one upstream attempt means for the event and for the flusher.

    ``retry_after_s`` and ``rate_limit_reset_s`` are durations in seconds from the moment
    the answer was classified (never negative); ``None`` when upstream did not say.
    """

    verdict: Verdict
    status: int | None
    error: str
    retry_after_s: float | None = None
    rate_limit_remaining: int | None = None
    rate_limit_reset_s: float | None = None


def excerpt(body: str | bytes, limit: int = EXCERPT_CHARS) -> str:
    """A one-line excerpt of a response body, at most ``limit`` characters."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text[: limit * 4].split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP-date; ``None`` if absent
    or unreadable. A date in the past gives ``0.0``."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def parse_rate_limit(
    headers: Mapping[str, str], *, now: float | None = None
) -> tuple[int | None, float | None]:
    """``(X-RateLimit-Remaining, X-RateLimit-Reset as seconds from now)`` from response
    headers (any letter case); each ``None`` when absent or unreadable. A reset above 1e9 is
    a Unix time, else a number of seconds."""
    lowered = _lowered(headers)
    remaining: int | None = None
    raw = lowered.get("x-ratelimit-remaining")
    if raw is not None:
        try:
            remaining = max(0, int(float(raw.strip())))
        except (ValueError, OverflowError):
            remaining = None
    reset_s: float | None = None
    raw = lowered.get("x-ratelimit-reset")
    if raw is not None:
        try:
            reset = float(raw.strip())
        except ValueError:
            reset = None
        if reset is not None and math.isfinite(reset):
            if reset > EPOCH_THRESHOLD:
                current = time.time() if now is None else now
                reset_s = max(0.0, reset - current)
            else:
                reset_s = max(0.0, reset)
    return remaining, reset_s


#: The answer to a 2xx that says nothing of the rate limit, one per status: ``Answer`` is
#: immutable, so every delivery of that status can share it.
_PLAIN_DELIVERED: Final = {s: Answer("delivered", s, "") for s in range(200, 300)}


def delivered(status: int, headers: Mapping[str, str], *, now: float | None = None) -> Answer:
    """What a 2xx means (``classify`` for ``200 <= status < 300``): delivered, with the
    rate-limit headers when upstream sent them. Pure.

    A delivery never carries an error, so the body is not read, and the only headers that
    matter are ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset``: when neither is there
    (a plain 2xx), nothing else is parsed.
    """
    lowered = _lowered(headers)
    if "x-ratelimit-remaining" not in lowered and "x-ratelimit-reset" not in lowered:
        return _PLAIN_DELIVERED[status]
    remaining, reset_s = parse_rate_limit(lowered, now=now)
    return Answer("delivered", status, "", None, remaining, reset_s)


def classify(
    status: int, headers: Mapping[str, str], body_excerpt: str, *, now: float | None = None
) -> Answer:
    """What an upstream HTTP answer means. Pure; ``now`` is the Unix time for HTTP-dates.

    2xx and 409 are delivered; 408, 425, 429 and 5xx are retried; 400, 413 and 422
    dead-letter the event; 401, 403, 404, 407 (the proxy) and anything else (redirects, other 4xx) pause
    forwarding, because a wrong key or URL must never dead-letter the queue.
    """
    if 200 <= status < 300:
        return delivered(status, headers, now=now)
    lowered = _lowered(headers)
    remaining, reset_s = parse_rate_limit(lowered, now=now)
    detail = excerpt(body_excerpt) or "(empty body)"

    def answer(verdict: Verdict, error: str, retry_after_s: float | None = None) -> Answer:
        return Answer(
            verdict=verdict,
            status=status,
            error=error,
            retry_after_s=retry_after_s,
            rate_limit_remaining=remaining,
            rate_limit_reset_s=reset_s,
        )

    if status == 409:
        return answer(
            "delivered", "HTTP 409: upstream already has this idempotency key; counted as delivered"
        )
    if status in _RETRY_STATUSES or 500 <= status < 600:
        retry_after = parse_retry_after(lowered.get("retry-after"), now=now)
        return answer("retry", f"HTTP {status}: {detail}", retry_after)
    if status in _DEAD_LETTER_STATUSES:
        return answer("dead_letter", f"HTTP {status}: {detail}")
    if status == 401:
        return answer("pause", f"HTTP 401: upstream refused the API key; check api_key ({detail})")
    if status == 403:
        return answer(
            "pause",
            f"HTTP 403: the API key may not use this endpoint; check api_key and its permissions ({detail})",
        )
    if status == 404:
        return answer(
            "pause",
            f"HTTP 404: no such endpoint upstream; check api_url, the API's base URL such as https://api.valmi.io ({detail})",
        )
    if status == 407:
        return answer(
            "pause",
            f"HTTP 407: the egress proxy refused its credentials; check HTTPS_PROXY / HTTP_PROXY ({detail})",
        )
    if 300 <= status < 400:
        location = excerpt(lowered.get("location", ""), 200) or "no Location"
        return answer(
            "pause",
            f"HTTP {status}: upstream redirects ({location}); set api_url to the final URL",
        )
    return answer(
        "pause", f"HTTP {status}: unexpected answer; check api_url and api_key ({detail})"
    )


def classify_exception(exc: BaseException) -> Answer:
    """What a request that raised means. Pure; the caller scrubs secrets from the message.

    A transport error or a timeout is retried. A bad URL, and any other exception of the
    HTTP client, pauses: the event's own part of a request (its stored body and a key
    that ``key_problem`` passed) cannot make the client raise, so the cause is the
    configuration or the client, and sending other events would fail the same way.
    """
    name = type(exc).__name__
    message = excerpt(str(exc), 300)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return Answer(
            "pause", None, f"{name}: {message or 'bad URL'}; check api_url (http:// or https://)"
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError) and exc.status == 407:
        return Answer(
            "pause",
            407,
            f"{name}: the egress proxy refused its credentials; check HTTPS_PROXY / HTTP_PROXY",
        )
    if isinstance(exc, TimeoutError):
        return Answer("retry", None, f"{name}: {message or 'timed out'}")
    if isinstance(exc, aiohttp.ClientError):
        return Answer("retry", None, f"{name}: {message or 'transport error'}")
    return Answer(
        "pause",
        None,
        f"{name}: {message or 'the HTTP client failed'}; the HTTP client cannot make a request "
        "to api_url: check api_url (a host name such as api.valmi.io, a port from 1 to 65535)",
    )


#: Characters the HTTP client refuses in a header value (header injection).
_FORBIDDEN_HEADER_CHARS: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def key_problem(idem_key: str) -> str | None:
    """Why an event's idempotency key can never be sent as a header, or ``None``. Pure.

    Keys checked at ingest always pass; a key salvaged from an old file may not.
    """
    if idem_key.isascii() and idem_key.isprintable():
        return None  # every key the sidecar made or took at ingest: no regular expression
    if _FORBIDDEN_HEADER_CHARS.search(idem_key) is not None:
        return "its idempotency key contains a control character"
    try:
        idem_key.encode("utf-8")
    except UnicodeEncodeError:
        return "its idempotency key is not valid Unicode text"
    return None


def _lowered(headers: Mapping[str, str]) -> Mapping[str, str]:
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        return headers  # already case-insensitive
    return {k.lower(): v for k, v in headers.items()}


def _check_key(api_key: Secret) -> str:
    key = api_key.reveal()
    if not key.strip() or not key.isascii() or not key.isprintable():
        raise ValueError("api_key: must be a non-empty printable ASCII string")
    return key


def _stamp(path: Path) -> _FileStamp:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _basic_credentials(login: str, password: str) -> str:
    token = base64.b64encode(f"{login}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


class Outgoing(Protocol):
    """What sending an event needs (the store's ``QueuedEvent`` is one)."""

    @property
    def idem_key(self) -> str: ...
    @property
    def kind(self) -> Kind: ...
    @property
    def body(self) -> bytes: ...


class Upstream:
    """One pooled keep-alive client for the Valmi API.

    ``send`` never raises for an HTTP or transport failure: every outcome is an ``Answer``
    whose ``error`` never contains the API key (current or replaced) or the proxy's
    credentials. The session is made on the first send, inside the running event loop.

    ``proxy`` is the forward proxy's URL (``http://[user:password@]host:port``) or
    ``None`` for direct connections. The key can be replaced while running
    (``set_key``), and re-read from the file it came from (``refresh_key``).
    """

    def __init__(
        self,
        api_url: str,
        api_key: Secret,
        *,
        timeout_s: float,
        max_connections: int,
        proxy: str | None = None,
    ) -> None:
        key = _check_key(api_key)
        if max_connections < 1:
            raise ValueError(f"max_connections: must be at least 1, not {max_connections}")
        self._key = key
        self._key_file = api_key.path
        self._key_stamp: _FileStamp | None = None
        # Keys replaced by a rotation: still scrubbed from every answer.
        self._secrets: list[str] = [key]
        self._base = api_url.rstrip("/")
        self._headers = self._request_headers()
        self._proxy: URL | None = None
        self._proxy_headers: dict[str, str] | None = None
        if proxy is not None:
            self._set_proxy(URL(proxy))
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self.stats = UpstreamStats()

    def _set_proxy(self, url: URL) -> None:
        if url.user is not None or url.password is not None:
            credentials = _basic_credentials(url.user or "", url.password or "")
            self._add_secrets(url.raw_password, url.password, credentials)
            if self._base.startswith("https:"):
                # Sent on the CONNECT to the proxy, never through the tunnel.
                self._proxy_headers = {"Proxy-Authorization": credentials}
            else:
                # A plain-HTTP request goes to the proxy itself, headers and all.
                self._headers["Proxy-Authorization"] = credentials
        self._proxy = url.with_user(None)

    def _add_secrets(self, *secrets: str | None) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        found = {*self._secrets, *(s for s in secrets if s)}
        self._secrets = sorted(found, key=len, reverse=True)

    def _request_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    @property
    def key_file(self) -> Path | None:
        """The file the key was read from, if any."""
        return self._key_file

    def set_key(self, api_key: Secret) -> bool:
        """Use ``api_key`` for the next requests (those in flight keep the old one); True
        when it differs from the key in use. ``ValueError`` if it is not a usable key."""
        key = _check_key(api_key)
        if api_key.path is not None:
            self._key_file = api_key.path
        if key == self._key:
            return False
        redact_also(key)
        self._key = key
        self._add_secrets(key)
        self._headers["Authorization"] = f"Bearer {key}"
        return True

    async def refresh_key(self) -> bool:
        """Read the key file again if it changed since it was last read, and use the key
        in it; True when the key in use changed. Never raises: an unreadable or empty file
        is logged and the key in use is kept."""
        path = self._key_file
        if path is None:
            return False
        try:
            found = await asyncio.to_thread(self._read_if_changed, path, self._key_stamp)
        except ConfigError as exc:
            log.warning("api_key_file_unreadable", path=str(path), error=str(exc))
            return False
        except OSError as exc:
            log.warning(
                "api_key_file_unreadable", path=str(path), error=exc.strerror or type(exc).__name__
            )
            return False
        if found is None:
            return False
        stamp, text = found
        self._key_stamp = stamp
        try:
            changed = self.set_key(Secret(text, path))
        except ValueError as exc:
            log.warning("api_key_file_unusable", path=str(path), error=str(exc))
            return False
        if changed:
            log.info("api_key_reloaded", path=str(path), reason="key file changed")
        return changed

    @staticmethod
    def _read_if_changed(path: Path, seen: _FileStamp | None) -> tuple[_FileStamp, str] | None:
        stamp = _stamp(path)
        if stamp == seen:
            return None
        return stamp, read_secret_file(path)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={
                    "User-Agent": USER_AGENT,
                    "Content-Type": "application/json",
                },
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                # The proxy is read from the environment once, at start (config.env_proxy),
                # not on every request; and ~/.netrc is never consulted.
                trust_env=False,
            )
        return self._session

    async def send(self, event: Outgoing) -> Answer:
        """POST the event's stored body to its path, with its idempotency key."""
        problem = key_problem(event.idem_key)
        if problem is not None:
            # Sending it again cannot help: dead-letter this event, not the queue.
            return Answer("dead_letter", None, f"not sendable: {problem}")
        started = time.monotonic()
        try:
            async with self._client().post(
                self._base + PATHS[event.kind],
                data=event.body,
                headers={**self._headers, "Idempotency-Key": event.idem_key},
                allow_redirects=False,
                proxy=self._proxy,
                proxy_headers=self._proxy_headers,
            ) as response:
                status = response.status
                # Read the body even of a 2xx: an unread body closes the connection.
                raw = await response.read()
                headers = response.headers
        except Exception as exc:  # noqa: BLE001 - every failure is an Answer, see classify_exception
            self.stats.observe(None, time.monotonic() - started)
            return self._scrubbed(classify_exception(exc))
        self.stats.observe(status, time.monotonic() - started)
        if 200 <= status < 300:
            # Nothing of a delivery's body reaches the answer: no excerpt, nothing to scrub.
            return delivered(status, headers)
        # Scrub the whole body before any cut: an excerpt that ends inside an echoed key
        # would otherwise carry a piece of it past the scrubbing of the answer.
        for secret in self._secrets:
            if secret.encode() in raw:
                raw = raw.replace(secret.encode(), _REDACTED.encode())
        body = raw[: EXCERPT_CHARS * 4].decode("utf-8", "replace")
        return self._scrubbed(classify(status, headers, body))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _scrubbed(self, answer: Answer) -> Answer:
        error = answer.error
        for secret in self._secrets:
            if secret in error:
                error = error.replace(secret, _REDACTED)
        return answer if error == answer.error else replace(answer, error=error)
