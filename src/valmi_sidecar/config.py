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
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .disk import minimum_queue_bytes

GiB = 1024**3
#: The most processes that may serve the local API (``ingest_processes``).
MAX_INGEST_PROCESSES = 32

#: Environment variables that are not ``VALMI_SIDECAR_<FIELD>``.
ENV_CONFIG = "VALMI_SIDECAR_CONFIG"
ENV_API_URL = "VALMI_API_URL"
ENV_API_KEY = "VALMI_API_KEY"
ENV_API_KEY_FILE = "VALMI_API_KEY_FILE"
ENV_INGEST_TOKEN = "VALMI_SIDECAR_INGEST_TOKEN"  # noqa: S105 - a variable name, not a secret
ENV_INGEST_TOKEN_FILE = "VALMI_SIDECAR_INGEST_TOKEN_FILE"  # noqa: S105 - a variable name
ENV_PREFIX = "VALMI_SIDECAR_"

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
    """A string that never shows itself in a repr, a log line or an error."""

    _value: str = field(repr=False)

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


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the sidecar can be told. Units are in the names.

    Build it with ``load_settings``, which checks every value; the constructor itself does
    not validate, so tests can make settings (port 0, a tmp data_dir) directly.
    """

    listen: str = "127.0.0.1:8787"
    data_dir: Path = field(default_factory=default_data_dir)
    api_url: str = "https://api.valmi.io"
    api_key: Secret | None = None
    ingest_token: Secret | None = None
    durability: Literal["full", "normal"] = "full"
    max_queue_bytes: int = 1 * GiB
    max_queue_events: int = 5_000_000
    max_body_bytes: int = 1024 * 1024
    rate_limit_per_min: int = 10_000
    max_event_age_s: float = 30 * 24 * 3600.0
    dedup_window_s: float = 24 * 3600.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 300.0
    upstream_timeout_s: float = 10.0
    upstream_concurrency: int = 16
    flush_batch_size: int = 256
    final_flush_s: float = 10.0
    shutdown_grace_s: float = 5.0
    client_timeout_s: float = 30.0
    ingest_processes: int = 1
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    access_log: bool = False

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    def secrets(self) -> list[str]:
        """The secret values, for the log redactor; never print them."""
        return [s.reveal() for s in (self.api_key, self.ingest_token) if s is not None]


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


def field_choices(name: str) -> tuple[str, ...] | None:
    """The allowed values of a Literal field, else None."""
    hint = _HINTS[name]
    if typing.get_origin(hint) is Literal:
        return tuple(str(a) for a in typing.get_args(hint))
    return None


def field_kind(name: str) -> type:
    """The plain type of a non-secret field: str, int, float, bool or Path (Literals are str)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) is Literal:
        return str
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


def _check_api_url(text: str) -> str:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an http:// or https:// URL")
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
        elif kind is Path:
            value = _parse_path(raw, env, base)
        elif kind is int:
            value = _parse_int(raw)
        elif kind is float:
            value = _parse_float(raw)
        else:
            value = _parse_text(raw)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: {raw!r} {_expected(name)}") from None
    if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
        raise ConfigError(f"{where}: {raw!r} must be greater than 0")
    if name == "listen":
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
    default = _format_default(field_default(name))
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
    if name == "listen":
        return _NOT_HOST_PORT
    if name == "api_url":
        return "is not a URL; use for example https://api.valmi.io"
    if kind is Path:
        return "is not a directory path; use for example /var/lib/valmi-sidecar"
    return "is not text"


# --- layers --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Layered:
    """Values collected so far, each with where it came from (for later error messages)."""

    values: dict[str, object] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    # For each secret field: (source, reader) where the reader yields the secret text.
    secrets: dict[str, tuple[str, Callable[[], str]]] = field(default_factory=dict)

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


def _from_file_reader(path: Path, where: str) -> Callable[[], str]:
    return lambda: _read_secret_file(path, where)


def _constant(text: str) -> Callable[[], str]:
    return lambda: text


def _format_default(value: object) -> str:
    """A default as a person would write it: 2592000 rather than 2592000.0."""
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

    secrets: dict[str, Any] = {name: Secret(read()) for name, (_, read) in layers.secrets.items()}
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
    host = settings.host
    if not is_loopback(host) and settings.ingest_token is None:
        raise ConfigError(
            f"listen ({src('listen')}): {settings.listen!r} is not a loopback address and no "
            f"ingest token is set; set {ENV_INGEST_TOKEN} or {ENV_INGEST_TOKEN_FILE}, "
            "or listen on 127.0.0.1"
        )


__all__ = [
    "ENV_API_KEY",
    "ENV_API_KEY_FILE",
    "ENV_API_URL",
    "ENV_CONFIG",
    "ENV_INGEST_TOKEN",
    "ENV_INGEST_TOKEN_FILE",
    "MAX_INGEST_PROCESSES",
    "PLAIN_FIELDS",
    "SECRET_FIELDS",
    "SECRET_FILE_KEYS",
    "ConfigError",
    "Secret",
    "Settings",
    "default_data_dir",
    "env_var",
    "field_choices",
    "field_default",
    "field_kind",
    "flag",
    "is_loopback",
    "load_settings",
    "split_listen",
]
