"""Checking values: one value from a TOML file, the environment or a flag, and the
rules that involve several settings. Each error names the key, where it came from, and
what is allowed."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from ..disk import minimum_queue_bytes
from ..guard import normalize_host, normalize_origin
from .addresses import NOT_HOST_PORT, check_api_url, is_loopback, split_listen
from .errors import ConfigError
from .names import ENV_INGEST_TOKEN, ENV_INGEST_TOKEN_FILE
from .paths import expand_path
from .settings import (
    DEFAULT_TEXT,
    Settings,
    field_choices,
    field_default,
    field_kind,
    format_default,
)

#: The most processes that may serve the local API (``ingest_processes``).
MAX_INGEST_PROCESSES = 32
#: ``pause_after_refusals`` below this could never tell one bad event from a bad setting.
MIN_PAUSE_AFTER_REFUSALS = 2

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


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


def _parse_path(raw: object, env: Mapping[str, str], base: Path | None) -> Path:
    text = str(raw) if isinstance(raw, Path) else _parse_text(raw)
    if not text:
        raise ValueError
    return expand_path(text, env, base)


def parse_value(
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
            raise ConfigError(f"{where}: {raw!r} {NOT_HOST_PORT}") from None
    elif name == "api_url":
        try:
            value = check_api_url(str(value))
        except ValueError as e:
            raise ConfigError(
                f"{where}: {raw!r} {e}; use for example https://api.valmi.io"
            ) from None
    return value


def _expected(name: str) -> str:
    default = DEFAULT_TEXT.get(name) or format_default(field_default(name))
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
        return NOT_HOST_PORT
    if name == "api_url":
        return "is not a URL; use for example https://api.valmi.io"
    if name == "allowed_origins":
        return "is not a list of origins; use for example http://localhost:3000,https://app.example"
    if name == "allowed_hosts":
        return "is not a list of host names; use for example valmi-sidecar,sidecar.internal"
    if kind is Path:
        return "is not a directory path; use for example /var/lib/valmi-sidecar"
    return "is not text"


#: Listen hosts that take every local address (and so overlap any other).
_WILDCARDS: Final = frozenset({"0.0.0.0", "::"})  # noqa: S104 - they take every local address


def check_together(settings: Settings, where: Mapping[str, str]) -> None:
    """Rules that involve more than one setting; ``where`` names the source of each value
    that did not come from the defaults."""

    def src(name: str) -> str:
        return where.get(name, "default")

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
        overlap = ops_host == settings.host or bool({ops_host, settings.host} & _WILDCARDS)
        if ops_port != 0 and ops_port == settings.port and overlap:
            raise ConfigError(
                f"ops_listen ({src('ops_listen')}): {settings.ops_listen!r} is the same port "
                f"as listen ({settings.listen!r}); give the ops listener a port of its own, "
                "for example 0.0.0.0:9787"
            )
    _check_not_self(settings, src("api_url"))
    # The ops listener needs no ingest token on any address: it serves no billing data.
    host = settings.host
    if not is_loopback(host) and settings.ingest_token is None:
        raise ConfigError(
            f"listen ({src('listen')}): {settings.listen!r} is not a loopback address and no "
            f"ingest token is set; set {ENV_INGEST_TOKEN} or {ENV_INGEST_TOKEN_FILE}, "
            "or listen on 127.0.0.1"
        )


def _check_not_self(settings: Settings, source: str) -> None:
    """An ``api_url`` that is this sidecar's own listen address: it would forward every
    event to itself, where the answer is a ``202``, and count it delivered."""
    api = urlsplit(settings.api_url)
    api_host = (api.hostname or "").lower()
    api_port = api.port or (443 if api.scheme == "https" else 80)
    host = settings.host.lower()
    same_host = api_host == host or (
        is_loopback(api_host) and (is_loopback(host) or host in _WILDCARDS)
    )
    if settings.port != 0 and api_port == settings.port and same_host:
        raise ConfigError(
            f"api_url ({source}): {settings.api_url!r} is this sidecar's own listen address "
            f"({settings.listen!r}): every event would be forwarded to the sidecar itself, "
            "counted as delivered and never reach Valmi; use Valmi's URL, for example "
            "https://api.valmi.io"
        )
