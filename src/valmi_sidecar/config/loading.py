"""Loading: the layers defaults < TOML file < environment < flags, merged into one
checked ``Settings``."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .names import (
    ENV_API_KEY,
    ENV_API_KEY_FILE,
    ENV_API_URL,
    ENV_CONFIG,
    ENV_INGEST_TOKEN,
    ENV_INGEST_TOKEN_FILE,
    ENV_PREFIX,
    SECRET_FIELDS,
    env_var,
    flag,
)
from .paths import default_data_dir, expand_path
from .secret import Secret, constant_secret, secret_from_file
from .settings import FIELDS, PLAIN_FIELDS, SECRET_FILE_KEYS, Settings
from .validation import check_together, parse_value


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
            secret_path = expand_path(raw.strip(), env, base)
            into.secrets[SECRET_FILE_KEYS[key]] = (item, secret_from_file(secret_path, item))
            continue
        if key not in FIELDS:
            raise _unknown(key, known, where)
        into.set(key, parse_value(key, raw, f"{where}: {key}", env, base), where)


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
        into.set("api_url", parse_value("api_url", env[ENV_API_URL], ENV_API_URL, env), ENV_API_URL)
    for var, name in by_var.items():
        if env.get(var):
            into.set(name, parse_value(name, env[var], var, env), var)
    for name, (direct, via_file) in SECRET_FIELDS.items():
        value, path = env.get(direct), env.get(via_file)
        if value and path:
            raise ConfigError(
                f"environment: both {direct} and {via_file} are set; set only one of them"
            )
        if value:
            into.secrets[name] = (direct, constant_secret(value.strip()))
        elif path:
            into.secrets[name] = (
                via_file,
                secret_from_file(expand_path(path.strip(), env, None), via_file),
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
            path = expand_path(str(raw).strip(), env, None)
            into.secrets[SECRET_FILE_KEYS[key]] = (where, secret_from_file(path, where))
            continue
        if key not in FIELDS:
            raise _unknown(key, known, "command line")
        into.set(key, parse_value(key, raw, where, env), where)


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
        config_file = expand_path(env[ENV_CONFIG].strip(), env, None)
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
    check_together(settings, layers.where)
    return settings
