"""Settings: one frozen object, built from defaults < TOML file < environment < CLI flags.

Unknown keys and bad values stop start-up with a ``ConfigError`` that names the key and
says what is allowed. Secrets (the API key, the ingest token) are wrapped in ``Secret``
so that no repr, log line or status page can show them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

GiB = 1024**3


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


def default_data_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd) if set, else ``$XDG_STATE_HOME/valmi-sidecar``."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd may pass several directories separated by ':'; the first is ours.
        return Path(state.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "valmi-sidecar"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the sidecar can be told. Units are in the names."""

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
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    access_log: bool = False

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8787"`` or ``"[::1]:8787"`` to ``(host, port)``; ``ConfigError`` if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"listen: {listen!r} is not HOST:PORT; use for example 127.0.0.1:8787 or [::1]:8787"
        )
    return host.strip("[]"), int(port)
