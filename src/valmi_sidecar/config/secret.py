"""Secrets: a value that never shows itself, and the files they are read from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


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


def secret_from_file(path: Path, where: str) -> Callable[[], Secret]:
    return lambda: Secret(_read_secret_file(path, where), path)


def constant_secret(text: str) -> Callable[[], Secret]:
    return lambda: Secret(text)
