"""The operator's HTTP API (``admin.py``) and the ``Operations`` it is built on: the token
middleware, store errors as API errors, and the API and the database giving the same
answers on the same data."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SidecarFactory, SidecarProcessFactory, wait_until
from tests.test_local_only import JSON, PURGE_ALL, SALVAGE, snapshot, start
from valmi_sidecar.config import Secret, Settings
from valmi_sidecar.events import parse_one
from valmi_sidecar.operations import (
    DeadLetterQuery,
    HttpOperations,
    ImportCounts,
    LocalOperations,
    NotAnsweringError,
    OperationError,
    Operations,
    Target,
    choose,
    salvage_record,
)
from valmi_sidecar.store import DeadLetter, DeadLetterFilter, Store

TOKEN = "tok_admin"
OPERATOR_ROUTES = (
    ("GET", "/v1/ledger"),
    ("GET", "/v1/dead-letters"),
    ("GET", "/v1/dead-letters/summary"),
    ("GET", "/v1/dead-letters/count"),
    ("GET", "/v1/dead-letters/evt_x"),
    ("POST", "/v1/dead-letters/retry"),
    ("POST", "/v1/dead-letters/purge"),
    ("POST", "/v1/salvage"),
)


async def seeded(data_dir: Path) -> None:
    """3 dead letters (2 of agent_a, 1 of agent_b) and 2 queued events, as a sidecar left them."""
    store = await Store.open(data_dir, prune_interval_s=None)
    try:
        bodies = [
            {"agent_key": agent, "action_type": f"type_{i}"}
            for i, agent in enumerate(["agent_a", "agent_a", "agent_b", "agent_c", "agent_c"])
        ]
        await store.submit([parse_one("action", json.dumps(b).encode()) for b in bodies])
        leased = await store.lease(3, frozenset())
        await store.settle([DeadLetter(e.seq, "rejected", 422, "{}") for e in leased])
    finally:
        await store.close()


def salvaged() -> list[Any]:
    """An event as salvage reads it from a moved-aside file."""
    body = json.dumps({"agent_key": "agent_s", "action_type": "salvaged"}).encode()
    return [parse_one("action", body, idem_key="salvage-key-1")]


# --- the token middleware -------------------------------------------------------------


async def test_every_operator_route_requires_the_ingest_token(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Without the token each operator route is a 401; with it, none is. An unknown path
    under /v1/ is a 404 either way."""
    _, url = await sidecar_factory(None, ingest_token=Secret(TOKEN))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for method, path in OPERATOR_ROUTES:
        body: dict[str, Any] | None = (
            {"events": []} if path == "/v1/salvage" else ({} if method == "POST" else None)
        )
        refused = await client.request(method, url + path, json=body)
        assert (401, "unauthorized") == (
            refused.status_code,
            refused.json()["error"]["code"],
        ), path
        allowed = await client.request(method, url + path, json=body, headers=auth)
        assert allowed.status_code in (200, 404), (path, allowed.text)
        if allowed.status_code == 404:
            assert "no dead letter with id evt_x" in allowed.text
    assert 404 == (await client.get(url + "/v1/nothing-here")).status_code


# --- strict parsing -----------------------------------------------------------------


async def test_operator_bodies_are_parsed_as_strictly_as_events(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """A repeated key, an unknown field, a wrong type, or a repeated or unknown query
    parameter is a 400 that purges, re-queues and imports nothing."""
    url, _ = await start(sidecar_process, tmp_path)
    async with httpx.AsyncClient(timeout=10, headers=JSON) as client:
        before = await snapshot(client, url)
        for path in ("/v1/dead-letters/retry", "/v1/dead-letters/purge"):
            for body in (
                PURGE_ALL,
                b'{"reason": "rejected", "reason": "expired"}',
                b'{"agent": "agent_seed"}',
                b'{"agent_key": 5}',
                b'{"limit": "10"}',
                b'{"ids": "evt_1"}',
                b"[]",
            ):
                resp = await client.post(url + path, content=body)
                assert (400, "invalid_request") == (
                    resp.status_code,
                    resp.json()["error"]["code"],
                ), (path, body)
        dup = SALVAGE.replace(b'"kind": "outcome"', b'"kind": "outcome", "kind": "action"')
        for body in (dup, SALVAGE.replace(b'"value": 1000', b'"value": "1000"')):
            resp = await client.post(url + "/v1/salvage", content=body)
            assert 400 == resp.status_code, resp.text
        for query in ("reason=rejected&reason=expired", "agent=agent_seed", "limit=1&limit=2"):
            resp = await client.get(f"{url}/v1/dead-letters?{query}")
            assert 400 == resp.status_code, query
        assert 400 == (await client.get(f"{url}/v1/ledger?since=2026-01-01&bogus=1")).status_code
        assert before == await snapshot(client, url)
        # The same filter given once works.
        resp = await client.post(url + "/v1/dead-letters/purge", content=b'{"agent_key": null}')
        assert {"purged": 3} == resp.json()


# --- store errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/dead-letters/retry", {}),
        ("/v1/dead-letters/purge", {}),
        ("/v1/salvage", {"events": [salvage_record(e) for e in salvaged()]}),
    ],
)
async def test_an_operator_change_cut_off_mid_commit_answers_outcome_unknown(
    sidecar_factory: SidecarFactory,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    path: str,
    body: dict[str, Any],
) -> None:
    """The store closes while the change's commit is held up (another connection holds the
    write lock): it may have been committed, so the answer is 503 outcome_unknown, not
    store_unavailable (which says nothing was written)."""

    from valmi_sidecar.store import core as store_core  # noqa: PLC0415

    monkeypatch.setattr(store_core, "CLOSE_DRAIN_S", 0.2)
    await seeded(tmp_path / "data")  # dead letters to change: the change must write
    sidecar, url = await sidecar_factory(None, data_dir=tmp_path / "data")
    store = sidecar.store
    assert store is not None
    blocker = sqlite3.connect(store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        changing = asyncio.create_task(client.post(url + path, json=body))
        await wait_until(lambda: store.in_transaction, 10, "the commit to start")
        closing = asyncio.create_task(store.close())
        resp = await changing
        blocker.execute("COMMIT")
        await closing
    finally:
        blocker.close()
    assert 503 == resp.status_code, resp.text
    error = resp.json()["error"]
    assert "outcome_unknown" == error["code"]
    assert "Running the same command again is safe" in error["message"]
    assert "Retry-After" in resp.headers


# --- the two implementations ----------------------------------------------------------


def test_a_dead_letter_query_as_the_api_takes_it_and_as_the_store_does() -> None:
    query = DeadLetterQuery(reason="rejected", older_than_s=60.0, ids=("evt_1", "evt_2"))
    assert {"reason": "rejected", "older_than_s": 60.0, "ids": "evt_1,evt_2"} == query.params()
    assert {
        "reason": "rejected",
        "agent_key": None,
        "older_than_s": 60.0,
        "newer_than_s": None,
        "ids": ["evt_1", "evt_2"],
    } == query.body()
    assert DeadLetterFilter(
        reason="rejected", dead_before=940.0, ids=("evt_1", "evt_2"), after_seq=7
    ) == query.filter(1000.0, after_seq=7)
    assert {} == DeadLetterQuery().params()


def test_import_counts_add_up() -> None:
    assert ImportCounts(3, 1, 1) == ImportCounts(1, 1, 0) + ImportCounts(2, 0, 1)


def http_operations(url: str) -> HttpOperations:
    return HttpOperations(url, url, token=None, timeout=10.0, max_body_bytes=1_048_576)


async def read_everything(ops: Operations) -> list[Any]:
    """Every read an operator can make, with a few filters."""
    page = await ops.dead_letters(DeadLetterQuery(), limit=2)
    rest = await ops.dead_letters(DeadLetterQuery(), limit=2, after_seq=page.next_after_seq or 0)
    ids = tuple(d["id"] for d in page.items)
    return [
        await ops.ledger(),
        await ops.ledger(agent_key="agent_a"),
        page,
        rest,
        await ops.dead_letters(DeadLetterQuery(agent_key="agent_b"), limit=10),
        await ops.dead_letter_summary(),
        await ops.count_dead_letters(DeadLetterQuery()),
        await ops.count_dead_letters(DeadLetterQuery(ids=ids[:1])),
        await ops.count_dead_letters(DeadLetterQuery(reason="expired")),
        await ops.count_dead_letters(DeadLetterQuery(newer_than_s=3600.0)),
    ]


async def test_the_api_and_the_database_give_the_same_answers(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """The same reads through a running sidecar and on its database file, read-only."""
    data_dir = tmp_path / "data"
    await seeded(data_dir)
    url = await sidecar_process(None, data_dir=data_dir).wait_ready()
    api = http_operations(url)
    local = LocalOperations.of_file(data_dir / "queue.db", "the file")
    try:
        through_api = await read_everything(api)
        on_file = await read_everything(local)
    finally:
        await api.aclose()
        await local.aclose()
    assert 3 == through_api[6]
    assert through_api == on_file


@pytest.fixture(params=["http", "local"])
async def operations(
    request: pytest.FixtureRequest, sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> AsyncIterator[Operations]:
    """Operations on a seeded data directory: through a running sidecar, or on the file
    with no sidecar running (the store opened for writes)."""
    data_dir = tmp_path / "data"
    await seeded(data_dir)
    ops: Operations
    if request.param == "http":
        ops = http_operations(await sidecar_process(None, data_dir=data_dir).wait_ready())
    else:
        settings = Settings(data_dir=data_dir)
        ops = LocalOperations.of_file(data_dir / "queue.db", "the file", settings=settings)
    try:
        yield ops
    finally:
        await ops.aclose()


async def test_operations_change_the_data_the_same_way(operations: Operations) -> None:
    """Re-queue, purge and import answer alike through the API and on the file."""
    ops = operations
    first = (await ops.dead_letters(DeadLetterQuery(), limit=1)).items[0]
    assert 1 == await ops.requeue_dead_letters(DeadLetterQuery(ids=(first["id"],)), 10)
    assert 0 == await ops.requeue_dead_letters(DeadLetterQuery(ids=(first["id"],)), 10)
    assert 1 == await ops.purge_dead_letters(DeadLetterQuery(agent_key="agent_a"), 10)
    assert 1 == await ops.count_dead_letters(DeadLetterQuery())
    assert ImportCounts(imported=1) == await ops.import_events(salvaged())
    assert ImportCounts(duplicates=1) == await ops.import_events(salvaged())
    ledger = await ops.ledger()
    assert {"received": 6, "queued": 4, "delivered": 0, "dead_lettered": 2} == {
        k: ledger["totals"][k] for k in ("received", "queued", "delivered", "dead_lettered")
    }
    summary = await ops.dead_letter_summary()
    assert [("rejected", 1)] == [(r["reason"], r["count"]) for r in summary["reasons"]]
    assert 2 == summary["dead_lettered"]


# --- choosing the implementation ------------------------------------------------------


def refused_url() -> str:
    """A loopback address where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_choose_asks_the_api_when_it_answers_and_the_file_when_nothing_listens(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "stopped"
    await seeded(data_dir)
    settings = Settings(data_dir=data_dir)
    told: list[str] = []
    local = await choose(Target(settings, refused_url(), 5.0), "/v1/ledger", announce=told.append)
    try:
        assert isinstance(local, LocalOperations)
        assert [f"{data_dir / 'queue.db'} (no sidecar running)"] == told
        assert 3 == await local.count_dead_letters(DeadLetterQuery())
    finally:
        await local.aclose()
    _, url = await sidecar_factory(None)
    api = await choose(Target(settings, url, 5.0, "--url"), "/v1/ledger", announce=told.append)
    try:
        assert isinstance(api, HttpOperations)
        await api.ledger()
        assert f"{url} (--url)" == told[-1]
    finally:
        await api.aclose()


async def test_choose_refuses_a_held_data_directory_that_nothing_answers_for(
    tmp_path: Path,
) -> None:
    """A sidecar holds the directory but listens elsewhere: reading its file would show
    numbers that are already stale, so the command says to give the address."""
    store = await Store.open(tmp_path / "data", prune_interval_s=None)
    try:
        base = refused_url()
        target = Target(Settings(data_dir=tmp_path / "data"), base, 5.0)
        with pytest.raises(OperationError, match="pass --url with its listen address"):
            await choose(target, "/v1/ledger", announce=None)
    finally:
        await store.close()


async def test_choose_with_nothing_running_and_no_database_says_what_to_do(
    tmp_path: Path,
) -> None:
    target = Target(Settings(data_dir=tmp_path / "none"), refused_url(), 5.0)
    with pytest.raises(OperationError, match="is `valmi-sidecar run` running"):
        await choose(target, "/v1/ledger", announce=None)


async def test_a_sidecar_that_stops_answering_mid_command_says_to_run_it_again() -> None:
    api = http_operations(refused_url())
    try:
        with pytest.raises(NotAnsweringError, match="run the command again"):
            await api.count_dead_letters(DeadLetterQuery())
    finally:
        await api.aclose()
