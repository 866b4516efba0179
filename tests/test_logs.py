"""Log rendering on a real terminal (a pseudo-terminal), level changes and late secrets."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from valmi_sidecar.logs import configure_logging, redact_also, set_level

SCRIPT = (
    "from valmi_sidecar.logs import configure_logging; import structlog; "
    "configure_logging('info', 'auto'); "
    "structlog.get_logger('t').warning('disk_low', free_bytes=12)"
)
ESC = b"\x1b["


def on_a_terminal(**env: str) -> bytes:
    """What the sidecar's logger writes to a terminal (its stderr is a pty)."""
    master, slave = pty.openpty()
    full = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    full.update(env)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            stderr=slave,
            stdout=subprocess.DEVNULL,
            env=full,
            timeout=60,
            check=True,
        )
        assert 0 == proc.returncode
    finally:
        os.close(slave)
    out = b""
    try:
        while chunk := os.read(master, 65536):
            out += chunk
    except OSError:  # EIO once the terminal's other side is closed and drained
        pass
    os.close(master)
    assert b"disk_low" in out
    return out


def test_console_lines_on_a_terminal_are_coloured() -> None:
    assert ESC in on_a_terminal()


def test_no_color_turns_colours_off_on_a_terminal() -> None:
    assert ESC not in on_a_terminal(NO_COLOR="1")


def test_an_empty_no_color_changes_nothing() -> None:
    """no-color.org: only a non-empty value counts."""
    assert ESC in on_a_terminal(NO_COLOR="")


@pytest.fixture
def configured() -> Iterator[None]:
    """Undo configure_logging so that other tests see structlog's defaults."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_set_level_changes_what_is_logged_and_keeps_the_format(
    capsys: pytest.CaptureFixture[str], configured: None
) -> None:
    configure_logging("warning", "json")
    log = structlog.get_logger("t")
    log.info("before_change")
    set_level("debug")
    log.debug("after_change")
    err = capsys.readouterr().err
    assert "before_change" not in err
    assert '"event": "after_change"' in err
    with pytest.raises(ValueError, match="use one of"):
        set_level("loud")


def test_a_secret_added_later_is_redacted_from_then_on(
    capsys: pytest.CaptureFixture[str], configured: None
) -> None:
    configure_logging("info", "json", secrets=["sk_live_first"])
    redact_also("sk_live_rotated")
    structlog.get_logger("t").info("key", old="sk_live_first", new="x sk_live_rotated x")
    err = capsys.readouterr().err
    assert "sk_live_first" not in err
    assert "sk_live_rotated" not in err
    assert err.count("[redacted]") == 2
