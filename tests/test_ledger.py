"""The ledger: per agent key, event type and UTC day, kept in the events' transactions;
its totals reconcile exactly with the event counts, through outages, dead letters, re-queues,
restarts and pruned keys."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tests.conftest import SidecarFactory, wait_until
from valmi_sidecar.store import utc_day

if TYPE_CHECKING:
    from valmi_sidecar.fake_api import FakeValmi
    from valmi_sidecar.service import Sidecar

AGENTS = ("agent_alpha", "agent_beta")


def action(agent: str, action_type: str) -> dict[str, Any]:
    return {"agent_key": agent, "action_type": action_type}


def outcome(agent: str, outcome_type: str, value: float) -> dict[str, Any]:
    return {"agent_key": agent, "outcome_type": outcome_type, "value": value}


async def post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    path = "/v1/outcomes" if "outcome_type" in body else "/v1/actions"
    r = await client.post(url + path, json=body)
    assert 202 == r.status_code, r.text


async def status(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    data: dict[str, Any] = (await client.get(url + "/v1/status")).json()
    return data


async def ledger(client: httpx.AsyncClient, url: str, **params: str) -> dict[str, Any]:
    r = await client.get(url + "/v1/ledger", params=params)
    assert 200 == r.status_code, r.text
    data: dict[str, Any] = r.json()
    return data


def assert_reconciles(book: dict[str, Any], events: dict[str, Any]) -> None:
    totals = book["totals"]
    for name in ("received", "queued", "delivered", "dead_lettered"):
        assert events[name] == totals[name], name
        assert totals[name] == sum(r[name] for r in book["rows"]), name
    for r in book["rows"]:
        assert r["received"] == r["queued"] + r["delivered"] + r["dead_lettered"]


async def test_ledger_reconciles_after_an_outage_dead_letters_and_a_retry(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Through a 400 spell, an outage and a re-queue, ledger totals equal the counts and
    what the fake API received, values included."""
    sidecar, url = await sidecar_factory(fake.url)
    sent_values = 0.0

    # 1. Upstream refuses for good: these outcomes become dead letters, once other events
    #    are delivered (until then they are held, still queued).
    fake.faults.error_rate, fake.faults.error_status = 1.0, 400
    for i in range(4):
        await post(client, url, outcome(AGENTS[0], "refund", 2.5 + i))
        sent_values += 2.5 + i
    await wait_until(lambda: 4 == fake.status_counts.get(400, 0), what="4 refusals")
    fake.faults.error_rate = 0.0

    # 2. An outage: everything queues, then drains once upstream is back.
    await fake.go_down()
    for i in range(12):
        await post(client, url, action(AGENTS[i % 2], "llm_call" if i % 3 else "tool_call"))
    for i in range(6):
        await post(client, url, outcome(AGENTS[i % 2], "successful_hire", 1 + i / 4))
        sent_values += 1 + i / 4
    queued_mid = (await status(client, url))["events"]["queued"]
    assert queued_mid >= 1
    mid = await ledger(client, url)
    assert_reconciles(mid, (await status(client, url))["events"])
    await fake.go_up()
    await wait_until(
        lambda: (
            sidecar.store is not None
            and (18, 4) == (sidecar.store.counts().delivered, sidecar.store.counts().dead_lettered)
        ),
        timeout=20,
        what="queue drained and settled",
    )

    events = (await status(client, url))["events"]
    assert (22, 0, 18, 4) == (
        events["received"],
        events["queued"],
        events["delivered"],
        events["dead_lettered"],
    )
    book = await ledger(client, url)
    assert_reconciles(book, events)
    assert len(fake.events()) == book["totals"]["delivered"]
    delivered_value = sum(e.body["value"] for e in fake.events("outcome"))
    assert delivered_value == book["totals"]["outcome_value"]["delivered"]
    assert sent_values == book["totals"]["outcome_value"]["received"]
    assert sent_values - delivered_value == book["totals"]["outcome_value"]["dead_lettered"]
    refunds = [r for r in book["rows"] if r["event_type"] == "refund"]
    assert 1 == len(refunds)
    assert (4, 4, utc_day(time.time())) == (
        refunds[0]["received"],
        refunds[0]["dead_lettered"],
        refunds[0]["day"],
    )
    assert sum(range(4)) + 4 * 2.5 == refunds[0]["value"]["dead_lettered"]

    # 3. A re-queued dead letter moves from dead_lettered to queued, then to delivered,
    #    with its original idempotency key.
    listed = (await client.get(url + "/v1/dead-letters")).json()["dead_letters"]
    keys = {d["idempotency_key"] for d in listed}
    assert 4 == len(keys)
    r = await client.post(url + "/v1/dead-letters/retry", json={"reason": "rejected"})
    assert {"requeued": 4} == r.json()
    await wait_until(
        lambda: sidecar.store is not None and sidecar.store.counts().delivered == 22,
        what="re-queued events delivered and settled",
    )
    assert keys <= {e.idem_key for e in fake.events()}
    events = (await status(client, url))["events"]
    assert (22, 0, 22, 0) == (
        events["received"],
        events["queued"],
        events["delivered"],
        events["dead_lettered"],
    )
    book = await ledger(client, url)
    assert_reconciles(book, events)
    assert sent_values == book["totals"]["outcome_value"]["delivered"]


async def test_ledger_outlives_restarts_and_pruned_keys(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Delivered events and their keys are gone from the database; the ledger keeps them."""
    data_dir = tmp_path / "ledger-data"
    sidecar, url = await sidecar_factory(fake.url, data_dir=data_dir, dedup_window_s=0.0)
    for i in range(5):
        await post(client, url, action(AGENTS[0], "embedding"))
        await post(client, url, outcome(AGENTS[1], "ticket_closed", float(i)))
    await wait_until(lambda: 10 == len(fake.events()), what="10 delivered")
    await wait_until(
        lambda: sidecar.store is not None and sidecar.store.counts().delivered == 10,
        what="settled",
    )
    assert sidecar.store is not None
    assert 10 == await sidecar.store.prune()  # every key past the (zero) window
    before = await ledger(client, url)
    await sidecar.stop()

    _, url2 = await sidecar_factory(fake.url, data_dir=data_dir)
    after = await ledger(client, url2)
    assert before == after
    assert 10 == after["totals"]["delivered"]
    assert 10.0 == after["totals"]["outcome_value"]["delivered"]
    assert_reconciles(after, (await status(client, url2))["events"])


async def test_ledger_filters_by_agent_key_and_day(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """agent_key, since and until select rows; a malformed day is a 400."""
    _, url = await sidecar_factory(None)
    await post(client, url, action(AGENTS[0], "llm_call"))
    await post(client, url, action(AGENTS[1], "llm_call"))
    await post(client, url, action(AGENTS[1], "tool_call"))
    today = utc_day(time.time())

    only_beta = await ledger(client, url, agent_key=AGENTS[1])
    assert {AGENTS[1]} == {r["agent_key"] for r in only_beta["rows"]}
    assert 2 == only_beta["totals"]["received"]
    assert 2 == only_beta["totals"]["queued"]
    assert 3 == (await ledger(client, url, since=today, until=today))["totals"]["received"]
    assert [] == (await ledger(client, url, since="2999-01-01"))["rows"]
    assert [] == (await ledger(client, url, until="2000-01-01"))["rows"]
    r = await client.get(url + "/v1/ledger", params={"since": "yesterday"})
    assert 400 == r.status_code
    assert "invalid_request" == r.json()["error"]["code"]


async def test_ledger_requires_the_ingest_token_when_set(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    from valmi_sidecar.config import Secret  # noqa: PLC0415

    _, url = await sidecar_factory(None, ingest_token=Secret("tok_ledger"))
    assert 401 == (await client.get(url + "/v1/ledger")).status_code
    ok = await client.get(url + "/v1/ledger", headers={"Authorization": "Bearer tok_ledger"})
    assert 200 == ok.status_code


async def test_ledger_is_in_the_same_transaction_as_the_events(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """A failed commit (no room) changes neither the events nor the ledger."""
    sidecar: Sidecar
    sidecar, url = await sidecar_factory(None)
    await post(client, url, action(AGENTS[0], "llm_call"))
    store = sidecar.store
    assert store is not None
    await store.writer_connection.fetchall("PRAGMA max_page_count = 1")
    big = {**action(AGENTS[0], "llm_call"), "metadata": {"blob": "x" * 200_000}}
    r = await client.post(url + "/v1/actions", json=big)
    assert 503 == r.status_code
    assert "store_unavailable" == r.json()["error"]["code"]
    await store.writer_connection.fetchall("PRAGMA max_page_count = 1073741823")
    book = await ledger(client, url)
    assert 1 == book["totals"]["received"]
    assert_reconciles(book, (await status(client, url))["events"])
