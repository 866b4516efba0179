"""Ingest over several processes (``ingest_processes`` > 1): the same API, the same
answers and guarantees, served by worker processes that pass every event to the main
process's store. Real worker processes, a real fake Valmi API, real signals."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from valmi_sidecar.channel import (
    Failed,
    Hello,
    Ready,
    Submit,
    WorkerSettings,
    read_frame,
    write_frame,
)
from valmi_sidecar.config import ConfigError, Secret, load_settings
from valmi_sidecar.events import parse_one
from valmi_sidecar.fake_api import FakeValmi
from valmi_sidecar.service import Sidecar
from valmi_sidecar.store import OutcomeUnknownError, StoreError
from valmi_sidecar.workers import MainLink, listen_sockets

from .conftest import (
    ACTION,
    OUTCOME,
    SidecarFactory,
    SidecarProcessFactory,
    fast_settings,
    wait_until,
)
from .scenarios import SECRET_KEY, Traffic, hostile_fake, sidecar_env
from .test_metrics import scrape, value


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _worker_pids(sidecar: Sidecar) -> list[int]:
    workers = sidecar.workers
    assert workers is not None
    return workers.pids()


def _queued_ids(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "queue.db") as db:
        return [r[0] for r in db.execute("SELECT id FROM events")]


async def test_workers_serve_the_whole_api_with_the_same_answers(
    sidecar_factory: SidecarFactory, fake: FakeValmi, client: httpx.AsyncClient
) -> None:
    sidecar, url = await sidecar_factory(fake.url, ingest_processes=2)
    pids = _worker_pids(sidecar)
    assert len(pids) == 2
    assert os.getpid() not in pids
    assert all(_alive(p) for p in pids)

    # 200 events from 20 clients at once: every one answered 202 after its commit, with
    # its own id, and delivered once.
    async def post(i: int) -> str:
        body = {**ACTION, "metadata": {"i": i}} if i % 2 else {**OUTCOME, "value": i}
        path = "/v1/actions" if i % 2 else "/v1/outcomes"
        resp = await client.post(url + path, json=body)
        assert resp.status_code == 202, resp.text
        assert resp.json()["status"] == "queued"
        return str(resp.json()["id"])

    ids = await asyncio.gather(*(post(i) for i in range(200)))
    assert len(set(ids)) == 200
    batch = await client.post(url + "/v1/batch", json={"actions": [ACTION], "outcomes": [OUTCOME]})
    assert batch.status_code == 202, batch.text
    ids += [e["id"] for e in batch.json()["events"]]
    await fake.wait_until(lambda: len(fake.received) == 202, timeout_s=20)
    assert sorted(r.idem_key or "" for r in fake.received.values()) == sorted(ids)

    # The operator routes are the main process's, passed on unchanged.
    status = (await client.get(url + "/v1/status")).json()
    assert status["events"]["received"] == 202
    assert (await client.get(url + "/readyz")).json() == {"status": "ready"}
    assert (await client.get(url + "/healthz")).status_code == 200
    assert (await client.get(url + "/openapi.json")).json()["openapi"].startswith("3.1")
    listed = await client.get(url + "/v1/dead-letters", params={"limit": "5"})
    assert listed.status_code == 200, listed.text
    wrong = await client.get(url + "/v1/actions")
    assert wrong.status_code == 405
    assert "POST" in wrong.headers["Allow"]
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert (await client.get(url + "/nowhere")).json()["error"]["code"] == "not_found"

    # Refusals made in a worker: the same error shape, and counted in /metrics.
    bad = await client.post(url + "/v1/actions", json={"agent_key": "a"})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_request"
    assert bad.json()["error"]["details"][0]["field"] == "action_type"

    async def refused_counted() -> bool:
        samples, _ = await scrape(client, url)
        return value(samples, "valmi_sidecar_refused_requests_total", reason="invalid_request") == 1

    await wait_until(refused_counted, 10, "the worker's refusal in /metrics")
    samples, _ = await scrape(client, url)
    assert value(samples, "valmi_sidecar_ingest_workers") == 2
    assert value(samples, "valmi_sidecar_ingest_workers_running") == 2
    assert samples[("valmi_sidecar_ingest_worker_restarts_total", ())] == 0


async def test_workers_listen_on_every_address_the_host_names(
    sidecar_factory: SidecarFactory,
    fake: FakeValmi,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``listen = localhost:PORT`` takes 127.0.0.1 and ::1 where localhost names both, as
    the one-process sidecar does; an agent that connects to ::1 is not refused. This
    machine's hosts file names only 127.0.0.1 for localhost, so the resolver is faked."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    real = socket.getaddrinfo

    def resolve(host: str | None, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":
            return real("127.0.0.1", port, *args, **kwargs) + real("::1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    sidecar, _ = await sidecar_factory(fake.url, ingest_processes=2, listen="localhost:0")
    assert sidecar.address is not None
    port = sidecar.address[1]
    for base in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
        resp = await client.post(base + "/v1/actions", json=ACTION)
        assert resp.status_code == 202, (base, resp.text)
        assert (await client.get(base + "/readyz")).status_code == 200
    await fake.wait_until(lambda: len(fake.received) == 2, timeout_s=10)


async def test_idempotency_and_queue_limits_hold_across_workers(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    sidecar, url = await sidecar_factory(None, ingest_processes=2, max_queue_events=3)
    # The same key from 20 connections at once (the kernel spreads them over the
    # workers): one event.
    headers = {"Idempotency-Key": "order-1"}
    answers = await asyncio.gather(
        *(client.post(url + "/v1/actions", json=ACTION, headers=headers) for _ in range(20))
    )
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 19
    reused = await client.post(
        url + "/v1/actions", json={**ACTION, "action_type": "other"}, headers=headers
    )
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "idempotency_key_reused"

    for _ in range(2):
        assert (await client.post(url + "/v1/actions", json=ACTION)).status_code == 202
    full = await client.post(url + "/v1/actions", json=ACTION)
    assert full.status_code == 503
    assert full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["Retry-After"]) > 0
    assert sidecar.store is not None
    assert sidecar.store.counts().queued == 3


async def test_the_ingest_token_is_checked_in_the_workers_and_the_main_process(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory(None, ingest_processes=2, ingest_token=Secret("tok-123"))
    assert (await client.post(url + "/v1/actions", json=ACTION)).status_code == 401
    assert (await client.get(url + "/v1/status")).status_code == 401
    auth = {"Authorization": "Bearer tok-123"}
    assert (await client.post(url + "/v1/actions", json=ACTION, headers=auth)).status_code == 202
    assert (await client.get(url + "/v1/status", headers=auth)).status_code == 200


async def test_a_worker_that_dies_is_started_again_and_nothing_acknowledged_is_lost(
    sidecar_factory: SidecarFactory, fake: FakeValmi, client: httpx.AsyncClient
) -> None:
    sidecar, url = await sidecar_factory(fake.url, ingest_processes=2)
    traffic = Traffic("worker_kill")
    stop = asyncio.Event()
    posting = asyncio.create_task(
        traffic.run_agents(client, lambda: url, agents=8, until=stop.is_set, max_events=100_000)
    )
    await wait_until(lambda: len(traffic.acked) >= 100, 20, "100 events acknowledged")
    victim = _worker_pids(sidecar)[0]
    os.kill(victim, signal.SIGKILL)

    async def restarted(scraper: httpx.AsyncClient) -> bool:
        samples, _ = await scrape(scraper, url)
        return (
            value(samples, "valmi_sidecar_ingest_worker_restarts_total") == 1
            and value(samples, "valmi_sidecar_ingest_workers_running") == 2
        )

    # A client of its own, opened after the kill: the agents' pool still holds
    # connections to the killed worker, and a GET sent on one of them fails.
    async with httpx.AsyncClient(timeout=10.0) as scraper:
        await wait_until(lambda: restarted(scraper), 20, "the killed worker started again")
    assert victim not in _worker_pids(sidecar)
    acked = len(traffic.acked)
    await wait_until(lambda: len(traffic.acked) >= acked + 100, 20, "ingest after the restart")
    stop.set()
    await posting
    assert await traffic.settle(fake, 20), "an acknowledged event was not delivered"
    traffic.ledger(fake).check()


async def test_a_worker_that_cannot_start_stops_the_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's interpreter finds a broken package first: it exits at once, and
    # start() says so instead of waiting, and leaves nothing open or running.
    broken = tmp_path / "broken" / "valmi_sidecar"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))
    sidecar = Sidecar(fast_settings(tmp_path / "data", None, ingest_processes=2))
    with pytest.raises(OSError, match=r"exited before it listened \(exit code 3"):
        await asyncio.wait_for(sidecar.start(), 20)
    assert sidecar.workers is not None
    assert sidecar.workers.pids() == []
    monkeypatch.delenv("PYTHONPATH")
    # The data directory was let go: a sidecar starts on it.
    again = Sidecar(fast_settings(tmp_path / "data", None))
    await again.start()
    await again.stop()


async def test_a_worker_whose_main_process_dies_before_answering_says_the_outcome_is_unknown(
    tmp_path: Path,
) -> None:
    """The main process took the submission and died without answering: it may have
    committed it, so the worker answers ``503 outcome_unknown`` and says to retry with the
    same key, never "nothing was stored". A real worker process and real sockets; the
    test plays the main process on the worker's channel, so it knows the submission
    arrived before it closes the channel."""
    (listener,) = listen_sockets("127.0.0.1", 0)
    mine, theirs = socket.socketpair()
    fds = (listener.fileno(), theirs.fileno())
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "valmi_sidecar.workers",
        *map(str, fds),
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
    )
    theirs.close()
    try:
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        s = dataclasses.replace(fast_settings(tmp_path / "data", None), log_format="json")
        write_frame(writer, Hello(WorkerSettings.of(s), index=1, ops_port=9))
        assert Ready() == await asyncio.wait_for(read_frame(reader), 30)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        async with httpx.AsyncClient(timeout=10.0) as client:
            keyed, bare = (
                asyncio.create_task(client.post(url + "/v1/actions", json=ACTION, headers=h))
                for h in ({"Idempotency-Key": "order-7"}, {})
            )
            submitted = 0
            while submitted < 2:
                frame = await asyncio.wait_for(read_frame(reader), 10)
                assert isinstance(frame, Submit)
                submitted += len(frame.items)
            writer.close()  # the main process dies with both unanswered
            answers = [await keyed, await bare]
        for resp in answers:
            assert 503 == resp.status_code, resp.text
            assert int(resp.headers["Retry-After"]) > 0
            err = resp.json()["error"]
            assert "outcome_unknown" == err["code"]
            assert "they may be" in err["message"]
            assert "nothing was stored" not in err["message"]
        assert "Retry with the same Idempotency-Key" in answers[0].json()["error"]["message"]
        assert "no Idempotency-Key" in answers[1].json()["error"]["message"]
        assert 1 == await asyncio.wait_for(worker.wait(), 30)  # it lost its main process
    finally:
        listener.close()
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


async def test_a_worker_tells_a_submission_it_never_sent_from_one_left_unanswered() -> None:
    """Over a real socket pair: a submission still waiting to be written when the main
    process goes was not stored (``StoreError``); an ``unknown`` or ``internal`` answer
    from the main process may have been (``OutcomeUnknownError``)."""
    mine, theirs = socket.socketpair()
    _, writer = await asyncio.open_unix_connection(sock=mine)
    main_reader, main_writer = await asyncio.open_unix_connection(sock=theirs)
    event = parse_one("action", b'{"agent_key": "a", "action_type": "x"}')
    try:
        link = MainLink(writer)
        answered = [link.submit_soon([event]) for _ in range(2)]
        frame = await asyncio.wait_for(read_frame(main_reader), 10)
        assert isinstance(frame, Submit)
        assert [0, 1] == [item.rid for item in frame.items]
        link.answered(
            [Failed(0, "unknown", "the store stopped"), Failed(1, "internal", "KeyError")]
        )
        for future in answered:
            with pytest.raises(OutcomeUnknownError):
                await future
        unsent = link.submit_soon([event])  # queued for this loop pass's frame, not yet written
        link.close("its channel closed")
        with pytest.raises(StoreError) as info:
            await unsent
        assert not isinstance(info.value, OutcomeUnknownError)
    finally:
        writer.close()
        main_writer.close()


def test_ingest_processes_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"ingest_processes .*33 is more than 32"):
        load_settings(env={"VALMI_SIDECAR_INGEST_PROCESSES": "33"})
    with pytest.raises(ConfigError, match="must be greater than 0"):
        load_settings(env={"VALMI_SIDECAR_INGEST_PROCESSES": "0"})
    assert load_settings(env={"VALMI_SIDECAR_INGEST_PROCESSES": "4"}).ingest_processes == 4


# --- the sidecar as a real process --------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[FakeValmi]:
    async with hostile_fake() as api:
        yield api


def _workers_started(events: list[dict[str, Any]]) -> list[int]:
    for ev in events:
        if ev.get("event") == "ingest_workers_started":
            return [int(p) for p in ev["pids"]]
    raise AssertionError("no ingest_workers_started line")


async def test_sigterm_drains_the_workers_then_the_main_process(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, tmp_path: Path
) -> None:
    upstream.set_faults(latency_s=0.05)
    proc = sidecar_process(upstream.url, **sidecar_env(VALMI_SIDECAR_INGEST_PROCESSES="2"))
    url = await proc.wait_ready()
    pids = _workers_started(proc.log_events())
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as fh:  # noqa: ASYNC230
            environ = fh.read()
        assert SECRET_KEY.encode() not in environ, "a worker holds the API key"
    traffic = Traffic("workers_sigterm")
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=5.0) as client:
        posting = asyncio.create_task(
            traffic.run_agents(client, lambda: url, agents=8, until=stop.is_set, max_events=50_000)
        )
        await wait_until(lambda: len(traffic.acked) >= 200, 20, "200 events acknowledged")
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0, proc.log_text()
        stop.set()
        await posting
    assert not any(_alive(p) for p in pids), "a worker outlived the sidecar"
    names = [ev.get("event") for ev in proc.log_events()]
    assert "ingest_worker_exited" not in names
    assert names.index("shutdown_started") < names.index("store_closed")
    # Every acknowledged event is delivered or still queued, once.
    delivered = {r.idem_key for r in upstream.received.values()}
    queued = set(_queued_ids(tmp_path / "data"))
    assert not delivered & queued
    missing = [i for i in traffic.acked.values() if i not in delivered | queued]
    assert missing == []


async def test_sigkill_of_the_main_process_stops_the_workers(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, tmp_path: Path
) -> None:
    proc = sidecar_process(None, VALMI_SIDECAR_INGEST_PROCESSES="2")
    url = await proc.wait_ready()
    pids = _workers_started(proc.log_events())
    traffic = Traffic("workers_sigkill")
    async with httpx.AsyncClient(timeout=5.0) as client:
        for seq in range(50):
            assert await traffic.post(client, url, seq)
        proc.signal(signal.SIGKILL)
        assert await proc.wait_exit(10) == -signal.SIGKILL
        await wait_until(lambda: not any(_alive(p) for p in pids), 10, "the workers to stop")
        with pytest.raises(httpx.ConnectError):
            await client.get(url + "/healthz")
    # Everything acknowledged is in the database, for the next start.
    assert sorted(_queued_ids(tmp_path / "data")) == sorted(traffic.acked.values())
    again = sidecar_process(upstream.url, **sidecar_env(VALMI_SIDECAR_INGEST_PROCESSES="2"))
    await again.wait_ready()
    await upstream.wait_until(lambda: len(upstream.received) == 50, timeout_s=20)
    again.signal(signal.SIGTERM)
    assert await again.wait_exit(30) == 0
    assert sorted(r.idem_key or "" for r in upstream.received.values()) == sorted(
        traffic.acked.values()
    )
