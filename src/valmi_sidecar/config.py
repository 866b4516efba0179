"""Settings: one frozen object, built from defaults < TOML file < environment < CLI flags.

Unknown keys and bad values stop start-up with a ``ConfigError`` that names the key, the
place it came from, and says what is allowed. Secrets (the API key, the ingest token) are
wrapped in ``Secret`` so that no repr, log line or status page can show them; they come
from the environment or from a file, never from the TOML file or the command line.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .disk import minimum_queue_bytes
from .guard import normalize_host, normalize_origin

GiB = 1024**3
#: The most processes that may serve the local API (``ingest_processes``).
MAX_INGEST_PROCESSES = 32
#: ``pause_after_refusals`` below this could never tell one bad event from a bad setting.
MIN_PAUSE_AFTER_REFUSALS = 2

#: Valmi's documented request budgets a minute: ``sk_api_…`` API keys get 1,000, SDK keys
#: (``sk_live_…``, ``sk_test_…``) 10,000. The default rate limit follows the key's kind.
API_KEY_PREFIX = "sk_api_"
API_KEY_RATE_LIMIT_PER_MIN = 1_000
SDK_KEY_RATE_LIMIT_PER_MIN = 10_000

#: Environment variables that are not ``VALMI_SIDECAR_<FIELD>``.
ENV_CONFIG = "VALMI_SIDECAR_CONFIG"
ENV_API_URL = "VALMI_API_URL"
ENV_API_KEY = "VALMI_API_KEY"
ENV_API_KEY_FILE = "VALMI_API_KEY_FILE"
ENV_INGEST_TOKEN = "VALMI_SIDECAR_INGEST_TOKEN"  # noqa: S105 - a variable name, not a secret
ENV_INGEST_TOKEN_FILE = "VALMI_SIDECAR_INGEST_TOKEN_FILE"  # noqa: S105 - a variable name
ENV_PREFIX = "VALMI_SIDECAR_"
#: The file in the data directory where a running sidecar records where it listens, so
#: that an operator command given only the directory asks that sidecar and no other.
ADDRESS_NAME = "listening.json"

#: The fields that hold secrets, with the environment variables that set them directly
#: and through a file. The TOML file and the command line may only name the file.
SECRET_FIELDS: Mapping[str, tuple[str, str]] = {
    "api_key": (ENV_API_KEY, ENV_API_KEY_FILE),
    "ingest_token": (ENV_INGEST_TOKEN, ENV_INGEST_TOKEN_FILE),
}

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message says which and what is allowed."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that never shows itself in a repr, a log line or an error.

    ``path`` is the file it was read from, if any: a reload (SIGHUP) or a paused
    forwarder reads the file again to pick up a rotated value.
    """

    _value: str = field(repr=False)
    path: Path | None = field(default=None, compare=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` (systemd) if set, else ``$XDG_STATE_HOME/valmi-sidecar``
    (``$XDG_STATE_HOME`` defaulting to ``~/.local/state``). Reads ``env``, else ``os.environ``."""
    if env is None:
        env = os.environ
    state = env.get("STATE_DIRECTORY")
    if state:
        # systemd may pass several directories separated by ':'; the first is ours.
        return Path(state.split(":")[0])
    xdg = env.get("XDG_STATE_HOME")
    # The XDG spec says relative paths are invalid and must be ignored.
    if not xdg or not Path(xdg).is_absolute():
        xdg = str(_home(env) / ".local" / "state")
    return Path(xdg) / "valmi-sidecar"


def _about(help_text: str, *, metavar: str | None = None) -> dict[str, str]:
    """A setting's description (the flag's help says its default and variable besides)
    and, when its type does not say it, the name of its value in the help."""
    return {"help": help_text} if metavar is None else {"help": help_text, "metavar": metavar}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the sidecar can be told. Units are in the names.

    Build it with ``load_settings``, which checks every value; the constructor itself does
    not validate, so tests can make settings (port 0, a tmp data_dir) directly.
    """

    listen: str = field(
        default="127.0.0.1:8787",
        metadata=_about(
            "address for the local HTTP API, HOST:PORT; anything but loopback needs an ingest token",
            metavar="HOST:PORT",
        ),
    )
    #: HOST:PORT of the ops listener (``/metrics``, ``/healthz``, ``/readyz`` only); empty: off.
    ops_listen: str = field(
        default="",
        metadata=_about(
            "address of the ops listener, HOST:PORT: GET /metrics, /healthz and /readyz only (no events, status or operator routes), for probes and scraping; any address, no ingest token needed",
            metavar="HOST:PORT",
        ),
    )
    data_dir: Path = field(
        default_factory=default_data_dir,
        metadata=_about("directory for the SQLite queue (created 0700)"),
    )
    api_url: str = field(
        default="https://api.valmi.io",
        metadata=_about(f"base URL of the Valmi API (also read from {ENV_API_URL})", metavar="URL"),
    )
    api_key: Secret | None = None
    ingest_token: Secret | None = None
    allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata=_about(
            "web page origins (scheme://host[:port], comma-separated) allowed to call the sidecar from a browser; by default every request with an Origin header is refused (403)",
            metavar="ORIGIN[,ORIGIN...]",
        ),
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata=_about(
            "extra names accepted in the Host header besides localhost, 127.0.0.1, [::1] and the listen host (comma-separated; others get 403); with an ingest token the Host check is off unless this is set",
            metavar="HOST[,HOST...]",
        ),
    )
    durability: Literal["full", "normal"] = field(
        default="full",
        metadata=_about(
            "SQLite synchronous mode: 'full' survives power loss, 'normal' only process crashes"
        ),
    )
    max_queue_bytes: int = field(
        default=1 * GiB,
        metadata=_about(
            "disk budget in bytes: every file in the data directory (events, keys, dead letters, WAL); when reached, new events get 503 with Retry-After"
        ),
    )
    max_queue_events: int = field(
        default=5_000_000,
        metadata=_about(
            "queue size limit in events; when reached, new events get 503 with Retry-After"
        ),
    )
    max_body_bytes: int = field(
        default=1024 * 1024, metadata=_about("largest request body accepted, in bytes (413 beyond)")
    )
    #: ``None``: the budget of the API key's kind (``rate_limit_per_min_effective``).
    rate_limit_per_min: int | None = field(
        default=None,
        metadata=_about(
            "upstream requests per minute; set it only when the key's budget differs from Valmi's documented one"
        ),
    )
    max_event_age_s: float = field(
        default=30 * 24 * 3600.0,
        metadata=_about(
            "seconds an event may wait in the queue before it is dead-lettered (once tried, never while paused)"
        ),
    )
    dedup_window_s: float = field(
        default=24 * 3600.0,
        metadata=_about("seconds an Idempotency-Key is remembered for client retries"),
    )
    backoff_base_s: float = field(
        default=0.5,
        metadata=_about(
            "first retry delay in seconds after an upstream failure (exponential, full jitter)"
        ),
    )
    backoff_cap_s: float = field(default=300.0, metadata=_about("longest retry delay in seconds"))
    pause_after_refusals: int = field(
        default=5,
        metadata=_about(
            "different events refused in a row with the same status (400, 413, 422), nothing delivered between, that pause forwarding as a configuration problem instead of dead-lettering them"
        ),
    )
    upstream_timeout_s: float = field(
        default=10.0, metadata=_about("timeout of one upstream request, in seconds")
    )
    upstream_concurrency: int = field(
        default=16, metadata=_about("upstream requests in flight at once")
    )
    proxy_from_env: bool = field(
        default=True,
        metadata=_about(
            "reach the Valmi API through the proxy named by HTTPS_PROXY (HTTP_PROXY for an http:// API_URL), except for hosts in NO_PROXY"
        ),
    )
    flush_batch_size: int = field(
        default=256, metadata=_about("events leased from the queue per flusher round")
    )
    final_flush_s: float = field(
        default=10.0, metadata=_about("seconds to keep forwarding after SIGTERM before exiting")
    )
    shutdown_grace_s: float = field(
        default=5.0, metadata=_about("seconds to let in-flight ingest requests finish on shutdown")
    )
    client_timeout_s: float = field(
        default=30.0,
        metadata=_about(
            "seconds a client has to send its headers and body (or to stay idle between requests) before its connection is closed"
        ),
    )
    ingest_processes: int = field(
        default=1,
        metadata=_about(
            "processes that serve the local API: 1 is the sidecar alone; N > 1 starts N worker processes for HTTP and validation, the main one keeps the queue and forwarding"
        ),
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata=_about("lowest level logged")
    )
    log_format: Literal["auto", "json", "console"] = field(
        default="auto",
        metadata=_about(
            "log lines: 'json' (one object per line), 'console', or 'auto' (console on a terminal)"
        ),
    )
    access_log: bool = field(
        default=False, metadata=_about("log every HTTP request to the local API")
    )

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def rate_limit_per_min_effective(self) -> int:
        """Upstream requests a minute: ``rate_limit_per_min`` when set, else the budget
        Valmi documents for the API key's kind (1,000 for ``sk_api_…``, else 10,000)."""
        if self.rate_limit_per_min is not None:
            return self.rate_limit_per_min
        return key_rate_limit_per_min(self.api_key)

    @property
    def rate_limit_source(self) -> Literal["setting", "api_key_kind"]:
        """Where ``rate_limit_per_min_effective`` comes from."""
        return "api_key_kind" if self.rate_limit_per_min is None else "setting"

    def secrets(self) -> list[str]:
        """The secret values, for the log redactor; never print them."""
        return [s.reveal() for s in (self.api_key, self.ingest_token) if s is not None]


def key_rate_limit_per_min(api_key: Secret | None) -> int:
    """The request budget a minute that Valmi documents for the kind of ``api_key``: 1,000
    for an ``sk_api_…`` key, 10,000 for SDK keys (``sk_live_…``, ``sk_test_…``) and any
    other (and without a key, when nothing is sent anyway)."""
    if api_key is not None and api_key.reveal().startswith(API_KEY_PREFIX):
        return API_KEY_RATE_LIMIT_PER_MIN
    return SDK_KEY_RATE_LIMIT_PER_MIN


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


def url_without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` shown as ``[credentials]@``, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return parts._replace(netloc="[credentials]@" + parts.netloc.rpartition("@")[2]).geturl()


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


_NOT_HOST_PORT = "is not HOST:PORT; use for example 127.0.0.1:8787 or [::1]:8787"


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8787"`` or ``"[::1]:8787"`` to ``(host, port)``; ``ConfigError`` if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen: {listen!r} {_NOT_HOST_PORT}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1; False for anything else (0.0.0.0 too)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_var(name: str) -> str:
    """The environment variable for a non-secret field: ``VALMI_SIDECAR_<FIELD>``."""
    return ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    """The command-line flag for a field: ``--max-queue-bytes``."""
    return "--" + name.replace("_", "-")


# --- value parsing -------------------------------------------------------------------------

_HINTS = typing.get_type_hints(Settings)
_FIELDS = {f.name: f for f in fields(Settings)}
#: Fields that the TOML file, the environment (as VALMI_SIDECAR_<FIELD>) and flags may set.
PLAIN_FIELDS: tuple[str, ...] = tuple(n for n in _FIELDS if n not in SECRET_FIELDS)
#: Keys that name a file holding a secret; allowed in the TOML file and as flags.
SECRET_FILE_KEYS: Mapping[str, str] = {f"{n}_file": n for n in SECRET_FIELDS}


def field_default(name: str) -> object:
    """The dataclass default of a field (``default_data_dir()`` for data_dir)."""
    f = _FIELDS[name]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise KeyError(name)  # pragma: no cover - every field has a default


def field_help(name: str) -> str:
    """What a non-secret setting does (its flag's help adds the default and the variable)."""
    return str(_FIELDS[name].metadata["help"])


def field_metavar(name: str) -> str | None:
    """The name of a setting's value in the help, when its type does not say it."""
    value = _FIELDS[name].metadata.get("metavar")
    return None if value is None else str(value)


def field_choices(name: str) -> tuple[str, ...] | None:
    """The allowed values of a Literal field, else None."""
    hint = _HINTS[name]
    if typing.get_origin(hint) is Literal:
        return tuple(str(a) for a in typing.get_args(hint))
    return None


def field_kind(name: str) -> type:
    """The plain type of a non-secret field: str, int, float, bool, Path or tuple (of
    strings; Literals are str; ``int | None``, a field whose default is worked out, is
    int)."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return str
    if typing.get_origin(hint) is tuple:
        return tuple
    if isinstance(hint, type):
        return hint
    raise TypeError(f"unsupported field type for {name}: {hint!r}")  # pragma: no cover


def _parse_int(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        return int(raw.strip(), 10)
    raise TypeError


def _parse_float(raw: object) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str):
        value = float(raw.strip())
    else:
        raise TypeError
    if not math.isfinite(value):
        raise ValueError
    return value


def _parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if not isinstance(raw, str):
        raise TypeError
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError


def _parse_text(raw: object) -> str:
    if not isinstance(raw, str):
        raise TypeError
    return raw.strip()


def _parse_names(raw: object, normalize: Callable[[str], str]) -> tuple[str, ...]:
    """A list of names: a TOML array of strings, or text separated by commas (environment,
    flags); each entry checked and normalized, empty entries refused."""
    if isinstance(raw, str):
        items: list[object] = list(raw.split(",")) if raw.strip() else []
    elif isinstance(raw, list | tuple):
        items = list(raw)
    else:
        raise TypeError
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError("an entry is empty or not text")
        try:
            value = normalize(item)
        except ValueError as e:
            raise ValueError(f"{item.strip()!r} {e}") from None
        if value not in out:
            out.append(value)
    return tuple(out)


_NAME_CHECKS: Mapping[str, Callable[[str], str]] = {
    "allowed_origins": normalize_origin,
    "allowed_hosts": normalize_host,
}


def _parse_choice(raw: object, choices: tuple[str, ...]) -> str:
    text = _parse_text(raw).lower()
    if text not in choices:
        raise ValueError
    return text


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def _expand_path(text: str, env: Mapping[str, str], base: Path | None) -> Path:
    """``~`` and ``~/x`` from ``env``'s HOME; a relative path is taken from ``base`` if given."""
    if text == "~" or text.startswith("~/"):
        path = _home(env) / text[2:]
    else:
        path = Path(text).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return path


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


def _check_api_url(text: str) -> str:
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


def _parse_path(raw: object, env: Mapping[str, str], base: Path | None) -> Path:
    text = str(raw) if isinstance(raw, Path) else _parse_text(raw)
    if not text:
        raise ValueError
    return _expand_path(text, env, base)


def _parse(
    name: str, raw: object, where: str, env: Mapping[str, str], base: Path | None = None
) -> object:
    """One value for field ``name`` from a string (environment, flags) or a TOML value.

    ``where`` names the key and its source for the error message; ``base`` is the
    directory that relative paths in a config file are taken from.
    """
    kind = field_kind(name)
    choices = field_choices(name)
    value: object
    try:
        if choices is not None:
            value = _parse_choice(raw, choices)
        elif kind is bool:
            value = _parse_bool(raw)
        elif kind is tuple:
            value = _parse_names(raw, _NAME_CHECKS[name])
        elif kind is Path:
            value = _parse_path(raw, env, base)
        elif kind is int:
            value = _parse_int(raw)
        elif kind is float:
            value = _parse_float(raw)
        else:
            value = _parse_text(raw)
    except (ValueError, TypeError) as e:
        detail = f" ({e})" if kind is tuple and str(e) else ""
        raise ConfigError(f"{where}: {raw!r} {_expected(name)}{detail}") from None
    if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
        raise ConfigError(f"{where}: {raw!r} must be greater than 0")
    if name == "listen" or (name == "ops_listen" and value):
        try:
            split_listen(str(value))
        except ConfigError:
            raise ConfigError(f"{where}: {raw!r} {_NOT_HOST_PORT}") from None
    elif name == "api_url":
        try:
            value = _check_api_url(str(value))
        except ValueError as e:
            raise ConfigError(
                f"{where}: {raw!r} {e}; use for example https://api.valmi.io"
            ) from None
    return value


def _expected(name: str) -> str:
    default = DEFAULT_TEXT.get(name) or _format_default(field_default(name))
    kind = field_kind(name)
    choices = field_choices(name)
    if choices is not None:
        return f"is not allowed; use one of: {', '.join(choices)}"
    if kind is bool:
        return "is not a boolean; use true/false, 1/0 or yes/no"
    if kind is int:
        return f"is not a whole number; use a whole number greater than 0 (default {default})"
    if kind is float:
        return f"is not a number; use a number of seconds greater than 0 (default {default})"
    if name in ("listen", "ops_listen"):
        return _NOT_HOST_PORT
    if name == "api_url":
        return "is not a URL; use for example https://api.valmi.io"
    if name == "allowed_origins":
        return "is not a list of origins; use for example http://localhost:3000,https://app.example"
    if name == "allowed_hosts":
        return "is not a list of host names; use for example valmi-sidecar,sidecar.internal"
    if kind is Path:
        return "is not a directory path; use for example /var/lib/valmi-sidecar"
    return "is not text"


# --- layers --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Layered:
    """Values collected so far, each with where it came from (for later error messages)."""

    values: dict[str, object] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    # For each secret field: (source, reader) where the reader yields the secret.
    secrets: dict[str, tuple[str, Callable[[], Secret]]] = field(default_factory=dict)

    def set(self, name: str, value: object, where: str) -> None:
        self.values[name] = value
        self.where[name] = where


def _unknown(key: str, known: list[str], where: str, hint: str = "") -> ConfigError:
    close = [] if hint else difflib.get_close_matches(key, known, n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"{where}: unknown key {key!r}{suggestion}{hint}; known keys: {', '.join(known)}"
    )


def _read_secret_file(path: Path, where: str) -> str:
    """The stripped content of a secret file; errors name the path, never the content."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {str(path)!r} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(
            f"{where}: cannot read {str(path)!r}: {e.strerror or type(e).__name__}"
        ) from None
    if not text:
        raise ConfigError(f"{where}: {str(path)!r} is empty; put the secret in it")
    return text


def read_secret_file(path: Path) -> str:
    """The secret in ``path`` again (a rotated key); ``ConfigError`` naming the path, never
    the content, if it cannot be read or is empty. Blocking: call it off the event loop."""
    return _read_secret_file(path, "secret file")


def _from_file_reader(path: Path, where: str) -> Callable[[], Secret]:
    return lambda: Secret(_read_secret_file(path, where), path)


def _constant(text: str) -> Callable[[], Secret]:
    return lambda: Secret(text)


#: How to describe a default that is worked out at start rather than fixed.
DEFAULT_TEXT: Mapping[str, str] = {
    "rate_limit_per_min": f"by the API key's kind: {API_KEY_RATE_LIMIT_PER_MIN} for "
    f"{API_KEY_PREFIX}… keys, {SDK_KEY_RATE_LIMIT_PER_MIN} for others",
}


def _format_default(value: object) -> str:
    """A default as a person would write it: 2592000 rather than 2592000.0."""
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _load_toml(path: Path, env: Mapping[str, str], into: _Layered) -> None:
    where = f"config file {path}"
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(
            f"{where}: cannot read it: {e.strerror or type(e).__name__}; "
            f"check --config / {ENV_CONFIG}"
        ) from None
    base = path.parent
    known = [*PLAIN_FIELDS, *SECRET_FILE_KEYS]
    for key, raw in data.items():
        if key in SECRET_FIELDS:
            direct, via_file = SECRET_FIELDS[key]
            raise ConfigError(
                f"{where}: {key!r} is a secret and is not allowed in the config file; "
                f"use {direct} / {via_file} in the environment, or {key}_file = PATH here"
            )
        if key in SECRET_FILE_KEYS:
            item = f"{where}: {key}"
            if not isinstance(raw, str) or not raw.strip():
                raise ConfigError(f"{item}: {raw!r} is not a path; use a file name string")
            secret_path = _expand_path(raw.strip(), env, base)
            into.secrets[SECRET_FILE_KEYS[key]] = (item, _from_file_reader(secret_path, item))
            continue
        if key not in _FIELDS:
            raise _unknown(key, known, where)
        into.set(key, _parse(key, raw, f"{where}: {key}", env, base), where)


def _load_env(env: Mapping[str, str], into: _Layered) -> None:
    by_var = {env_var(n): n for n in PLAIN_FIELDS}
    extra = {ENV_CONFIG, ENV_INGEST_TOKEN, ENV_INGEST_TOKEN_FILE}
    known = sorted([*by_var, *extra])
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in extra:
            continue
        if var not in by_var:
            hint = ""
            if var in (ENV_PREFIX + "API_KEY", ENV_PREFIX + "API_KEY_FILE"):
                hint = f" (the API key is read from {ENV_API_KEY} or {ENV_API_KEY_FILE})"
            raise _unknown(var, known, "environment", hint)
    # The generic VALMI_API_URL first, so the sidecar-specific one wins when both are set.
    if env.get(ENV_API_URL):
        into.set("api_url", _parse("api_url", env[ENV_API_URL], ENV_API_URL, env), ENV_API_URL)
    for var, name in by_var.items():
        if env.get(var):
            into.set(name, _parse(name, env[var], var, env), var)
    for name, (direct, via_file) in SECRET_FIELDS.items():
        value, path = env.get(direct), env.get(via_file)
        if value and path:
            raise ConfigError(
                f"environment: both {direct} and {via_file} are set; set only one of them"
            )
        if value:
            into.secrets[name] = (direct, _constant(value.strip()))
        elif path:
            into.secrets[name] = (
                via_file,
                _from_file_reader(_expand_path(path.strip(), env, None), via_file),
            )


def _load_overrides(
    overrides: Mapping[str, object], env: Mapping[str, str], into: _Layered
) -> None:
    known = [*PLAIN_FIELDS, *SECRET_FILE_KEYS]
    for key, raw in overrides.items():
        if raw is None:
            continue  # not given on the command line
        where = flag(key)
        if key in SECRET_FIELDS:
            direct, via_file = SECRET_FIELDS[key]
            raise ConfigError(
                f"command line: {key!r} cannot be given as a flag (it would show in the "
                f"process list); use {direct} or {via_file} in the environment"
            )
        if key in SECRET_FILE_KEYS:
            path = _expand_path(str(raw).strip(), env, None)
            into.secrets[SECRET_FILE_KEYS[key]] = (where, _from_file_reader(path, where))
            continue
        if key not in _FIELDS:
            raise _unknown(key, known, "command line")
        into.set(key, _parse(key, raw, where, env), where)


def load_settings(
    *,
    argv_overrides: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build checked ``Settings`` from defaults < TOML file < environment < ``argv_overrides``.

    ``env`` defaults to ``os.environ``. The file is ``config_file``, else ``$VALMI_SIDECAR_CONFIG``,
    else none. ``argv_overrides`` maps field names (and ``api_key_file`` /
    ``ingest_token_file``) to values, strings or already typed; ``None`` means not given.
    An empty environment variable counts as unset. Every problem raises ``ConfigError``.
    """
    if env is None:
        env = os.environ
    layers = _Layered()
    if config_file is None and env.get(ENV_CONFIG):
        config_file = _expand_path(env[ENV_CONFIG].strip(), env, None)
    if config_file is not None:
        _load_toml(config_file, env, layers)
    _load_env(env, layers)
    if argv_overrides:
        _load_overrides(argv_overrides, env, layers)

    secrets: dict[str, Any] = {name: read() for name, (_, read) in layers.secrets.items()}
    values: dict[str, Any] = dict(layers.values)
    if "data_dir" not in values:
        values["data_dir"] = default_data_dir(env)
    settings = Settings(**values, **secrets)
    _check_together(settings, layers)
    return settings


def _check_together(settings: Settings, layers: _Layered) -> None:
    """Rules that involve more than one setting."""

    def src(name: str) -> str:
        return layers.where.get(name, "default")

    if settings.backoff_base_s > settings.backoff_cap_s:
        raise ConfigError(
            f"backoff_base_s ({src('backoff_base_s')}) is {settings.backoff_base_s:g} but "
            f"backoff_cap_s ({src('backoff_cap_s')}) is {settings.backoff_cap_s:g}; "
            "the base must not exceed the cap"
        )
    if settings.pause_after_refusals < MIN_PAUSE_AFTER_REFUSALS:
        raise ConfigError(
            f"pause_after_refusals ({src('pause_after_refusals')}): "
            f"{settings.pause_after_refusals} would pause at every refused event and never "
            f"dead-letter one; use {MIN_PAUSE_AFTER_REFUSALS} or more (default "
            f"{field_default('pause_after_refusals')})"
        )
    if settings.ingest_processes > MAX_INGEST_PROCESSES:
        raise ConfigError(
            f"ingest_processes ({src('ingest_processes')}): {settings.ingest_processes} is more "
            f"than {MAX_INGEST_PROCESSES}; use 1 (one process) or about one per CPU core"
        )
    least = minimum_queue_bytes(settings.max_body_bytes)
    if settings.max_queue_bytes < least:
        raise ConfigError(
            f"max_queue_bytes ({src('max_queue_bytes')}): {settings.max_queue_bytes} bytes "
            f"cannot hold the database, its WAL and the room forwarding needs with "
            f"max_body_bytes={settings.max_body_bytes} ({src('max_body_bytes')}); use at "
            f"least {least} bytes, or a smaller max_body_bytes"
        )
    if settings.ops_listen:
        ops_host, ops_port = split_listen(settings.ops_listen)
        wildcards = {"0.0.0.0", "::"}  # noqa: S104 - they overlap every address
        overlap = ops_host == settings.host or bool({ops_host, settings.host} & wildcards)
        if ops_port != 0 and ops_port == settings.port and overlap:
            raise ConfigError(
                f"ops_listen ({src('ops_listen')}): {settings.ops_listen!r} is the same port "
                f"as listen ({settings.listen!r}); give the ops listener a port of its own, "
                "for example 0.0.0.0:9787"
            )
    # The ops listener needs no ingest token on any address: it serves no billing data.
    host = settings.host
    if not is_loopback(host) and settings.ingest_token is None:
        raise ConfigError(
            f"listen ({src('listen')}): {settings.listen!r} is not a loopback address and no "
            f"ingest token is set; set {ENV_INGEST_TOKEN} or {ENV_INGEST_TOKEN_FILE}, "
            "or listen on 127.0.0.1"
        )


__all__ = [
    "API_KEY_PREFIX",
    "API_KEY_RATE_LIMIT_PER_MIN",
    "DEFAULT_TEXT",
    "ENV_API_KEY",
    "ENV_API_KEY_FILE",
    "ENV_API_URL",
    "ENV_CONFIG",
    "ENV_INGEST_TOKEN",
    "ENV_INGEST_TOKEN_FILE",
    "MAX_INGEST_PROCESSES",
    "MIN_PAUSE_AFTER_REFUSALS",
    "PLAIN_FIELDS",
    "SDK_KEY_RATE_LIMIT_PER_MIN",
    "SECRET_FIELDS",
    "SECRET_FILE_KEYS",
    "ConfigError",
    "Secret",
    "Settings",
    "default_data_dir",
    "env_proxy",
    "env_var",
    "field_choices",
    "field_default",
    "field_help",
    "field_kind",
    "field_metavar",
    "flag",
    "is_loopback",
    "key_rate_limit_per_min",
    "load_settings",
    "read_secret_file",
    "split_listen",
    "url_without_credentials",
]
