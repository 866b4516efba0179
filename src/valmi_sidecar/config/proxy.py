"""The forward proxy for the Valmi API, read from the environment as curl reads it."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from .addresses import is_loopback, url_without_credentials
from .errors import ConfigError


def _no_proxy(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` names ``host``: ``*``, the host itself, a domain it is in
    (``example.com`` and ``.example.com`` both match ``api.example.com``), with an
    optional ``:port``."""
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = entry, ""
        if entry.startswith("[") and "]:" in entry:  # [::1]:8080
            name, _, entry_port = entry.partition("]:")
        elif entry.count(":") == 1:  # host:8080 (a bare IPv6 address has more colons)
            name, _, entry_port = entry.partition(":")
        if entry_port.isdigit() and int(entry_port) != port:
            continue
        name = name.strip("[]").lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def env_proxy(api_url: str, env: Mapping[str, str]) -> str | None:
    """The forward proxy for ``api_url`` from the environment, as curl and most tools read
    it: ``https_proxy``/``HTTPS_PROXY`` for an https:// API (``http_proxy``/``HTTP_PROXY``
    for http://), unless ``no_proxy``/``NO_PROXY`` names its host. A loopback API is never
    proxied. ``None`` for a direct connection; ``ConfigError`` for a URL the client cannot
    use (the message never shows the proxy's password)."""
    parts = urlsplit(api_url)
    host = (parts.hostname or "").lower()
    if not host or is_loopback(host):
        return None
    var = ""
    value = ""
    for name in (f"{parts.scheme}_proxy", f"{parts.scheme}_proxy".upper()):
        if env.get(name, "").strip():
            var, value = name, env[name].strip()
            break
    if not value:
        return None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    if _no_proxy(host, parts.port or (443 if parts.scheme == "https" else 80), no_proxy):
        return None
    if "://" not in value:
        value = "http://" + value  # a bare host:port, as curl takes it
    shown = url_without_credentials(value)
    try:
        proxy = urlsplit(value)
        proxy.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(
            f"environment: {var}={shown!r} is not a valid URL; use for example "
            "http://proxy.internal:3128, or set proxy_from_env = false"
        ) from None
    if proxy.scheme != "http" or not proxy.hostname:
        raise ConfigError(
            f"environment: {var}={shown!r}: only http:// proxies are supported (the API's "
            "TLS still runs end to end through CONNECT); use for example "
            "http://proxy.internal:3128, or set proxy_from_env = false"
        )
    return value
