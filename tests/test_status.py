"""What a running sidecar says about itself (``status.py``), from given values: the
``/v1/status`` JSON, systemd's STATUS= line, and what a terminal is told while it stops."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from pathlib import Path

from valmi_sidecar import __version__
from valmi_sidecar.status import Console, Facts, drain_line, status_json, status_line
from valmi_sidecar.store import Counts, DiskUsage

from .conftest import fast_settings, wait_until

NOW = 1_780_000_000.0


@dataclass
class FlusherSeen:
    """A flusher as the status page reads it."""

    state: str = "healthy"
    in_flight: int = 2
    last_error: str | None = "HTTP 503"
    last_error_at: float | None = NOW - 1.5
    answered: bool = True
    next_attempt_in_s: float | None = 0.12345
    max_unsaved: int = 64


COUNTS = Counts(
    received=10,
    queued=3,
    queued_bytes=300,
    delivered=6,
    dead_lettered=1,
    duplicates=2,
    oldest_queued_at=NOW - 5.0,
)
DISK = DiskUsage(bytes=4096, max_bytes=1 << 20, full=False, dead_letters=1, dead_letter_bytes=90)


def facts(
    flusher: FlusherSeen | None = None,
    *,
    counts: Counts = COUNTS,
    ready: bool = True,
    draining: bool = False,
) -> Facts:
    return Facts(
        counts=counts,
        rates={"received": 1.0, "delivered": None, "dead_lettered": 0.0},
        flusher=flusher,
        forwarding=flusher is not None,
        ready=ready,
        draining=draining,
        uptime_s=12.34567,
        writable=True,
        path=Path("/data/queue.db"),
        disk=DISK,
        moved_aside=[],
        now=NOW,
    )


def test_status_json_shows_the_given_counts_and_the_flusher(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path, "http://127.0.0.1:9", max_queue_events=1000)
    page = status_json(settings, facts(FlusherSeen()))
    assert __version__ == page["version"]
    assert (True, False, 12.346) == (page["ready"], page["draining"], page["uptime_s"])
    assert {
        "received": 10,
        "queued": 3,
        "in_flight": 2,
        "delivered": 6,
        "dead_lettered": 1,
        "duplicates": 2,
    } == page["events"]
    assert {"events": 3, "bytes": 300, "max_events": 1000} == {
        k: page["queue"][k] for k in ("events", "bytes", "max_events")
    }
    assert 5.0 == page["oldest_queued_age_s"]
    assert {"writable": True, "path": "/data/queue.db"} == page["store"]
    assert 4096 == page["disk"]["bytes"]
    assert [] == page["moved_aside"]
    upstream = page["upstream"]
    assert "healthy" == upstream["state"]
    assert upstream["forwarding"] is True
    assert "HTTP 503" == upstream["last_error"]
    assert "2026-05-28T20:26:38.500Z" == upstream["last_error_at"]
    assert 0.123 == upstream["next_attempt_in_s"]
    assert 64 == upstream["max_unsaved"]
    assert upstream["answered_since_start"] is True


def test_status_json_without_a_flusher_says_disabled_and_the_drain_stalls(
    tmp_path: Path,
) -> None:
    page = status_json(fast_settings(tmp_path, None), facts(None))
    upstream = page["upstream"]
    assert ("disabled", False, None, None, 0) == (
        upstream["state"],
        upstream["forwarding"],
        upstream["last_error_at"],
        upstream["next_attempt_in_s"],
        upstream["max_unsaved"],
    )
    assert 0 == page["events"]["in_flight"]
    assert {"forecast_s": None, "rate_per_s": 0.0, "basis": "stalled"} == page["drain"]


def test_status_json_with_an_empty_queue_has_no_age_and_nothing_to_drain(
    tmp_path: Path,
) -> None:
    empty = Counts(5, 0, 0, 5, 0, 0, None)
    page = status_json(fast_settings(tmp_path, None), facts(FlusherSeen(), counts=empty))
    assert page["oldest_queued_age_s"] is None
    assert "empty" == page["drain"]["basis"]


def test_a_draining_sidecar_is_not_ready(tmp_path: Path) -> None:
    page = status_json(fast_settings(tmp_path, None), facts(None, draining=True))
    assert (False, True) == (page["ready"], page["draining"])


def test_status_line_says_starting_before_the_store_is_open() -> None:
    assert "starting" == status_line(None, "disabled")
    assert "queued=3 delivered=6 dead_lettered=1 upstream=paused" == status_line(COUNTS, "paused")


def test_drain_line_follows_the_phases_of_a_shutdown() -> None:
    def line(*, hurried: bool = False, flush_until: float | None = None) -> str:
        return drain_line(
            queued=7,
            hurried=hurried,
            grace_until=104.2,
            flush_until=flush_until,
            final_flush_s=30.0,
            now=100.0,
        )

    finishing = line()
    assert finishing.startswith("stopping: finishing requests in flight, 4 s left at most")
    assert "forwarding the queue (7 events) for up to 30 s" in finishing
    flushing = line(flush_until=125.0)
    assert flushing.startswith("stopping: forwarding the queue, 7 events left, 25 s left")
    hurried = line(hurried=True, flush_until=125.0)
    assert "stopping now: closing the store; 7 events stay queued" == hurried


async def test_console_tells_a_terminal_and_nothing_without_one() -> None:
    silent = Console(None)
    assert silent.attached is False
    silent.say("nobody hears this")
    out = io.StringIO()
    console = Console(out)
    task = asyncio.create_task(console.keep_telling(lambda: "still stopping"))
    await wait_until(lambda: "still stopping\n" in out.getvalue(), 5, "the first line")
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()
