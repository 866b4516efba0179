"""Shutdown that a person can follow, on real subprocesses with real signals: on a
terminal (a pty) the drain says what it does, a second Ctrl-C stops forwarding at once
and keeps every queued event; a port already in use is named with what to do."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import ACTION, DEFAULT_KEY, SidecarProcessFactory, occupied_port, wait_until
from tests.test_dead_letters import free_port, run_cli
from valmi_sidecar.store import ReadOnlyDatabase

if TYPE_CHECKING:
    from valmi_sidecar.fake_api import FakeValmi


class OnATerminal:
    """``valmi-sidecar run`` with a pty as its stdin, stdout and stderr."""

    def __init__(self, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.output = bytearray()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "valmi_sidecar", "run"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.master)
        self.output += chunk

    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    def url(self) -> str | None:
        for event in json_lines(self.text()):
            if event.get("event") == "sidecar_ready":
                return "http://" + str(event["listen"])
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)


def json_lines(text: str) -> list[dict[str, object]]:
    """The JSON log lines of a terminal's output, skipping the text for a person."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@pytest.fixture
def terminal_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    env.update(
        {
            "VALMI_SIDECAR_DATA_DIR": str(tmp_path / "data"),
            "VALMI_SIDECAR_LISTEN": "127.0.0.1:0",
            "VALMI_SIDECAR_LOG_FORMAT": "json",
            # Nothing listens upstream: every event stays queued and the drain lasts.
            "VALMI_API_URL": f"http://127.0.0.1:{free_port()}",
            "VALMI_API_KEY": DEFAULT_KEY,
            "VALMI_SIDECAR_BACKOFF_BASE_S": "0.01",
            "VALMI_SIDECAR_BACKOFF_CAP_S": "0.2",
            "VALMI_SIDECAR_FINAL_FLUSH_S": "120",
        }
    )
    return env


async def test_ctrl_c_on_a_terminal_shows_the_drain_and_a_second_one_stops_at_once(
    terminal_env: dict[str, str], tmp_path: Path
) -> None:
    term = OnATerminal(terminal_env)
    try:
        await wait_until(lambda: term.url() is not None, timeout=20, what="sidecar_ready")
        url = term.url()
        assert url is not None
        async with httpx.AsyncClient() as client:
            for _ in range(20):
                assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code

        term.proc.send_signal(signal.SIGINT)
        progress = re.compile(r"^stopping: forwarding the queue, 20 events left, \d+ s left", re.M)
        await wait_until(lambda: bool(progress.search(term.text())), 10, "drain progress")
        assert term.proc.poll() is None  # the final flush has 120 s to go
        assert "Ctrl-C again to stop now: they stay queued" in term.text()

        term.proc.send_signal(signal.SIGINT)
        hurried = time.monotonic()
        await wait_until(lambda: term.proc.poll() is not None, 15, "exit after a second Ctrl-C")
        assert time.monotonic() - hurried < 15
        assert 0 == term.proc.returncode
        await wait_until(lambda: "stopped: " in term.text(), 5, "the last line")
        text = term.text()
        assert "stopping now: forwarding stops; 20 queued events stay queued" in text
        assert "stopped: 20 events stay queued" in text
        assert "shutdown_hurried" in {e.get("event") for e in json_lines(text)}
    finally:
        term.close()

    with ReadOnlyDatabase(tmp_path / "data" / "queue.db") as db:
        counts = db.counts()
    assert (20, 20, 0) == (counts.received, counts.queued, counts.delivered)


async def test_a_second_sigterm_without_a_terminal_stops_forwarding_and_prints_only_logs(
    sidecar_process: SidecarProcessFactory,
) -> None:
    upstream = f"http://127.0.0.1:{free_port()}"  # nothing listens: the drain would last
    proc = sidecar_process(upstream, VALMI_SIDECAR_FINAL_FLUSH_S="120")
    url = await proc.wait_ready()
    async with httpx.AsyncClient() as client:
        for _ in range(5):
            assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    proc.signal(signal.SIGTERM)
    await wait_until(
        lambda: "shutdown_started" in {e.get("event") for e in proc.log_events()},
        10,
        "shutdown_started",
    )
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit(timeout=15)
    events = {e.get("event"): e for e in proc.log_events()}
    assert 5 == events["shutdown_hurried"]["queued"]
    assert 5 == events["shutdown_complete"]["queued"]
    # Not a terminal: every line is a log line, no progress text among them.
    lines = proc.log_text().splitlines()
    assert [] == [line for line in lines if line.strip() and not line.startswith("{")]


async def test_a_port_in_use_is_named_with_what_to_do(
    sidecar_process: SidecarProcessFactory,
) -> None:
    with occupied_port() as port:
        proc = sidecar_process(None, VALMI_SIDECAR_LISTEN=f"127.0.0.1:{port}")
        assert 1 == await proc.wait_exit(timeout=20)
    (failed,) = [e for e in proc.log_events() if e.get("event") == "startup_failed"]
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" == failed["error"]
    assert "--listen HOST:PORT or VALMI_SIDECAR_LISTEN" in str(failed["action"])
    assert f"sport = :{port}" in str(failed["action"])
    assert "Errno" not in proc.log_text()


async def test_the_fake_api_on_a_port_in_use_says_so_without_a_traceback() -> None:
    with occupied_port() as port:
        code, out, err = await run_cli("fake-api", "--listen", f"127.0.0.1:{port}")
    assert 1 == code, out + err
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in err
    assert "choose another address with --listen HOST:PORT" in err
    assert "Traceback" not in err


async def test_a_second_signal_mid_forwarding_loses_nothing_and_bills_each_event_once(
    fake: FakeValmi, sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """Requests in flight to a slow upstream are cut off by the second signal; after a
    restart every acknowledged event arrives, each key stored once upstream."""
    fake.set_faults(latency_s=0.5)
    first = sidecar_process(fake.url, VALMI_SIDECAR_FINAL_FLUSH_S="120")
    url = await first.wait_ready()
    acked: set[str] = set()
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            r = await client.post(url + "/v1/actions", json=ACTION)
            assert 202 == r.status_code
            acked.add(r.json()["id"])
    await fake.wait_until(lambda: len(fake.events()) > 0, timeout_s=10)
    first.signal(signal.SIGTERM)
    await wait_until(
        lambda: "shutdown_started" in {e.get("event") for e in first.log_events()},
        10,
        "shutdown_started",
    )
    first.signal(signal.SIGTERM)
    assert 0 == await first.wait_exit(timeout=15)
    left = next(e for e in first.log_events() if e.get("event") == "shutdown_complete")
    assert 0 < int(left["queued"]) < 200  # some went, the rest stayed queued

    fake.set_faults(latency_s=0.0)
    second = sidecar_process(fake.url)
    await second.wait_ready()
    await fake.wait_until(lambda: len(fake.events()) == 200, timeout_s=30)
    second.signal(signal.SIGTERM)
    assert 0 == await second.wait_exit()
    assert acked == {e.idem_key for e in fake.events()}
    with ReadOnlyDatabase(tmp_path / "data" / "queue.db") as db:
        counts = db.counts()
    assert (200, 0, 200) == (counts.received, counts.queued, counts.delivered)
