"""A reload (SIGHUP): which settings change without a restart, applying them, and saying
what changed (never a secret) and what waits for a restart.

The API key goes to the upstream client, the ingest token to the receiver's holder, the
log level to the process; every other changed setting is kept as it is and named as
needing a restart. ``service.py`` reads the settings again and passes its parts here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import structlog

from .config import PLAIN_FIELDS, Secret, Settings
from .logs import redact_also, set_level
from .receiver import IngestToken
from .upstream import Upstream

log = structlog.get_logger("valmi_sidecar.service")

#: What a reload applies without a restart; every other change waits for one.
RELOADABLE: Final = ("api_key", "ingest_token", "log_level")


@dataclass
class Reloaded:
    """The settings in force after a reload, what it applied and what needs a restart."""

    settings: Settings
    applied: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)

    @property
    def for_workers(self) -> bool:
        """Whether ingest workers must hear of it (they check the token and log)."""
        return "ingest_token" in self.applied or "log_level" in self.applied


def needs_restart(old: Settings, new: Settings) -> list[str]:
    """The plain settings that changed and that only a restart applies."""
    return [n for n in PLAIN_FIELDS if n not in RELOADABLE and getattr(new, n) != getattr(old, n)]


def level(name: str) -> int:
    """The numeric value of a log level's name (``info`` is 20)."""
    return logging.getLevelNamesMapping()[name.upper()]


def apply_reload(
    old: Settings,
    new: Settings,
    *,
    upstream: Upstream | None,
    token: IngestToken | None,
    on_new_key: Callable[[], None],
) -> Reloaded:
    """Apply ``new``'s API key and ingest token where they can change while running
    (``on_new_key`` runs when the key in use changed); the log level is the caller's to
    set (``announce``). A key that cannot be used is logged and the old one kept."""
    done = Reloaded(old, restart=needs_restart(old, new))
    api_key = _apply_key(old.api_key, new.api_key, upstream, done, on_new_key)
    ingest_token = _apply_token(old.ingest_token, new.ingest_token, token, done)
    if new.log_level != old.log_level:
        done.applied.append("log_level")
    done.settings = dataclasses.replace(
        old, api_key=api_key, ingest_token=ingest_token, log_level=new.log_level
    )
    return done


def _apply_key(
    old: Secret | None,
    new: Secret | None,
    upstream: Upstream | None,
    done: Reloaded,
    on_new_key: Callable[[], None],
) -> Secret | None:
    # Adding or removing the key starts or ends forwarding: that needs a restart.
    if (new is None) != (old is None) or (new is not None and upstream is None):
        done.restart.append("api_key")
        return old
    if new is None or upstream is None:
        return old
    try:
        if upstream.set_key(new):
            done.applied.append("api_key")
            on_new_key()
    except ValueError as exc:
        log.error("reload_failed", error=str(exc), action="fix the API key file")
        return old
    return new


def _apply_token(
    old: Secret | None, new: Secret | None, holder: IngestToken | None, done: Reloaded
) -> Secret | None:
    # Adding or removing the token changes the Host policy: that needs a restart.
    if (new is None) != (old is None):
        done.restart.append("ingest_token")
        return old
    if holder is None or new is None:
        return old
    current = holder.secret
    if current is None or current.reveal() != new.reveal():
        redact_also(new.reveal())
        holder.secret = new
        done.applied.append("ingest_token")
    return new


def announce(done: Reloaded, old_level: str, *, owns_logging: bool) -> None:
    """Log what the reload changed and what needs a restart, and set the log level if
    this process's logging is ours. A more verbose level is set before the lines, a
    quieter one after, so that they are seen at either level."""
    new_level = done.settings.log_level
    more_verbose = level(new_level) < level(old_level)
    if owns_logging and more_verbose:
        set_level(new_level)
    log.info("settings_reloaded", changed=done.applied, log_level=new_level)
    if done.restart:
        log.warning(
            "reload_needs_restart",
            settings=done.restart,
            action="restart the sidecar to apply them; the values in force are kept",
        )
    if owns_logging and not more_verbose:
        set_level(new_level)
