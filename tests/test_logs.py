"""Log rendering: on a real terminal (a pseudo-terminal), level changes and late secrets,
and on systemd's journal stream, where each line starts with its syslog priority when,
and only when, stderr is the journal's stream."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from valmi_sidecar.logs import configure_logging, debug_enabled, redact_also, set_level

from .conftest import wait_until

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


def test_set_level_changes_what_is_logged_and_keeps_the_format(
    capsys: pytest.CaptureFixture[str], reset_logging: None
) -> None:
    configure_logging("warning", "json")
    log = structlog.get_logger("t")
    log.info("before_change")
    assert not debug_enabled()  # what a hot path asks before a debug line
    set_level("debug")
    assert debug_enabled()
    log.debug("after_change")
    err = capsys.readouterr().err
    assert "before_change" not in err
    assert '"event": "after_change"' in err
    with pytest.raises(ValueError, match="use one of"):
        set_level("loud")


def test_a_secret_added_later_is_redacted_from_then_on(
    capsys: pytest.CaptureFixture[str], reset_logging: None
) -> None:
    configure_logging("info", "json", secrets=["sk_live_first"])
    redact_also("sk_live_rotated")
    structlog.get_logger("t").info("key", old="sk_live_first", new="x sk_live_rotated x")
    err = capsys.readouterr().err
    assert "sk_live_first" not in err
    assert "sk_live_rotated" not in err
    assert err.count("[redacted]") == 2


def start(tmp_path: Path, *, journal: str | None) -> tuple[subprocess.Popen[bytes], Path]:
    """A sidecar (no API key: it warns that forwarding is off) writing to a file; with
    ``journal`` "match", JOURNAL_STREAM names that file as systemd would name its stream."""
    log = tmp_path / "stderr"
    fh = log.open("wb")
    st = os.fstat(fh.fileno())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VALMI", "JOURNAL"))}
    env |= {
        "VALMI_SIDECAR_DATA_DIR": str(tmp_path / "data"),
        "VALMI_SIDECAR_LISTEN": "127.0.0.1:0",
        "VALMI_SIDECAR_LOG_FORMAT": "json",
    }
    if journal == "match":
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    elif journal == "other":
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "valmi_sidecar", "run"],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=env,
    )
    fh.close()
    return proc, log


async def stop(proc: subprocess.Popen[bytes], log: Path) -> list[str]:
    await wait_until(lambda: "sidecar_ready" in log.read_text(), 20, "sidecar_ready")
    proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: proc.poll() is not None, 30, "exit")
    assert 0 == proc.returncode
    return (await asyncio.to_thread(log.read_text)).splitlines()


async def test_on_the_journal_stream_each_line_carries_its_priority(tmp_path: Path) -> None:
    proc, log = start(tmp_path, journal="match")
    lines = await stop(proc, log)
    by_event = {}
    for line in lines:
        assert ("<", ">") == (line[0], line[2]), line
        record = json.loads(line[3:])
        by_event[record["event"]] = (int(line[1]), record["level"])
    assert (4, "warning") == by_event["forwarding_disabled"]
    assert (6, "info") == by_event["sidecar_ready"]
    assert (6, "info") == by_event["shutdown_complete"]


async def test_elsewhere_lines_are_plain(tmp_path: Path) -> None:
    """No JOURNAL_STREAM, or one naming another stream (a shell started inside a service):
    no prefix, every line is a JSON object."""
    for journal in (None, "other"):
        run_dir = tmp_path / str(journal)
        run_dir.mkdir()
        proc, log = start(run_dir, journal=journal)
        lines = await stop(proc, log)
        assert lines
        assert all(json.loads(line)["event"] for line in lines), journal


#: The loggers whose lines the sidecar shows: its own, and aiohttp's (the access log).
OURS = ("valmi_sidecar", "aiohttp")


async def test_debug_is_the_sidecars_own_not_the_sqlite_drivers(tmp_path: Path) -> None:
    """``--log-level debug`` shows the sidecar's debug events, not a line per statement
    from the SQLite driver."""
    from .conftest import ACTION, SidecarProcess  # noqa: PLC0415

    proc = SidecarProcess(tmp_path / "data", None, {"VALMI_SIDECAR_LOG_LEVEL": "debug"})
    try:
        url = await proc.wait_ready()
        import httpx  # noqa: PLC0415

        async with httpx.AsyncClient() as client:
            for _ in range(5):
                assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
        proc.signal(signal.SIGTERM)
        assert 0 == await proc.wait_exit()
    finally:
        proc.kill()
    records = proc.log_events()
    assert any(r["level"] == "debug" for r in records)  # the sidecar's own
    foreign = [r for r in records if not str(r.get("logger", "valmi_sidecar")).startswith(OURS)]
    assert [] == foreign
