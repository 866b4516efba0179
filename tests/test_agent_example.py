"""examples/agent.py, run as a real process against a live sidecar and the fake Valmi API."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from valmi_sidecar.fake_api import FakeValmi

from .conftest import SidecarProcessFactory, wait_until

AGENT = Path(__file__).resolve().parent.parent / "examples" / "agent.py"


class AgentProcess:
    def __init__(self, out: Path, *args: str) -> None:
        self.out_path = out
        self._out = out.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT), *args], stdout=self._out, stderr=subprocess.STDOUT
        )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.out_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def named(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]

    async def wait_exit(self, timeout: float = 60.0) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout, "the agent to exit")
        self._out.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def start(*args: str) -> AgentProcess:
        a = AgentProcess(tmp_path / f"agent-{len(started)}.out", *args)
        started.append(a)
        return a

    try:
        yield start
    finally:
        for a in started:
            a.kill()


async def test_agent_retries_503_with_the_same_key_and_every_event_is_billed_once(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, agent: Any
) -> None:
    await fake.go_down()  # nothing drains: the small queue fills and the sidecar says 503
    sidecar = sidecar_process(fake.url, VALMI_SIDECAR_MAX_QUEUE_EVENTS="3")
    url = await sidecar.wait_ready()
    run = agent("--sidecar", url, "--events", "6", "--max-wait-s", "0.2")
    await wait_until(lambda: bool(run.named("retrying")), 20, "a 503 from the full queue")
    first = run.named("retrying")[0]
    assert 503 == first["status"]
    assert "queue_full" == first["reason"]
    assert first["retry_after_s"] > 0, "Retry-After was read"
    await fake.go_up()

    assert 0 == await run.wait_exit()
    accepted = run.named("accepted")
    assert 6 == len(accepted)
    # Every retry of an event carried the key it was first sent with.
    retried_keys = {line["idempotency_key"] for line in run.named("retrying")}
    assert retried_keys <= {line["idempotency_key"] for line in accepted}
    assert {"event": "stopped", "reason": "done", "accepted": 6, "refused": 0} | {
        "not_recorded": 0
    } == run.named("stopped")[0]

    await wait_until(lambda: len(fake.received) == 6, 20, "all six delivered")
    # Upstream got each event under the agent's own key.
    assert {line["idempotency_key"] for line in accepted} == set(fake.received)
    assert all(1 == r.attempts for r in fake.received.values())
    async with httpx.AsyncClient(timeout=10.0) as client:
        events = (await client.get(f"{url}/v1/status")).json()["events"]
    assert (6, 0) == (events["received"], events["duplicates"])


async def test_agent_stops_cleanly_on_sigterm_and_what_it_got_accepted_is_delivered(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, agent: Any
) -> None:
    sidecar = sidecar_process(fake.url)
    url = await sidecar.wait_ready()
    run = agent("--sidecar", url, "--events", "100000", "--interval-s", "0.02")
    await wait_until(lambda: len(run.named("accepted")) >= 5, 20, "some events accepted")
    run.proc.send_signal(signal.SIGTERM)
    assert 0 == await run.wait_exit(20)
    stopped = run.named("stopped")[0]
    assert "signal" == stopped["reason"]
    accepted = {line["idempotency_key"] for line in run.named("accepted")}
    assert len(accepted) == stopped["accepted"] < 100000
    await wait_until(lambda: accepted == set(fake.received), 20, "every accepted event delivered")


async def test_agent_reports_a_refusal_and_exits_1(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, agent: Any
) -> None:
    """A wrong ingest token cannot get better by retrying: reported, not retried."""
    sidecar = sidecar_process(fake.url, VALMI_SIDECAR_INGEST_TOKEN="tok_right_123")
    url = await sidecar.wait_ready()
    run = agent("--sidecar", url, "--events", "2")
    assert 1 == await run.wait_exit()
    refused = run.named("refused")
    assert [401, 401] == [line["status"] for line in refused]
    assert [] == run.named("retrying")
    assert {} == fake.received
