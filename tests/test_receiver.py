"""The local HTTP API, through a real sidecar on 127.0.0.1: answers, refusals, limits."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from valmi_sidecar.config import Secret, load_settings
from valmi_sidecar.fake_api import FakeValmi
from valmi_sidecar.receiver import Lifecycle, add_get, build_app, healthz, make_runner
from valmi_sidecar.store import core as store_core

from .conftest import ACTION, OUTCOME, SidecarFactory, serving, wait_until


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}
    assert {"code", "message", "details"} <= set(body["error"])
    err: dict[str, Any] = body["error"]
    return err


async def test_action_is_answered_202_with_id_and_receipt_time(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    resp = await client.post(f"{url}/v1/actions", json=ACTION)
    assert 202 == resp.status_code
    body = resp.json()
    assert "queued" == body["status"]
    assert body["id"].startswith("evt_")
    assert body["created_at"].endswith("Z")


async def test_outcome_is_answered_202(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    resp = await client.post(f"{url}/v1/outcomes", json=OUTCOME)
    assert 202 == resp.status_code


async def test_bad_fields_are_refused_400_listing_every_problem_and_nothing_is_stored(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    sidecar, url = await sidecar_factory()
    resp = await client.post(
        f"{url}/v1/outcomes", json={"agent_key": "", "value": True, "metadata": [], "x": 1}
    )
    assert 400 == resp.status_code
    err = error_of(resp)
    assert "invalid_request" == err["code"]
    assert {"agent_key", "outcome_type", "value", "metadata", "x"} == {
        d["field"] for d in err["details"]
    }
    assert 0 == (await client.get(f"{url}/v1/status")).json()["events"]["received"]
    assert sidecar.exit_code == 0


async def test_an_outcome_value_too_large_for_a_double_is_a_400_naming_the_field(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """A 400-digit integer is valid JSON that no double holds: the client's mistake, said
    as such, not a 500 with a traceback in the log."""
    from structlog.testing import capture_logs  # noqa: PLC0415

    sidecar, url = await sidecar_factory()
    huge = b"9" * 400
    json_type = {"Content-Type": "application/json"}
    with capture_logs() as logs:
        one = await client.post(
            f"{url}/v1/outcomes",
            content=b'{"agent_key": "a", "outcome_type": "o", "value": ' + huge + b"}",
            headers=json_type,
        )
        batch = await client.post(
            f"{url}/v1/batch",
            content=b'{"outcomes": [{"agent_key": "a", "outcome_type": "o", "value": -'
            + huge
            + b"}]}",
            headers=json_type,
        )
    assert (400, 400) == (one.status_code, batch.status_code), (one.text, batch.text)
    assert "invalid_request" == error_of(one)["code"]
    assert ["value"] == [d["field"] for d in error_of(one)["details"]]
    assert "too large for a double" in error_of(one)["message"]
    assert ["outcomes[0].value"] == [d["field"] for d in error_of(batch)["details"]]
    assert [] == [e for e in logs if e["event"] == "request_failed"]
    assert 0 == (await client.get(f"{url}/v1/status")).json()["events"]["received"]
    assert sidecar.exit_code == 0


async def test_a_timestamp_without_a_zone_is_refused_saying_to_add_one(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    for timestamp in ("2026-01-15T10:30:00", "2026-01-15", "2026-01-15 10:30"):
        resp = await client.post(f"{url}/v1/actions", json={**ACTION, "timestamp": timestamp})
        assert 400 == resp.status_code, timestamp
        err = error_of(resp)
        assert ["timestamp"] == [d["field"] for d in err["details"]]
        assert "Z" in err["message"]
        assert "offset" in err["message"]
    assert 0 == (await client.get(f"{url}/v1/status")).json()["events"]["received"]


async def test_a_null_timestamp_is_forwarded_as_the_receipt_time(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient, fake: FakeValmi
) -> None:
    _, url = await sidecar_factory(fake.url)
    resp = await client.post(f"{url}/v1/outcomes", json={**OUTCOME, "timestamp": None})
    assert 202 == resp.status_code, resp.text
    event_id = resp.json()["id"]
    await wait_until(lambda: event_id in fake.received, what="delivery")
    assert {**OUTCOME, "timestamp": resp.json()["created_at"]} == fake.received[event_id].body


async def test_malformed_json_is_refused_400(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    resp = await client.post(
        f"{url}/v1/actions", content=b'{"agent_key": ', headers={"Content-Type": "application/json"}
    )
    assert 400 == resp.status_code
    assert "not valid JSON" in error_of(resp)["message"]


async def test_body_over_one_mebibyte_is_refused_413(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    big = {**ACTION, "metadata": {"blob": "x" * (1024 * 1024)}}
    resp = await client.post(f"{url}/v1/actions", json=big)
    assert 413 == resp.status_code
    assert "payload_too_large" == error_of(resp)["code"]


async def test_body_over_the_limit_without_content_length_is_refused_413(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()

    async def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 65536

    resp = await client.post(
        f"{url}/v1/actions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert 413 == resp.status_code
    assert "payload_too_large" == error_of(resp)["code"]


async def raw_exchange(
    url: str, request: bytes, *later: bytes, gap_s: float = 0.1
) -> tuple[int, dict[str, Any]]:
    """Write ``request`` on a new connection, then each of ``later`` ``gap_s`` apart; the
    status and JSON body of the answer (the request asks the server to close after it)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        for piece in later:
            await writer.drain()
            await asyncio.sleep(gap_s)  # pacing the client, not waiting for a result
            writer.write(piece)
        answer = await asyncio.wait_for(reader.read(), 10.0)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def chunked_post(path: str, body: bytes, pieces: int = 3) -> bytes:
    """A chunked POST of ``body`` in ``pieces`` chunks, with no Content-Length."""
    size = -(-len(body) // pieces)
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + framed


async def test_a_chunked_body_arriving_with_its_headers_is_stored_whole(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """A body without Content-Length, all in the first packet, is taken whole."""
    sidecar, url = await sidecar_factory()
    raw = json.dumps({**ACTION, "timestamp": "2026-01-15T10:30:00Z"}).encode()
    status, body = await raw_exchange(url, chunked_post("/v1/actions", raw))
    assert 202 == status, body
    assert 1 == (await client.get(f"{url}/v1/status")).json()["events"]["received"]
    assert sidecar.store is not None
    with sqlite3.connect(sidecar.store.path) as db:
        (stored,) = db.execute("SELECT body FROM events WHERE id = ?", (body["id"],)).fetchone()
    assert json.loads(raw) == json.loads(stored)


async def test_a_body_arriving_in_pieces_after_its_headers_is_awaited_and_stored_whole(
    sidecar_factory: SidecarFactory,
) -> None:
    """The route takes a body already at hand without waiting; one still on its way (here
    in three pieces, 0.1 s apart, after the headers) is awaited and stored whole."""
    sidecar, url = await sidecar_factory()
    raw = json.dumps({**ACTION, "timestamp": "2026-01-15T10:30:00Z"}).encode()
    head = (
        "POST /v1/actions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    ).encode()
    third = -(-len(raw) // 3)
    pieces = [raw[i : i + third] for i in range(0, len(raw), third)]
    status, payload = await raw_exchange(url, head, *pieces)
    assert 202 == status, payload
    assert sidecar.store is not None
    with sqlite3.connect(sidecar.store.path) as db:
        (stored,) = db.execute("SELECT body FROM events WHERE id = ?", (payload["id"],)).fetchone()
    assert json.loads(raw) == json.loads(stored)


async def test_a_chunked_body_over_the_limit_arriving_at_once_is_refused_413(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Without Content-Length the limit is checked on the body itself, even when the whole
    body is already there: 413, counted, nothing stored."""
    _, url = await sidecar_factory(max_body_bytes=2048)
    raw = json.dumps({**ACTION, "metadata": {"blob": "x" * 4096}}).encode()
    status, body = await raw_exchange(url, chunked_post("/v1/actions", raw))
    assert 413 == status
    assert "payload_too_large" == body["error"]["code"]
    assert "larger than 2048 bytes" in body["error"]["message"]
    status_page = (await client.get(f"{url}/v1/status")).json()
    assert 0 == status_page["events"]["received"]
    metrics = (await client.get(f"{url}/metrics")).text
    assert 'valmi_sidecar_refused_requests_total{reason="payload_too_large"} 1.0' in metrics


async def test_an_allowed_origin_gets_cors_headers_on_token_refusals_and_404s_too(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """The guard, the token and the error shape in one middleware: the preflight is
    answered without the token, and every other answer to an allowed origin, a refusal
    of the token or of the route included, carries the CORS headers."""
    page = "http://localhost:3000"
    _, url = await sidecar_factory(allowed_origins=(page,), ingest_token=Secret("tok-cors-1"))
    pre = await client.options(
        f"{url}/v1/actions", headers={"Origin": page, "Access-Control-Request-Method": "POST"}
    )
    assert (204, page) == (pre.status_code, pre.headers["Access-Control-Allow-Origin"])
    assert "GET, POST" == pre.headers["Access-Control-Allow-Methods"]
    refused = await client.post(f"{url}/v1/actions", json=ACTION, headers={"Origin": page})
    assert (401, "unauthorized") == (refused.status_code, error_of(refused)["code"])
    assert (page, "Origin") == (
        refused.headers["Access-Control-Allow-Origin"],
        refused.headers["Vary"],
    )
    missing = await client.get(f"{url}/v2/nothing", headers={"Origin": page})
    assert (404, "not_found") == (missing.status_code, error_of(missing)["code"])
    assert page == missing.headers["Access-Control-Allow-Origin"]
    auth = {"Origin": page, "Authorization": "Bearer tok-cors-1"}
    accepted = await client.post(f"{url}/v1/actions", json=ACTION, headers=auth)
    assert (202, page) == (accepted.status_code, accepted.headers["Access-Control-Allow-Origin"])
    plain = await client.post(
        f"{url}/v1/actions", json=ACTION, headers={"Authorization": "Bearer tok-cors-1"}
    )
    assert 202 == plain.status_code
    assert "Access-Control-Allow-Origin" not in plain.headers


async def test_non_json_content_type_is_refused_415(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    resp = await client.post(
        f"{url}/v1/actions", content=json.dumps(ACTION), headers={"Content-Type": "text/plain"}
    )
    assert 415 == resp.status_code
    assert "unsupported_media_type" == error_of(resp)["code"]


async def test_missing_content_type_is_refused_415_and_nothing_stored(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """A browser's Blob or beacon POST has no Content-Type: it is not taken as JSON."""
    sidecar, url = await sidecar_factory()
    req = client.build_request("POST", f"{url}/v1/actions", content=json.dumps(ACTION).encode())
    assert "Content-Type" not in req.headers
    resp = await client.send(req)
    assert 415 == resp.status_code
    assert "Content-Type: application/json" in error_of(resp)["message"]
    assert sidecar.store is not None
    assert 0 == sidecar.store.counts().received


async def test_agent_authorization_header_is_ignored_without_an_ingest_token(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    resp = await client.post(
        f"{url}/v1/actions", json=ACTION, headers={"Authorization": "Bearer sk_api_abc123xyz"}
    )
    assert 202 == resp.status_code


async def test_ingest_token_is_required_when_set(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory(ingest_token=Secret("tok-123"))
    missing = await client.post(f"{url}/v1/actions", json=ACTION)
    wrong = await client.post(
        f"{url}/v1/actions", json=ACTION, headers={"Authorization": "Bearer nope"}
    )
    right = await client.post(
        f"{url}/v1/actions", json=ACTION, headers={"Authorization": "Bearer tok-123"}
    )
    assert [401, 401, 202] == [missing.status_code, wrong.status_code, right.status_code]
    assert "unauthorized" == error_of(missing)["code"]
    assert "tok-123" not in missing.text


async def test_retry_with_same_idempotency_key_returns_original_and_stores_nothing(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post(f"{url}/v1/actions", json=ACTION, headers=headers)
    again = await client.post(f"{url}/v1/actions", json=ACTION, headers=headers)
    assert [202, 202] == [first.status_code, again.status_code]
    assert first.json() == again.json()
    assert "true" == again.headers["Idempotent-Replayed"]
    events = (await client.get(f"{url}/v1/status")).json()["events"]
    assert (1, 1) == (events["received"], events["duplicates"])


async def test_same_idempotency_key_with_another_body_is_409(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    headers = {"Idempotency-Key": "order-43"}
    await client.post(f"{url}/v1/actions", json=ACTION, headers=headers)
    other = await client.post(
        f"{url}/v1/actions", json={**ACTION, "action_type": "tool_call"}, headers=headers
    )
    assert 409 == other.status_code
    assert "idempotency_key_reused" == error_of(other)["code"]


async def test_bad_idempotency_key_is_refused_400(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    resp = await client.post(
        f"{url}/v1/actions", json=ACTION, headers={"Idempotency-Key": "k" * 300}
    )
    assert 400 == resp.status_code
    assert "invalid_idempotency_key" == error_of(resp)["code"]


async def test_batch_is_accepted_whole(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    resp = await client.post(
        f"{url}/v1/batch", json={"actions": [ACTION, ACTION], "outcomes": [OUTCOME]}
    )
    assert 202 == resp.status_code
    assert ["action", "action", "outcome"] == [e["kind"] for e in resp.json()["events"]]
    assert 3 == (await client.get(f"{url}/v1/status")).json()["events"]["received"]


async def test_batch_with_one_bad_event_stores_none(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory()
    resp = await client.post(
        f"{url}/v1/batch", json={"actions": [ACTION, {"agent_key": "a"}], "outcomes": [OUTCOME]}
    )
    assert 400 == resp.status_code
    assert ["actions[1].action_type"] == [d["field"] for d in error_of(resp)["details"]]
    assert 0 == (await client.get(f"{url}/v1/status")).json()["events"]["received"]


async def test_full_queue_answers_503_with_retry_after_and_keeps_what_it_has(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory(max_queue_events=3)
    answers = [(await client.post(f"{url}/v1/actions", json=ACTION)).status_code for _ in range(4)]
    assert [202, 202, 202, 503] == answers
    full = await client.post(f"{url}/v1/actions", json=ACTION)
    assert "queue_full" == error_of(full)["code"]
    assert int(full.headers["Retry-After"]) > 0
    assert 503 == (await client.get(f"{url}/readyz")).status_code
    assert 3 == (await client.get(f"{url}/v1/status")).json()["events"]["queued"]


async def test_unknown_path_and_method_use_the_error_shape(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """What no route takes is a 404, or a 405 saying which methods the path takes (a
    route with a pattern included), in the one error shape and without storing."""
    sidecar, url = await sidecar_factory()
    missing = await client.get(f"{url}/v1/nope")
    assert (404, "not_found") == (missing.status_code, error_of(missing)["code"])
    posted_nowhere = await client.post(f"{url}/v1/action", json=ACTION)
    assert (404, "not_found") == (posted_nowhere.status_code, error_of(posted_nowhere)["code"])
    wrong_method = await client.get(f"{url}/v1/actions")
    assert (405, "method_not_allowed", "POST") == (
        wrong_method.status_code,
        error_of(wrong_method)["code"],
        wrong_method.headers["Allow"],
    )
    posted_to_a_read = await client.post(f"{url}/v1/dead-letters/evt_x", json={})
    assert (405, "method_not_allowed", "GET,HEAD") == (
        posted_to_a_read.status_code,
        error_of(posted_to_a_read)["code"],
        posted_to_a_read.headers["Allow"],
    )
    assert 404 == (await client.head(f"{url}/nowhere")).status_code
    assert 200 == (await client.head(f"{url}/healthz")).status_code
    assert sidecar.store is not None
    assert 0 == sidecar.store.counts().received


async def test_a_route_added_past_the_guard_stops_the_application_from_starting(
    tmp_path: Path,
) -> None:
    """Every route is behind the local-only guard: one added with ``add_get`` refuses a
    web page like the others; one added straight to aiohttp's router stops the start,
    with a message that says how to add it."""
    settings = load_settings(env={"HOME": str(tmp_path)})
    app = build_app(settings, Lifecycle(ready=True), dict, bytes)
    add_get(app, "/v1/extra", healthz)
    async with serving(app, settings) as url, httpx.AsyncClient(timeout=10.0) as client:
        plain = await client.get(url + "/v1/extra")
        page = await client.get(url + "/v1/extra", headers={"Origin": "http://evil.test"})
    assert 200 == plain.status_code
    assert (403, "origin_not_allowed") == (page.status_code, error_of(page)["code"])

    app = build_app(settings, Lifecycle(ready=True), dict, bytes)
    app.router.add_get("/v1/unguarded", healthz)
    runner = make_runner(app, settings)
    try:
        with pytest.raises(RuntimeError) as info:
            await runner.setup()
        assert "/v1/unguarded is not behind the local-only guard" in str(info.value)
        assert "receiver.add_get" in str(info.value)
    finally:
        await runner.cleanup()


async def test_health_ready_and_status_report_the_sidecar(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient, fake: FakeValmi
) -> None:
    _, url = await sidecar_factory(fake.url)
    assert 200 == (await client.get(f"{url}/healthz")).status_code
    assert 200 == (await client.get(f"{url}/readyz")).status_code
    await client.post(f"{url}/v1/actions", json=ACTION)
    await wait_until(lambda: len(fake.received) == 1, what="delivery")

    async def delivered() -> bool:
        status = (await client.get(f"{url}/v1/status")).json()
        return bool(status["events"]["delivered"] == 1)

    await wait_until(delivered, what="status shows delivered")
    status = (await client.get(f"{url}/v1/status")).json()
    ev = status["events"]
    assert ev["received"] == ev["queued"] + ev["delivered"] + ev["dead_lettered"]
    assert "ok" == status["upstream"]["state"]
    assert status["oldest_queued_age_s"] is None


async def test_status_says_forwarding_is_disabled_without_an_api_key(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory(None)
    assert 202 == (await client.post(f"{url}/v1/actions", json=ACTION)).status_code
    status = (await client.get(f"{url}/v1/status")).json()
    assert "disabled" == status["upstream"]["state"]
    assert status["upstream"]["forwarding"] is False
    assert 1 == status["events"]["queued"]


async def test_metrics_reconcile_with_status(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory(None)
    for _ in range(3):
        await client.post(f"{url}/v1/actions", json=ACTION)
    text = (await client.get(f"{url}/metrics")).text
    assert "valmi_sidecar_events_received_total 3.0" in text
    assert "valmi_sidecar_queue_events 3.0" in text
    assert 'valmi_sidecar_upstream_state{state="disabled"} 1.0' in text


async def test_a_store_closed_in_the_middle_of_the_commit_answers_outcome_unknown(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store closes while the request's commit is held up (another connection holds
    the write lock): the event may be committed, so the answer says so and to retry with
    the same key, not that nothing was stored."""
    monkeypatch.setattr(store_core, "CLOSE_DRAIN_S", 0.2)
    sidecar, url = await sidecar_factory(None)
    store = sidecar.store
    assert store is not None
    blocker = sqlite3.connect(store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        posting = asyncio.create_task(
            client.post(f"{url}/v1/actions", json=ACTION, headers={"Idempotency-Key": "o-1"})
        )
        await wait_until(lambda: store.in_transaction, 10, "the commit to start")
        closing = asyncio.create_task(store.close())
        resp = await posting
        blocker.execute("COMMIT")
        await closing
    finally:
        blocker.close()
    assert 503 == resp.status_code, resp.text
    err = error_of(resp)
    assert "outcome_unknown" == err["code"]
    assert "Retry with the same Idempotency-Key" in err["message"]
    assert "nothing was stored" not in err["message"]
    assert "Retry-After" in resp.headers


async def test_draining_sidecar_refuses_new_posts_503_and_is_not_ready(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    sidecar, url = await sidecar_factory(None)
    sidecar.lifecycle.draining = True
    resp = await client.post(f"{url}/v1/actions", json=ACTION)
    assert 503 == resp.status_code
    assert "shutting_down" == error_of(resp)["code"]
    assert "Retry-After" in resp.headers
    assert 503 == (await client.get(f"{url}/readyz")).status_code
    sidecar.lifecycle.draining = False


async def test_concurrent_posts_are_all_stored(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory(None)
    answers = await asyncio.gather(
        *(client.post(f"{url}/v1/actions", json=ACTION) for _ in range(200))
    )
    assert {202} == {r.status_code for r in answers}
    assert 200 == len({r.json()["id"] for r in answers})
    assert 200 == (await client.get(f"{url}/v1/status")).json()["events"]["queued"]


@pytest.mark.parametrize("path", ["/v1/actions", "/v1/batch"])
async def test_events_survive_a_restart_on_the_same_data_dir(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient, tmp_path: Path, path: str
) -> None:
    data = tmp_path / "restart"
    sidecar, url = await sidecar_factory(None, data_dir=data)
    payload: Any = ACTION if path == "/v1/actions" else {"actions": [ACTION]}
    assert 202 == (await client.post(f"{url}{path}", json=payload)).status_code
    await sidecar.stop()
    _, url2 = await sidecar_factory(None, data_dir=data)
    assert 1 == (await client.get(f"{url2}/v1/status")).json()["events"]["queued"]
