"""Where the data lives by default, and how a path in a setting is read."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


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


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def expand_path(text: str, env: Mapping[str, str], base: Path | None) -> Path:
    """``~`` and ``~/x`` from ``env``'s HOME; a relative path is taken from ``base`` if given."""
    if text == "~" or text.startswith("~/"):
        path = _home(env) / text[2:]
    else:
        path = Path(text).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return path
