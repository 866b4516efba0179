"""Listen addresses and the API's URL: parsing them, and saying why one is unusable."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .errors import ConfigError

NOT_HOST_PORT = "is not HOST:PORT; use for example 127.0.0.1:8787 or [::1]:8787"


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8787"`` or ``"[::1]:8787"`` to ``(host, port)``; ``ConfigError`` if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen: {listen!r} {NOT_HOST_PORT}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1; False for anything else (0.0.0.0 too)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: The longest DNS name (RFC 1035, without the trailing dot) and label.
_MAX_NAME_CHARS = 253
_MAX_LABEL_CHARS = 63
#: What a label of a host name may hold once IDNA-encoded: letters, digits, hyphens, and
#: underscores (container and service names use them, and their resolvers answer them).
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _host_problem(host: str) -> str | None:
    """Why ``host`` (from ``urlsplit``: lowercased, brackets removed) can never be
    connected to, or ``None``. The HTTP client refuses such a host on every request, so
    it is caught here, before any event is tried."""
    if ":" in host:  # an IPv6 literal; urlsplit has already checked it
        return None
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return f"host {host!r} is not an IPv4 address (four numbers from 0 to 255)"
        return None
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return (
            f"host {host!r} is not a valid name (an empty label such as '..', or a label "
            f"longer than {_MAX_LABEL_CHARS} characters)"
        )
    if len(ascii_name) > _MAX_NAME_CHARS:
        return f"host {host!r} is longer than {_MAX_NAME_CHARS} characters"
    for label in ascii_name.split("."):
        if not label or len(label) > _MAX_LABEL_CHARS:
            return (
                f"host {host!r} is not a valid name (an empty label such as '..', or a "
                f"label longer than {_MAX_LABEL_CHARS} characters)"
            )
        if not set(label) <= _LABEL_CHARS:
            return f"host {host!r} is not a valid name (only letters, digits, '-', '_' and '.')"
        if label.startswith("-") or label.endswith("-"):
            return f"host {host!r} is not a valid name (a label starts or ends with '-')"
    return None


def check_api_url(text: str) -> str:
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError on a port that is not 0-65535
    except ValueError as e:
        raise ValueError(f"is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an http:// or https:// URL")
    if port == 0:
        raise ValueError("has port 0, which cannot be connected to; use a port from 1 to 65535")
    problem = _host_problem(parts.hostname)
    if problem is not None:
        raise ValueError(f"is not a usable URL: {problem}")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; give the API key in VALMI_API_KEY")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be the API's base URL without a path, query or fragment")
    return text.rstrip("/")


def url_without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` shown as ``[credentials]@``, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return parts._replace(netloc="[credentials]@" + parts.netloc.rpartition("@")[2]).geturl()
