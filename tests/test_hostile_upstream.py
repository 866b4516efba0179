"""Hostile upstream: the fake Valmi API fails in every way the field has seen, and the
sidecar (a real process) still delivers every acknowledged event exactly once.

Each scenario posts concurrently while the fault is on, lifts it, waits (bounded) for the
queue to drain, and checks the ledger (tests/scenarios.py): lost 0, double 0. Backoff is
shortened (base 10 ms, cap 200 s → 0.2 s: a factor of 1,500 against the defaults), so
seconds here stand for the minutes and hours of a real outage.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from valmi_sidecar.fake_api import FakeValmi

from .conftest import SidecarProcess, SidecarProcessFactory, wait_until
from .scenarios import (
    SECRET_PREFIX,
    Ledger,
    Traffic,
    hostile_fake,
    secret_leaks,
    sidecar_env,
    status,
)

#: Real backoff cap over the cap used here: seconds of test stand for this many.
TIME_SCALE = 300.0 / 0.2


@pytest.fixture
async def upstream() -> AsyncIterator[FakeValmi]:
    async with hostile_fake() as api:
        yield api


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as c:
        yield c


async def start(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, **env: str
) -> tuple[SidecarProcess, str]:
    proc = sidecar_process(upstream.url, **sidecar_env(**env))
    return proc, await proc.wait_ready()


async def finish(
    proc: SidecarProcess,
    client: httpx.AsyncClient,
    url: str,
    traffic: Traffic,
    upstream: FakeValmi,
    *,
    settle_s: float = 30.0,
    **notes: object,
) -> Ledger:
    """Wait for delivery, read the counts, SIGTERM (exit 0), check the ledger and leaks."""
    await traffic.settle(upstream, settle_s)
    counts = (await status(client, url))["events"]
    leaks = await secret_leaks(client, url)
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    if SECRET_PREFIX in proc.log_text():
        leaks.append(str(proc.log_path))
    ledger = traffic.ledger(
        upstream,
        dead_lettered=counts["dead_lettered"],
        upstream_requests=upstream.requests,
        upstream_status=dict(sorted(upstream.status_counts.items())),
        **notes,
    )
    ledger.check()
    assert [] == leaks
    return ledger


async def test_half_of_requests_5xx_every_event_delivered_once(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    upstream.set_faults(error_rate=0.5, error_status=503)
    proc, url = await start(sidecar_process, upstream)
    traffic = Traffic("half_5xx")
    await traffic.run_agents(client, lambda: url, agents=8, until=lambda: False, max_events=400)
    ledger = await finish(proc, client, url, traffic, upstream)
    assert 400 == ledger.acknowledged
    assert upstream.status_counts.get(503, 0) > 50  # the fault really bit


async def test_upstream_down_for_hours_of_simulated_time_then_everything_delivered(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    await upstream.go_down()
    proc, url = await start(sidecar_process, upstream)
    traffic = Traffic("down_long")
    down_s = 6.0
    t0 = time.monotonic()
    await traffic.run_agents(
        client,
        lambda: url,
        agents=4,
        until=lambda: time.monotonic() - t0 > down_s,
        max_events=600,
    )
    await wait_until(lambda: time.monotonic() - t0 > down_s, down_s + 1, "the outage")
    during = await status(client, url)
    assert "backing_off" == during["upstream"]["state"]
    assert during["events"]["queued"] == len(traffic.acked)
    assert {} == upstream.received
    await upstream.go_up()
    await finish(
        proc,
        client,
        url,
        traffic,
        upstream,
        down_s=down_s,
        simulated_down_min=round(down_s * TIME_SCALE / 60),
    )


async def test_429_storm_with_retry_after_is_honoured_and_nothing_is_lost(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    upstream.set_faults(rate_limited=True, retry_after_s=0.5)
    proc, url = await start(sidecar_process, upstream)
    traffic = Traffic("429_storm")
    storm_s = 3.0
    t0 = time.monotonic()
    await traffic.run_agents(client, lambda: url, agents=4, until=lambda: False, max_events=300)
    await wait_until(
        lambda: upstream.status_counts.get(429, 0) > 0, 10, "the first 429 of the storm"
    )
    assert "rate_limited" == (await status(client, url))["upstream"]["state"]
    await asyncio.sleep(max(0.0, storm_s - (time.monotonic() - t0)))
    answered_429 = upstream.status_counts.get(429, 0)
    upstream.set_faults(rate_limited=False)
    await finish(proc, client, url, traffic, upstream, storm_s=storm_s, answered_429=answered_429)
    # Honouring Retry-After: at most one round of the 16 senders per 0.5-s window
    # (a client that ignored it would have sent thousands in 3 s).
    windows = storm_s / 0.5 + 2
    assert answered_429 <= 16 * windows


async def test_responses_slower_than_the_timeout_are_resent_with_the_same_key(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    # The fake stores each request after 1.5 s, but the sidecar gives up after 1 s.
    upstream.set_faults(latency_s=1.5)
    proc, url = await start(sidecar_process, upstream)
    traffic = Traffic("slow_upstream")
    await traffic.run_agents(client, lambda: url, agents=4, until=lambda: False, max_events=100)
    # The first round of 16 times out here and is stored there 0.5 s later.
    await wait_until(lambda: len(upstream.received) >= 10, 10, "slow requests stored upstream")
    await asyncio.sleep(1.0)
    upstream.set_faults(latency_s=0.0)
    ledger = await finish(proc, client, url, traffic, upstream)
    assert ledger.resent_same_key > 0  # stored upstream, timed out here, sent again


async def test_a_hanging_upstream_holds_nothing_back_once_it_answers_again(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    upstream.set_faults(hang=True)
    proc, url = await start(sidecar_process, upstream)
    traffic = Traffic("hang")
    await traffic.run_agents(client, lambda: url, agents=4, until=lambda: False, max_events=150)
    await wait_until(lambda: upstream.requests >= 20, 15, "requests held by the hang")
    await asyncio.sleep(2.0)  # several client timeouts (1 s) pass while the fake hangs
    assert 150 == len(traffic.acked)  # intake never waits for the upstream
    upstream.set_faults(hang=False)
    await finish(proc, client, url, traffic, upstream)


async def test_connection_reset_after_upstream_stored_counts_one_event(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    upstream.set_faults(reset_after_store=True)
    proc, url = await start(sidecar_process, upstream)
    traffic = Traffic("reset_after_store")
    await traffic.run_agents(client, lambda: url, agents=4, until=lambda: False, max_events=200)
    await wait_until(lambda: upstream.dropped >= 30, 15, "answers lost after the store")
    upstream.set_faults(reset_after_store=False)
    ledger = await finish(proc, client, url, traffic, upstream, dropped=upstream.dropped)
    # Every event stored once, though its answer was lost at least once: the retry
    # carried the same key and the upstream recognised it.
    assert ledger.resent_same_key > 0
    assert 200 == len(upstream.received)


async def test_401_pauses_and_keeps_everything_until_the_key_is_fixed_and_restarted(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    wrong = "sk_live_HOSTILE-wrong-0000000000"
    proc, url = await start(sidecar_process, upstream, VALMI_API_KEY=wrong)
    traffic = Traffic("401_then_fixed")
    await traffic.run_agents(client, lambda: url, agents=4, until=lambda: False, max_events=200)

    async def paused() -> bool:
        return bool((await status(client, url))["upstream"]["state"] == "paused")

    await wait_until(paused, 10, "forwarding paused by the 401")
    refused_at = upstream.status_counts.get(401, 0)
    await asyncio.sleep(2.0)
    probes = upstream.status_counts.get(401, 0) - refused_at
    counts = (await status(client, url))["events"]
    assert (200, 0, 0) == (counts["queued"], counts["delivered"], counts["dead_lettered"])
    assert {} == upstream.received
    # One probe at a time on the backoff schedule (full jitter under the 0.2-s cap: about
    # ten a second), not a flood.
    assert probes <= 40
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    first_log = proc.log_text()
    assert wrong not in first_log

    fixed, url = await start(sidecar_process, upstream)
    await finish(fixed, client, url, traffic, upstream, probes_in_2s_while_paused=probes)


async def test_a_proxy_answering_400_to_everything_pauses_and_nothing_is_dead_lettered(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    """Plain HTTP sent to an HTTPS port, a WAF, a wrong path on a gateway: every event is
    refused with the same 400. The sidecar says paused and why, keeps the queue, and
    delivers all of it once the refusals stop, without a restart."""
    upstream.set_faults(error_rate=1.0, error_status=400)
    proc, url = await start(sidecar_process, upstream)
    traffic = Traffic("400_for_everything_then_fixed")
    await traffic.run_agents(client, lambda: url, agents=4, until=lambda: False, max_events=200)

    async def paused() -> bool:
        return bool((await status(client, url))["upstream"]["state"] == "paused")

    await wait_until(paused, 10, "forwarding paused by the refusals")
    refused_at = upstream.status_counts.get(400, 0)
    await asyncio.sleep(2.0)
    probes = upstream.status_counts.get(400, 0) - refused_at
    body = await status(client, url)
    counts = body["events"]
    assert (200, 0, 0) == (counts["queued"], counts["delivered"], counts["dead_lettered"])
    assert "paused" == body["upstream"]["state"]
    assert "configuration" in body["upstream"]["last_error"]
    assert probes <= 40  # one probe at a time on the backoff schedule
    upstream.set_faults(error_rate=0.0)
    ledger = await finish(proc, client, url, traffic, upstream, probes_in_2s_while_paused=probes)
    assert (200, 0) == (ledger.acknowledged, ledger.dead_lettered)
