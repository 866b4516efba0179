"""The ops listener (``ops_listen``): ``/metrics``, ``/healthz`` and ``/readyz`` on an
address of their own, for kubelet probes and Prometheus; nothing that takes or shows
events, any ``Host``, never a web page."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from valmi_sidecar.config import ConfigError, Secret, load_settings
from valmi_sidecar.guard import Policy

from .conftest import (
    ACTION,
    DEFAULT_KEY,
    SidecarFactory,
    SidecarProcessFactory,
    occupied_port,
    wait_until,
)

if TYPE_CHECKING:
    from valmi_sidecar.fake_api import FakeValmi

HOME = {"HOME": "/home/test"}
#: The Host header a kubelet probe sends: the pod's IP and the probe's port.
POD_HOST = "10.244.1.17:9787"


def ops_url(sidecar: object) -> str:
    address = getattr(sidecar, "ops_address", None)
    assert address is not None, "the ops listener is not listening"
    host, port = address
    return f"http://{host}:{port}"


async def test_ops_listener_is_off_by_default(sidecar_factory: SidecarFactory) -> None:
    sidecar, _ = await sidecar_factory(None)
    assert sidecar.ops_address is None


async def test_ops_listener_serves_probes_and_metrics(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    sidecar, _ = await sidecar_factory(None, ops_listen="127.0.0.1:0")
    ops = ops_url(sidecar)
    r = await client.get(ops + "/healthz")
    assert (200, {"status": "alive"}) == (r.status_code, r.json())
    r = await client.get(ops + "/readyz")
    assert (200, {"status": "ready"}) == (r.status_code, r.json())
    r = await client.get(ops + "/metrics")
    assert 200 == r.status_code
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert "valmi_sidecar_ready" in names


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/actions"),
        ("POST", "/v1/outcomes"),
        ("POST", "/v1/batch"),
        ("GET", "/v1/status"),
        ("GET", "/v1/ledger"),
        ("GET", "/v1/dead-letters"),
        ("GET", "/v1/dead-letters/summary"),
        ("POST", "/v1/dead-letters/retry"),
        ("POST", "/v1/dead-letters/purge"),
        ("POST", "/v1/salvage"),
        ("GET", "/openapi.json"),
    ],
)
async def test_ops_listener_serves_no_event_status_or_operator_route(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient, method: str, path: str
) -> None:
    """404 in the one error shape, and nothing stored: the same routes work on listen."""
    sidecar, _ = await sidecar_factory(None, ops_listen="127.0.0.1:0")
    body = ACTION if method == "POST" else None
    r = await client.request(method, ops_url(sidecar) + path, json=body)
    assert 404 == r.status_code
    assert "not_found" == r.json()["error"]["code"]
    assert sidecar.store is not None
    assert 0 == sidecar.store.counts().received


async def test_ops_listener_takes_any_host_the_local_api_does_not(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """A kubelet probe names the pod IP in Host: the ops listener answers it; the local API
    (no ingest token) still refuses it as a possible DNS rebinding."""
    sidecar, url = await sidecar_factory(None, ops_listen="127.0.0.1:0")
    headers = {"Host": POD_HOST}
    for path in ("/healthz", "/readyz", "/metrics"):
        assert 200 == (await client.get(ops_url(sidecar) + path, headers=headers)).status_code
    r = await client.get(url + "/readyz", headers=headers)
    assert (403, "host_not_allowed") == (r.status_code, r.json()["error"]["code"])


async def test_ops_listener_refuses_a_web_page_and_counts_it(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """An Origin is refused even when the local API allows it: no page reads the ops port."""
    sidecar, url = await sidecar_factory(
        None, ops_listen="127.0.0.1:0", allowed_origins=("http://localhost:3000",)
    )
    ops = ops_url(sidecar)
    for headers in ({"Origin": "http://localhost:3000"}, {"Sec-Fetch-Site": "cross-site"}):
        r = await client.get(ops + "/metrics", headers=headers)
        assert (403, "origin_not_allowed") == (r.status_code, r.json()["error"]["code"])
        assert "Access-Control-Allow-Origin" not in r.headers
    r = await client.get(url + "/metrics")
    assert 'valmi_sidecar_refused_requests_total{reason="origin_not_allowed"} 2.0' in r.text


async def test_no_agent_key_or_secret_in_any_metric(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Events of several agents delivered, refused and queued: neither /metrics names an
    agent key (no label carries one), the API key or the ingest token."""
    token = "tok_never_in_metrics_42"
    sidecar, url = await sidecar_factory(
        fake.url, ops_listen="127.0.0.1:0", ingest_token=Secret(token)
    )
    auth = {"Authorization": f"Bearer {token}"}
    agents = [f"agent_label_leak_{i}" for i in range(3)]
    for agent in agents:
        r = await client.post(
            url + "/v1/actions", json={**ACTION, "agent_key": agent}, headers=auth
        )
        assert 202 == r.status_code
    await wait_until(
        lambda: sidecar.store is not None and sidecar.store.counts().delivered == 3,
        what="3 delivered",
    )
    fake.faults.error_rate, fake.faults.error_status = 1.0, 400
    r = await client.post(
        url + "/v1/actions", json={**ACTION, "agent_key": "agent_dead"}, headers=auth
    )
    assert 202 == r.status_code
    # A refusal is judged the event's own once another event is delivered after it.
    await wait_until(lambda: fake.requests >= 4, what="the refused attempt")
    fake.faults.error_rate = 0.0
    r = await client.post(
        url + "/v1/actions", json={**ACTION, "agent_key": agents[0]}, headers=auth
    )
    assert 202 == r.status_code
    await wait_until(
        lambda: sidecar.store is not None and sidecar.store.counts().dead_lettered == 1,
        what="1 dead letter",
    )
    for base in (url, ops_url(sidecar)):
        text = (await client.get(base + "/metrics")).text
        assert "valmi_sidecar_dead_letters 1.0" in text
        for secret in (*agents, "agent_dead", "agent_", DEFAULT_KEY, token):
            assert secret not in text


async def test_ops_listener_answers_through_the_drain(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Upstream down, so the final flush takes final_flush_s: meanwhile the local API is
    closed but the ops listener says alive, not ready (shutting down), and serves metrics;
    it closes once the drain is over."""
    sidecar, url = await sidecar_factory(fake.url, ops_listen="127.0.0.1:0", final_flush_s=3.0)
    await fake.go_down()
    assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    ops = ops_url(sidecar)
    stopping = asyncio.create_task(sidecar.stop())
    try:

        async def local_api_closed() -> bool:
            try:
                await client.get(url + "/healthz")
            except httpx.TransportError:
                return True
            return False

        await wait_until(local_api_closed, 10.0, "the local API closed")
        assert not stopping.done(), "the final flush should still run"
        assert 200 == (await client.get(ops + "/healthz")).status_code
        r = await client.get(ops + "/readyz")
        assert (503, ["shutting down"]) == (r.status_code, r.json()["reasons"])
        r = await client.get(ops + "/metrics")
        assert "valmi_sidecar_ready 0.0" in r.text
        assert 'valmi_sidecar_events_current{state="queued"} 1.0' in r.text
    finally:
        await stopping
    async with httpx.AsyncClient() as fresh:
        with pytest.raises(httpx.ConnectError):
            await fresh.get(ops + "/healthz")


def test_ops_policy_checks_no_host_and_allows_no_origin() -> None:
    policy = Policy.ops()
    assert policy.refusal("GET", {"Host": POD_HOST}) is None
    assert policy.refusal("GET", {"Host": "attacker.example"}) is None
    for headers in (
        {"Origin": "http://localhost:3000"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "same-site"},
    ):
        refusal = policy.refusal("GET", {"Host": POD_HOST, **headers})
        assert refusal is not None
        assert (403, "origin_not_allowed") == (refusal.status, refusal.code)


# --- settings ---------------------------------------------------------------------------


def test_ops_listen_may_bind_beyond_loopback_without_a_token() -> None:
    s = load_settings(env={**HOME, "VALMI_SIDECAR_OPS_LISTEN": "0.0.0.0:9787"})
    assert "0.0.0.0:9787" == s.ops_listen
    assert s.ingest_token is None


def test_ops_listen_is_off_when_empty(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('ops_listen = ""\n')
    assert "" == load_settings(env=HOME, config_file=cfg).ops_listen
    assert "" == load_settings(env=HOME).ops_listen


@pytest.mark.parametrize("value", ["9787", "host:", "0.0.0.0:99999", "[::1]"])
def test_malformed_ops_listen_is_an_error(value: str) -> None:
    with pytest.raises(ConfigError, match=r"--ops-listen: .* is not HOST:PORT"):
        load_settings(env=HOME, argv_overrides={"ops_listen": value})


@pytest.mark.parametrize(
    ("listen", "ops"),
    [
        ("127.0.0.1:8787", "127.0.0.1:8787"),
        ("127.0.0.1:8787", "0.0.0.0:8787"),
        ("[::1]:8787", "[::]:8787"),
    ],
)
def test_ops_listen_on_the_listen_port_is_an_error(listen: str, ops: str) -> None:
    with pytest.raises(ConfigError, match=r"ops_listen .* same port as listen"):
        load_settings(env=HOME, argv_overrides={"listen": listen, "ops_listen": ops})


# --- the real process -----------------------------------------------------------------


async def test_process_serves_ops_on_all_interfaces_with_ingest_workers(
    sidecar_process: SidecarProcessFactory, client: httpx.AsyncClient
) -> None:
    """``--ops-listen 0.0.0.0:0`` without a token, two ingest workers: the main process
    alone serves it (it reports the workers) and the process still stops cleanly."""
    p = sidecar_process(VALMI_SIDECAR_OPS_LISTEN="0.0.0.0:0", VALMI_SIDECAR_INGEST_PROCESSES="2")
    await p.wait_ready()
    ready = next(e for e in p.log_events() if e.get("event") == "sidecar_ready")
    port = int(str(ready["ops_listen"]).rpartition(":")[2])
    ops = f"http://127.0.0.1:{port}"
    r = await client.get(ops + "/readyz", headers={"Host": POD_HOST})
    assert 200 == r.status_code, r.text

    async def workers_reported() -> bool:
        text = (await client.get(ops + "/metrics")).text
        return "valmi_sidecar_ingest_workers_running 2.0" in text

    await wait_until(workers_reported, 20.0, "2 ingest workers in the ops listener's metrics")
    assert 404 == (await client.post(ops + "/v1/actions", json=ACTION)).status_code
    p.signal(signal.SIGTERM)
    assert 0 == await p.wait_exit()


async def test_process_with_ops_port_taken_exits_1_naming_the_setting(
    sidecar_process: SidecarProcessFactory,
) -> None:
    with occupied_port() as port:
        p = sidecar_process(VALMI_SIDECAR_OPS_LISTEN=f"127.0.0.1:{port}")
        assert 1 == await p.wait_exit()
    failed = next(e for e in p.log_events() if e.get("event") == "startup_failed")
    assert f"ops_listen '127.0.0.1:{port}'" in failed["error"]
