"""Hostile process conditions: SIGKILL at random moments, SIGSTOP longer than every
timeout, and data directories the sidecar cannot use. Real processes, real signals.

(A full disk is covered with the store's disk-space tests.)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from valmi_sidecar.fake_api import FakeValmi

from .conftest import SidecarProcessFactory, wait_until
from .scenarios import (
    SECRET_KEY,
    SECRET_PREFIX,
    Traffic,
    hostile_fake,
    secret_leaks,
    sidecar_env,
    status,
)

ROUNDS = 20


@pytest.fixture
async def upstream() -> AsyncIterator[FakeValmi]:
    async with hostile_fake() as api:
        yield api


async def test_sigkill_at_random_moments_for_20_rounds_loses_and_doubles_nothing(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, tmp_path: Path
) -> None:
    """Each round: start, post from 6 agents while the flusher forwards (slowly, so
    requests are in flight), SIGKILL after a random 20-400 ms, restart on the same data."""
    upstream.set_faults(latency_s=0.02)
    traffic = Traffic("sigkill_x20")
    rng = random.Random(20)
    data_dir = tmp_path / "data"
    kills_with_upstream_in_flight = 0
    async with httpx.AsyncClient(timeout=5.0) as client:
        for n in range(ROUNDS):
            proc = sidecar_process(upstream.url, data_dir=data_dir, **sidecar_env())
            url = await proc.wait_ready()
            stop = asyncio.Event()
            acked_before = len(traffic.acked)
            posting = asyncio.create_task(
                traffic.run_agents(
                    client,
                    lambda url=url: url,  # type: ignore[misc]
                    agents=6,
                    until=stop.is_set,
                    max_events=5000,
                    first_seq=n * 5000,
                    stop_on_error=True,
                )
            )
            # Once the round's traffic is flowing, a random moment for the kill.
            await wait_until(lambda: len(traffic.acked) > acked_before, 20, "202s")  # noqa: B023
            await asyncio.sleep(rng.uniform(0.02, 0.4))
            requests_before = upstream.requests
            proc.kill()  # SIGKILL
            kills_with_upstream_in_flight += upstream.requests > requests_before
            stop.set()
            await posting
        assert len(traffic.acked) > ROUNDS  # every round really posted

        final = sidecar_process(upstream.url, data_dir=data_dir, **sidecar_env())
        url = await final.wait_ready()
        upstream.set_faults(latency_s=0.0)
        await traffic.settle(upstream, 60)
        counts = (await status(client, url))["events"]
        leaks = await secret_leaks(client, url)
        final.signal(signal.SIGTERM)
        assert 0 == await final.wait_exit()
    assert counts["received"] == counts["queued"] + counts["delivered"] + counts["dead_lettered"]
    ledger = traffic.ledger(
        upstream,
        dead_lettered=counts["dead_lettered"],
        rounds=ROUNDS,
        upstream_requests=upstream.requests,
    )
    ledger.check()
    assert [] == leaks


async def test_sigstop_longer_than_every_timeout_then_sigcont_loses_nothing(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi
) -> None:
    """Frozen for 3 s (client timeout 1 s, upstream timeout 1 s): clients time out, the
    process resumes, serves again, and every 202 is delivered once."""
    proc = sidecar_process(upstream.url, **sidecar_env())
    url = await proc.wait_ready()
    traffic = Traffic("sigstop")
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=1.0) as client:
        posting = asyncio.create_task(
            traffic.run_agents(client, lambda: url, agents=4, until=stop.is_set, max_events=20_000)
        )
        await wait_until(lambda: len(upstream.received) >= 50, 10, "forwarding under way")
        proc.signal(signal.SIGSTOP)
        # A 202 already in the socket buffer when SIGSTOP lands still reaches its client;
        # count only what arrives after those have had time to land.
        await asyncio.sleep(0.5)
        frozen_at = len(traffic.acked)
        await asyncio.sleep(2.5)  # the freeze itself is the scenario
        acked_while_frozen = len(traffic.acked) - frozen_at
        proc.signal(signal.SIGCONT)
        resumed = len(traffic.acked)
        await wait_until(lambda: len(traffic.acked) >= resumed + 50, 10, "202s after SIGCONT")
        stop.set()
        await posting
        await traffic.settle(upstream, 30)
        counts = (await status(client, url))["events"]
        leaks = await secret_leaks(client, url)
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    timeouts = sum(n for kind, n in traffic.refused.items() if "Timeout" in kind)
    ledger = traffic.ledger(
        upstream, dead_lettered=counts["dead_lettered"], client_timeouts=timeouts, frozen_s=3.0
    )
    ledger.check()
    assert 0 == acked_while_frozen
    assert timeouts > 0  # the freeze was felt by the clients
    assert [] == leaks
    assert SECRET_PREFIX not in proc.log_text()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_and_uncreatable", "Not a directory"),  # its parent is a regular file
        ("read_only", "/proc/1"),  # procfs: refuses every write, even root's
    ],
)
async def test_unusable_data_dir_is_a_clear_startup_error_and_exit_1(
    tmp_path: Path, case: str, expected: str
) -> None:
    # Tests run as root, which chmod cannot stop: use places no one can write to.
    if case == "missing_and_uncreatable":
        (tmp_path / "file").write_text("not a directory")
        data_dir = tmp_path / "file" / "sub"
    else:
        data_dir = Path("/proc/1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    env |= {
        "VALMI_SIDECAR_DATA_DIR": str(data_dir),
        "VALMI_SIDECAR_LISTEN": "127.0.0.1:0",
        "VALMI_SIDECAR_LOG_FORMAT": "json",
        "VALMI_API_KEY": SECRET_KEY,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "valmi_sidecar",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert 1 == proc.returncode, text
    failed = [
        e for e in map(_json_or_none, text.splitlines()) if e and e.get("event") == "startup_failed"
    ]
    assert 1 == len(failed), text
    assert "error" == failed[0]["level"]
    assert expected in failed[0]["error"]
    assert str(data_dir) in failed[0]["error"]
    assert "sidecar_ready" not in text
    assert SECRET_PREFIX not in text


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
