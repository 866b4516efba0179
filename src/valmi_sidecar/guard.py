"""Who may talk to the local API: programs on this host, never a web page in a browser.

A browser on the agent's host can reach loopback. What a page can send there without the
server's consent (no CORS preflight is ever granted to it) is narrow, and every part of it
is refused here, on every route:

- a POST whose body is not declared JSON: a "simple" request (no Content-Type,
  ``text/plain``, a form) needs no preflight, so it is the only kind of POST a page can
  send cross-origin;
- a request that carries ``Origin`` (browsers add it to every cross-origin request and
  every POST; the clients agents use do not), or that the browser marks as coming from
  another site (``Sec-Fetch-Site``: a different port on 127.0.0.1 is the *same site*, so
  ``same-site`` is refused as well as ``cross-site``);
- a ``Host`` that is not one of the sidecar's own names: a page on a name that an
  attacker's DNS rebinds to 127.0.0.1 is same-origin to the browser, so only the Host
  header still tells it apart. With an ingest token the token is the gate instead
  (neighbours in a pod reach the sidecar by a service name nobody can list in advance),
  unless ``allowed_hosts`` is set.

This module decides; ``receiver.py`` turns a refusal into the one error shape. It knows no
HTTP framework, so the rules are tested without sockets.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "JSON_MEDIA_HINT",
    "LOCAL_NAMES",
    "Policy",
    "Refusal",
    "check_origin",
    "host_name",
    "is_json_media_type",
    "normalize_host",
    "normalize_origin",
]

#: The names every sidecar answers to, whatever ``listen`` says.
LOCAL_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
#: What a client should do about a 415.
JSON_MEDIA_HINT: Final = (
    "send the body as JSON with the header 'Content-Type: application/json' "
    "(curl: -H 'Content-Type: application/json'; httpx and requests: json=...)"
)
_REFUSED_FETCH_SITES: Final = frozenset({"cross-site", "same-site"})
_ORIGIN: Final = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s@]+")
_HOST_NAME: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: HTTP status, a stable code, a message saying what to do."""

    status: int
    code: str
    message: str


def normalize_origin(text: str) -> str:
    """An origin as browsers send it (``scheme://host[:port]``, lower case); ``ValueError``
    for anything else (a path, ``*``, ``null``)."""
    origin = text.strip().lower().rstrip("/")
    if not _ORIGIN.fullmatch(origin):
        raise ValueError("is not an origin; use scheme://host[:port], e.g. http://localhost:3000")
    return origin


def normalize_host(text: str) -> str:
    """A host name or IP address without port or brackets, lower case; ``ValueError`` for
    anything else (a port, a scheme, a wildcard)."""
    host = text.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(host) or len(host) > 253:
        raise ValueError("is not a host name or IP address; give the name alone, without a port")
    return host


# Every request asks, and a client sends the same Host again and again: cached, bounded
# (a client sending endless names only evicts its own entries).
@functools.lru_cache(maxsize=256)
def host_name(header: str) -> str | None:
    """The name part of a ``Host`` header (``[::1]:8787`` → ``::1``); ``None`` if it is not
    a well-formed host (which is then refused: no allowed name can match it)."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not re.fullmatch(r":\d{1,5}", text[end + 1 :])):
            return None
        name = text[1:end]
    else:
        name, sep, port = text.partition(":")
        if sep and not re.fullmatch(r"\d{1,5}", port):
            return None
    try:
        return normalize_host(name)
    except ValueError:
        return None


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, any parameters (a charset)."""
    if content_type == "application/json":
        return True  # what nearly every client sends: nothing to take apart
    if content_type is None:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def check_origin(origin: str | None, fetch_site: str | None, allowed: frozenset[str]) -> bool:
    """True when the request may come from where it says it does: no ``Origin`` and no
    other site per ``Sec-Fetch-Site``, or an ``Origin`` that is listed."""
    if origin is not None:
        try:
            return normalize_origin(origin) in allowed
        except ValueError:
            return False  # "null" (a sandboxed page, a file://) and anything malformed
    if fetch_site is None:
        return True  # a program, not a browser: the usual caller
    return fetch_site.strip().lower() not in _REFUSED_FETCH_SITES


@dataclass(frozen=True, slots=True)
class Policy:
    """The allow-lists of one listen address. ``hosts`` is ``None`` when the Host check is
    off (an ingest token is set and no ``allowed_hosts`` are listed)."""

    hosts: frozenset[str] | None
    origins: frozenset[str]

    @classmethod
    def build(
        cls,
        listen_host: str,
        allowed_hosts: Iterable[str],
        allowed_origins: Iterable[str],
        *,
        token_set: bool,
    ) -> Policy:
        extra = {normalize_host(h) for h in allowed_hosts}
        hosts: frozenset[str] | None = None
        if extra or not token_set:
            own = set(LOCAL_NAMES) | extra
            # listen was checked at start-up; an unusual spelling just adds nothing.
            with contextlib.suppress(ValueError):
                own.add(normalize_host(listen_host))
            hosts = frozenset(own)
        return cls(hosts=hosts, origins=frozenset(normalize_origin(o) for o in allowed_origins))

    @classmethod
    def ops(cls) -> Policy:
        """The ops listener's: any ``Host`` (kubelet probes and scrapers name the pod's
        address, which nobody can list in advance, and its routes change nothing and show
        no billing data), and never a web page: no origin is allowed."""
        return cls(hosts=None, origins=frozenset())

    def origin_allowed(self, origin: str | None) -> bool:
        """True when ``origin`` is present and listed (then CORS answers are given)."""
        if origin is None:
            return False
        try:
            return normalize_origin(origin) in self.origins
        except ValueError:
            return False

    def refusal(
        self, method: str, headers: Mapping[str, str], *, routed: bool = True
    ) -> Refusal | None:
        """The refusal of a request with these headers, or ``None`` when it may proceed.

        The Host check comes first (a rebound page is same-origin, so nothing else shows
        it), then where the request comes from, then the body's declared type, for a
        route that exists (``routed``: else the 404 or 405 says more)."""
        if self.hosts is not None:
            header = headers.get("Host")
            # No Host at all is an HTTP/1.0 program, never a browser (browsers always send it).
            if header is not None and header.strip():
                name = host_name(header)
                if name is None or name not in self.hosts:
                    return Refusal(
                        403,
                        "host_not_allowed",
                        f"the Host header {header.strip()[:100]!r} is not one of this "
                        "sidecar's names; connect through localhost, 127.0.0.1 or [::1], or "
                        "list the name in allowed_hosts",
                    )
        if not check_origin(headers.get("Origin"), headers.get("Sec-Fetch-Site"), self.origins):
            return Refusal(
                403,
                "origin_not_allowed",
                "requests from web pages are refused (the request carries an Origin or "
                "Sec-Fetch-Site header); call the sidecar from the agent's own process, or "
                "list the page's origin in allowed_origins",
            )
        if routed and method == "POST" and not is_json_media_type(headers.get("Content-Type")):
            given = headers.get("Content-Type")
            media = given.split(";", 1)[0].strip()[:100] if given else ""
            what = f"not {media}" if media else "no Content-Type was given"
            return Refusal(
                415,
                "unsupported_media_type",
                f"the body must be declared JSON ({what}): {JSON_MEDIA_HINT}",
            )
        return None
