"""The settings: each field with its default, its help text and its metavar, and what
the rest of the package reads from the fields (type, choices, default)."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Literal

from .addresses import split_listen
from .names import ENV_API_URL, SECRET_FIELDS
from .paths import default_data_dir
from .secret import Secret

GiB = 1024**3

#: Valmi's documented request budgets a minute: ``sk_api_…`` API keys get 1,000, SDK keys
#: (``sk_live_…``, ``sk_test_…``) 10,000. The default rate limit follows the key's kind.
API_KEY_PREFIX = "sk_api_"
API_KEY_RATE_LIMIT_PER_MIN = 1_000
SDK_KEY_RATE_LIMIT_PER_MIN = 10_000


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


# --- what the loader, the validation and the CLI read from the fields ---------------------

_HINTS = typing.get_type_hints(Settings)
FIELDS = {f.name: f for f in fields(Settings)}
#: Fields that the TOML file, the environment (as VALMI_SIDECAR_<FIELD>) and flags may set.
PLAIN_FIELDS: tuple[str, ...] = tuple(n for n in FIELDS if n not in SECRET_FIELDS)
#: Keys that name a file holding a secret; allowed in the TOML file and as flags.
SECRET_FILE_KEYS: Mapping[str, str] = {f"{n}_file": n for n in SECRET_FIELDS}


def field_default(name: str) -> object:
    """The dataclass default of a field (``default_data_dir()`` for data_dir)."""
    f = FIELDS[name]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise KeyError(name)  # pragma: no cover - every field has a default


def field_help(name: str) -> str:
    """What a non-secret setting does (its flag's help adds the default and the variable)."""
    return str(FIELDS[name].metadata["help"])


def field_metavar(name: str) -> str | None:
    """The name of a setting's value in the help, when its type does not say it."""
    value = FIELDS[name].metadata.get("metavar")
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


#: How to describe a default that is worked out at start rather than fixed.
DEFAULT_TEXT: Mapping[str, str] = {
    "rate_limit_per_min": f"by the API key's kind: {API_KEY_RATE_LIMIT_PER_MIN} for "
    f"{API_KEY_PREFIX}… keys, {SDK_KEY_RATE_LIMIT_PER_MIN} for others",
}


def format_default(value: object) -> str:
    """A default as a person would write it: 2592000 rather than 2592000.0."""
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
