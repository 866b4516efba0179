"""End to end: agent → sidecar → fake Valmi API, through outages, crashes and shutdowns.

The sidecar runs in-process where that is enough and as a real subprocess (with real
SIGKILL and SIGTERM) where the process itself is under test. The fake Valmi API is
always a real server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valmi_sidecar.fake_api import FakeValmi
from valmi_sidecar.service import Sidecar

from .conftest import (
    ACTION,
    OUTCOME,
    SidecarFactory,
    SidecarProcessFactory,
    fast_settings,
    wait_until,
)


async def post_many(
    client: httpx.AsyncClient, url: str, n: int, concurrency: int = 32
) -> list[str]:
    """Post ``n`` events (actions and outcomes) and return the ids answered 202."""
    ids: list[str] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        path, body = ("/v1/actions", ACTION) if i % 2 else ("/v1/outcomes", OUTCOME)
        async with sem:
            resp = await client.post(f"{url}{path}", json={**body, "metadata": {"i": i}})
        assert 202 == resp.status_code, resp.text
        ids.append(resp.json()["id"])

    await asyncio.gather(*(one(i) for i in range(n)))
    return ids


async def test_outage_while_2000_events_are_posted_then_every_event_delivered_once(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient, fake: FakeValmi
) -> None:
    _, url = await sidecar_factory(fake.url)
    await fake.go_down()
    ids = await post_many(client, url, 2000)
    assert 2000 == len(set(ids))
    await fake.go_up()
    await wait_until(lambda: len(fake.received) == 2000, 60, "all 2,000 delivered")
    assert set(ids) == set(fake.received)
    assert all(r.attempts == 1 for r in fake.received.values())

    async def settled() -> bool:
        events = (await client.get(f"{url}/v1/status")).json()["events"]
        return bool(events["delivered"] == 2000 and events["queued"] == 0)

    await wait_until(settled, 10, "status shows 2,000 delivered")


async def test_no_api_key_keeps_events_and_a_restart_with_the_key_delivers_the_backlog(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient, fake: FakeValmi, tmp_path: Path
) -> None:
    data = tmp_path / "backlog"
    sidecar, url = await sidecar_factory(None, data_dir=data)
    ids = await post_many(client, url, 50)
    await sidecar.stop()
    assert {} == fake.received
    _, url = await sidecar_factory(fake.url, data_dir=data)
    await wait_until(lambda: len(fake.received) == 50, 20, "backlog delivered")
    assert set(ids) == set(fake.received)


async def test_client_retry_after_delivery_still_gets_the_original_answer(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient, fake: FakeValmi
) -> None:
    _, url = await sidecar_factory(fake.url)
    headers = {"Idempotency-Key": "retry-me"}
    first = await client.post(f"{url}/v1/actions", json=ACTION, headers=headers)
    await wait_until(lambda: "retry-me" in fake.received, what="delivery")
    again = await client.post(f"{url}/v1/actions", json=ACTION, headers=headers)
    assert first.json() == again.json()
    assert 1 == len(fake.received)
    assert 1 == fake.received["retry-me"].attempts


# --- the sidecar as a real process ----------------------------------------------------


async def test_second_instance_on_the_same_data_dir_refuses_to_start(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi
) -> None:
    first = sidecar_process(fake.url)
    await first.wait_ready()
    second = sidecar_process(fake.url, data_dir=first.data_dir)
    assert 1 == await second.wait_exit()
    assert "another valmi-sidecar" in second.log_text()
    first.signal(signal.SIGTERM)
    assert 0 == await first.wait_exit()


async def test_sigterm_drains_finishes_requests_and_exits_0(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, client: httpx.AsyncClient
) -> None:
    proc = sidecar_process(fake.url)
    url = await proc.wait_ready()
    ids = await post_many(client, url, 300)
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    events = [e["event"] for e in proc.log_events()]
    assert "shutdown_started" in events
    assert "shutdown_complete" in events
    # Whatever the final flush did not deliver is still queued: a restart delivers it.
    again = sidecar_process(fake.url, data_dir=proc.data_dir)
    await again.wait_ready()
    await wait_until(lambda: set(ids) <= set(fake.received), 30, "every 202 delivered")
    again.signal(signal.SIGTERM)
    assert 0 == await again.wait_exit()


async def test_sigterm_lets_requests_in_flight_finish(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, client: httpx.AsyncClient
) -> None:
    proc = sidecar_process(fake.url)
    url = await proc.wait_ready()
    posting = asyncio.create_task(post_many(client, url, 200, concurrency=16))
    await wait_until(lambda: len(fake.received) > 0, 20, "traffic flowing")
    proc.signal(signal.SIGTERM)
    try:
        ids = await posting
    except (httpx.TransportError, AssertionError):
        ids = None  # Posts after the listener closed are refused: that is allowed.
    assert 0 == await proc.wait_exit()
    log = proc.log_text()
    assert "request_failed" not in log
    if ids is not None:
        again = sidecar_process(fake.url, data_dir=proc.data_dir)
        await again.wait_ready()
        await wait_until(lambda: set(ids) <= set(fake.received), 30, "every 202 delivered")


async def test_sigkill_under_load_loses_no_acknowledged_event(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, client: httpx.AsyncClient
) -> None:
    fake.faults.latency_s = 0.01  # keep requests in flight when the kill lands
    proc = sidecar_process(fake.url)
    url = await proc.wait_ready()
    acked: list[str] = []
    stop = asyncio.Event()

    async def agent(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                resp = await client.post(
                    f"{url}/v1/actions", json={**ACTION, "metadata": {"agent": n, "i": i}}
                )
            except httpx.TransportError:
                return
            if resp.status_code == 202:
                acked.append(resp.json()["id"])

    agents = [asyncio.create_task(agent(n)) for n in range(8)]
    await wait_until(lambda: len(acked) >= 400 and len(fake.received) >= 50, 30, "load")
    proc.kill()  # SIGKILL, mid-load
    stop.set()
    await asyncio.gather(*agents)
    fake.faults.latency_s = 0.0
    survivor = sidecar_process(fake.url, data_dir=proc.data_dir)
    await survivor.wait_ready()
    await wait_until(lambda: set(acked) <= set(fake.received), 60, "every 202 delivered")
    # Re-sent after the crash: only events that were in flight, each with the same key
    # (the fake counts a repeat of a key as a second attempt at one event).
    resent = [r for r in fake.received.values() if r.attempts > 1]
    assert len(resent) <= 256 + 16
    survivor.signal(signal.SIGTERM)
    assert 0 == await survivor.wait_exit()


async def test_missing_api_key_is_one_clear_warning_and_no_secret_in_logs(
    sidecar_process: SidecarProcessFactory, client: httpx.AsyncClient, fake: FakeValmi
) -> None:
    proc = sidecar_process(fake.url, VALMI_SIDECAR_INGEST_TOKEN="tok-secret-123")
    url = await proc.wait_ready()
    resp = await client.post(
        f"{url}/v1/actions", json=ACTION, headers={"Authorization": "Bearer tok-secret-123"}
    )
    assert 202 == resp.status_code
    await wait_until(lambda: len(fake.received) == 1, what="delivery")
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    text = proc.log_text()
    assert "tok-secret-123" not in text
    assert "sk_test_fake" not in text


# --- property: what the agent sends is what Valmi gets ---------------------------------


class LiveStack:
    """A fake API and a sidecar running in a thread of their own, for sync property tests."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.fake = FakeValmi()
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        await self.fake.start()
        sidecar = Sidecar(fast_settings(self.data_dir, self.fake.url))
        await sidecar.start()
        assert sidecar.address is not None
        self.url = "http://{}:{}".format(*sidecar.address)
        self._ready.set()
        await self._stop.wait()
        await sidecar.stop()
        await self.fake.stop()

    def __enter__(self) -> LiveStack:
        self._thread.start()
        assert self._ready.wait(20), "live stack did not start"
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    with LiveStack(tmp_path_factory.mktemp("live") / "data") as stack:
        yield stack


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
metadata = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        json_leaf,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=8,
    ),
    max_size=4,
)
candidate = st.fixed_dictionaries(
    {},
    optional={
        "agent_key": st.text(max_size=260) | st.integers(),
        "action_type": st.sampled_from(["llm_call", "tool_call", "", "x" * 257]),
        "outcome_type": st.sampled_from(["converted_lead", "", 3]),
        "value": st.integers(-5, 5)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.booleans()
        | st.text(max_size=3),
        "metadata": metadata | st.lists(st.integers(), max_size=2),
        "timestamp": st.sampled_from(["2024-01-15T10:30:00Z", "2024-01-15", "soon", 5]),
        "extra": st.integers(),
    },
)


def _wait_sync(predicate: Any, timeout: float, what: str) -> None:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kind=st.sampled_from(["action", "outcome"]), body=candidate)
def test_any_body_is_delivered_exactly_as_sent_or_refused_with_nothing_stored(
    live_stack: LiveStack, kind: str, body: dict[str, Any]
) -> None:
    with httpx.Client(base_url=live_stack.url, timeout=10) as http:
        before = http.get("/v1/status").json()["events"]["received"]
        resp = http.post(
            f"/v1/{kind}s",
            content=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        after = http.get("/v1/status").json()["events"]["received"]
    if resp.status_code == 202:
        event_id = resp.json()["id"]
        _wait_sync(lambda: event_id in live_stack.fake.received, 10, "delivery")
        got = live_stack.fake.received[event_id]
        expected = dict(body)
        expected.setdefault("timestamp", resp.json()["created_at"])
        assert expected == got.body
        assert f"{kind}" == got.kind
        assert before + 1 == after
    else:
        assert 400 == resp.status_code, resp.text
        assert before == after


async def test_a_crashed_background_task_stops_the_service_with_exit_1(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """The store's writer dies of an unexpected error: the service logs why, drains, and
    asks for a non-zero exit instead of running on without a writer."""
    from structlog.testing import capture_logs  # noqa: PLC0415

    sidecar = Sidecar(fast_settings(tmp_path / "data", None))
    await sidecar.start()
    assert sidecar.address is not None
    url = "http://{}:{}".format(*sidecar.address)
    store = sidecar.store
    assert store is not None
    with capture_logs() as logs:
        await store.writer_connection.close()  # the writer's next call fails unexpectedly
        resp = await client.post(f"{url}/v1/actions", json=ACTION)
        assert 503 == resp.status_code
        await wait_until(sidecar._stop_requested.is_set, 10, "stop requested")
    await sidecar.stop()
    assert 1 == sidecar.exit_code
    crashed = [e for e in logs if e["event"] == "background_task_crashed"]
    assert ["store-writer"] == [e["task"] for e in crashed]
