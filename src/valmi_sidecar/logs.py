"""Logging: structlog to stderr, JSON lines in production, readable on a terminal.

Every line passes a redactor that replaces the API key and the ingest token with
``[redacted]``, both in each field and in the rendered line (defense in depth: the
secrets should never reach a logger in the first place). The stdlib ``logging`` records
of aiohttp and friends go through the same processors at the same level.

Under systemd, when stderr is the journal's stream, each line starts with its syslog
priority (``<4>`` for a warning), as sd-daemon(3) describes, so that ``journalctl -p
warning`` shows the sidecar's warnings and errors rather than every line at ``info``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"
#: The syslog priority of each level (sd-daemon(3): ``<N>`` before a line sets it).
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "json", "console")


class _Redactor:
    """Replace each secret in every string, however deep in dicts, lists and tuples."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Sequence[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({*self._secrets, *(s for s in secrets if s)}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def value(self, value: object) -> object:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.value(v) for v in value)
        if isinstance(value, BaseException):
            # Render it now, so that the message of an exception is redacted too.
            return self.text(repr(value))
        return value

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        if not self._secrets:
            return event_dict
        for key, val in event_dict.items():
            if key != "exc_info":
                event_dict[key] = self.value(val)
        return event_dict


class _RedactingRenderer:
    """Wrap the final renderer and redact its output (catches tracebacks it formats);
    with ``journal``, start every line with the syslog priority of its level."""

    def __init__(self, renderer: Processor, redactor: _Redactor, *, journal: bool) -> None:
        self._renderer = renderer
        self._redactor = redactor
        self._journal = journal

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> Any:
        out = self._renderer(logger, method, event_dict)
        if not isinstance(out, str):
            return out
        out = self._redactor.text(out)
        if self._journal:
            # Every line: the journal reads each one apart (a console traceback has many).
            prefix = f"<{PRIORITIES.get(method, 6)}>"
            out = "\n".join(prefix + line for line in out.split("\n"))
        return out


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is *now* (so pytest's capture and a
    reconfiguration never leave a logger holding a closed stream)."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        stream: TextIO = sys.stderr
        with self._lock:
            stream.write(message + "\n")
            stream.flush()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


def _stderr_logger_factory(*args: Any) -> _StderrLogger:
    return _StderrLogger()


class _StderrHandler(logging.Handler):
    """The stdlib side of the same: formats through structlog, writes to current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            _StderrLogger().msg(line)
        except Exception:  # noqa: BLE001 - logging's rule: a handler never raises
            self.handleError(record)


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """True when stderr is the stream systemd connected to the journal: ``JOURNAL_STREAM``
    holds its device and inode (systemd.exec(5)). A program started from a shell inside a
    service inherits the variable with another stderr, so the two are compared."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # not a real file descriptor (a test's capture, a closed stream)
    return value == f"{st.st_dev}:{st.st_ino}"


#: The redactor of the configuration in force, for secrets that arrive later (a rotated key).
_active: list[_Redactor] = []


def redact_also(*secrets: str) -> None:
    """Redact these values too from now on (a key read again after a rotation). A no-op
    until ``configure_logging`` has run."""
    for redactor in _active:
        redactor.add(secrets)


def debug_enabled() -> bool:
    """Whether debug lines are logged now (both ``configure_logging`` and ``set_level``
    set the root logger's level). A line on the hot path asks first: a call through
    structlog's lazy logger costs about 4 us even when its level filters it out."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def set_level(level: str) -> None:
    """Change the level of structlog and stdlib logging, keeping everything else."""
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    number = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(number))
    logging.getLogger().setLevel(number)


def _colors() -> bool:
    """Colours on a terminal, unless ``NO_COLOR`` is set to anything but empty
    (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty: Callable[[], bool] | None = getattr(sys.stderr, "isatty", None)
    return isatty is not None and isatty()


def _use_json(fmt: str) -> bool:
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    isatty: Callable[[], bool] | None = getattr(sys.stderr, "isatty", None)
    return not (isatty is not None and isatty())


def _drop_stdlib_noise(
    logger: WrappedLogger, method: str, event_dict: MutableMapping[str, Any]
) -> EventDict:
    event_dict.pop("_from_structlog", None)
    event_dict.pop("_record", None)
    return dict(event_dict)


def configure_logging(
    level: str,
    fmt: str = "auto",
    secrets: Sequence[str] = (),
    *,
    access_log: bool = False,
) -> None:
    """Send structlog and stdlib logging to stderr at ``level``.

    ``fmt``: ``json`` (one JSON object per line: timestamp, level, event, fields),
    ``console`` (structlog's readable renderer) or ``auto`` (console on a terminal, else
    JSON). Every occurrence of a value in ``secrets`` becomes ``[redacted]``.
    ``aiohttp.access`` is silenced unless ``access_log``. Safe to call again.
    """
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    number = logging.getLevelNamesMapping()[level.upper()]
    redactor = _Redactor(secrets)
    _active[:] = [redactor]
    as_json = _use_json(fmt)
    shared = _shared_processors(redactor, as_json=as_json)
    final = _final_renderer(redactor, as_json=as_json)
    structlog.configure(
        processors=[*shared, final],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        context_class=dict,
        logger_factory=_stderr_logger_factory,
        # Not cached, so that a later configure_logging() call reaches every logger.
        cache_logger_on_first_use=False,
    )
    _route_stdlib(shared, final, number)
    logging.getLogger("aiohttp.access").setLevel(logging.INFO if access_log else logging.WARNING)


def _shared_processors(redactor: _Redactor, *, as_json: bool) -> list[Processor]:
    """What structlog's and the standard library's records both go through: context,
    level, time, exceptions (for JSON) and, last, the redactor."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        # The console renderer formats exceptions itself (and warns if this is present).
        shared += [structlog.processors.format_exc_info]
    shared += [redactor]
    return shared


def _final_renderer(redactor: _Redactor, *, as_json: bool) -> _RedactingRenderer:
    """JSON or console lines, redacted once more after rendering."""
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_colors())
    return _RedactingRenderer(renderer, redactor, journal=stderr_is_journal())


def _route_stdlib(shared: list[Processor], final: _RedactingRenderer, number: int) -> None:
    """Send the standard library's records through the same processors, replacing the
    handler a previous call installed."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[_drop_stdlib_noise, final],
        )
    )
    root.addHandler(handler)
    root.setLevel(number)
