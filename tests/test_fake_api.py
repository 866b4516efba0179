"""The fake Valmi API: a real server on loopback, driven with httpx.

The ``fake`` fixture (a started ``FakeValmi`` on 127.0.0.1, port 0) is in conftest.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import structlog
from structlog.typing import EventDict

from valmi_sidecar.fake_api import DEFAULT_KEY, FakeValmi, Faults, FaultsError, serve

AUTH = {"Authorization": f"Bearer {DEFAULT_KEY}"}
ACTION = {"agent_key": "agent_1", "action_type": "llm_call", "metadata": {"model": "m"}}
OUTCOME = {"agent_key": "agent_1", "outcome_type": "successful_hire", "value": 1}

MakeFake = Callable[..., Awaitable[FakeValmi]]


@pytest.fixture
async def make_fake() -> AsyncIterator[MakeFake]:
    """Build started fakes with any options; stop every one afterwards."""
    made: list[FakeValmi] = []

    async def make(**kwargs: Any) -> FakeValmi:
        fake = FakeValmi(**kwargs)
        await fake.start("127.0.0.1", 0)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        await fake.stop()


@pytest.fixture
async def api(fake: FakeValmi) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the ``fake`` fixture (tests/conftest.py) that sends the right key."""
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH, timeout=5.0) as c:
        yield c


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_accepts_an_action_and_an_outcome_and_lists_them(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    a = await api.post("/v1/actions", json=ACTION, headers={"Idempotency-Key": "k1"})
    o = await api.post("/v1/outcomes", json=OUTCOME)

    assert (200, 200) == (a.status_code, o.status_code)
    assert a.json()["id"].startswith("action_")
    assert o.json()["id"].startswith("outcome_")
    assert "processed" == a.json()["status"]
    assert a.json()["created_at"].endswith("Z")
    listed = (await api.get("/_fake/received")).json()
    assert [
        {"idem_key": "k1", "kind": "action", "body": ACTION, "id": a.json()["id"], "attempts": 1},
        {"idem_key": None, "kind": "outcome", "body": OUTCOME, "id": o.json()["id"], "attempts": 1},
    ] == [
        {k: e[k] for k in ("idem_key", "kind", "body", "id", "attempts")} for e in listed["events"]
    ]
    assert (2, 0, {"200": 2}) == (
        listed["requests"],
        listed["duplicates"],
        listed["status_counts"],
    )
    assert [o.json()["id"]] == [r.id for r in fake.events("outcome")]


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer sk_test_wrong"}, {"Authorization": "Basic abc"}, {}],
    ids=["wrong-key", "wrong-scheme", "missing"],
)
async def test_refuses_a_wrong_or_missing_key_with_401(
    fake: FakeValmi, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=fake.url, headers=headers) as c:
        r = await c.post("/v1/actions", json=ACTION)

    assert 401 == r.status_code
    assert {"error": {"code": "unauthorized", "message": "Invalid API key"}} == r.json()
    assert [] == fake.events()


async def test_refuses_a_bad_body_with_400_listing_every_problem(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    r = await api.post("/v1/outcomes", json={"agent_key": "", "value": "x", "extra": 1})

    assert 400 == r.status_code
    error = r.json()["error"]
    assert "invalid_request" == error["code"]
    assert ["agent_key", "outcome_type", "value", "extra"] == [d["field"] for d in error["details"]]
    assert [] == fake.events()


async def test_refuses_a_body_that_is_not_json_with_400(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/actions", content=b"{nope")

    assert 400 == r.status_code
    assert "not valid JSON" in r.json()["error"]["message"]


async def test_a_repeated_idempotency_key_returns_the_original_answer(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    first = await api.post("/v1/actions", json=ACTION, headers={"Idempotency-Key": "k"})
    again = await api.post("/v1/actions", json=ACTION, headers={"Idempotency-Key": "k"})

    assert 200 == again.status_code
    assert first.json() == again.json()
    assert [2] == [r.attempts for r in fake.events()]
    assert (1, 2) == (fake.duplicates, fake.requests)


async def test_requests_without_a_key_are_each_stored(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    for _ in range(2):
        assert 200 == (await api.post("/v1/actions", json=ACTION)).status_code

    assert [None, None] == [r.idem_key for r in fake.events()]
    assert 0 == fake.duplicates


async def test_conflict_on_duplicate_answers_a_repeat_with_409(make_fake: MakeFake) -> None:
    fake = await make_fake(conflict_on_duplicate=True)
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as c:
        first = await c.post("/v1/actions", json=ACTION, headers={"Idempotency-Key": "k"})
        again = await c.post("/v1/actions", json=ACTION, headers={"Idempotency-Key": "k"})

    assert (200, 409) == (first.status_code, again.status_code)
    assert "conflict" == again.json()["error"]["code"]
    assert first.json()["id"] in again.json()["error"]["message"]
    assert 1 == len(fake.events())


async def test_rate_limit_answers_429_past_the_limit_with_headers(make_fake: MakeFake) -> None:
    fake = await make_fake(rate_limit_per_min=2)
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as c:
        answers = [await c.post("/v1/actions", json=ACTION) for _ in range(3)]

    assert [200, 200, 429] == [r.status_code for r in answers]
    assert ["1", "0", "0"] == [r.headers["X-RateLimit-Remaining"] for r in answers]
    assert {"2"} == {r.headers["X-RateLimit-Limit"] for r in answers}
    reset = int(answers[2].headers["X-RateLimit-Reset"])
    assert time.time() < reset <= math.ceil(time.time() + 60)
    assert 1 <= int(answers[2].headers["Retry-After"]) <= 60
    assert "Retry-After" not in answers[0].headers
    assert "rate_limited" == answers[2].json()["error"]["code"]
    assert ({200: 2, 429: 1}, 2) == (fake.status_counts, len(fake.events()))


async def test_rate_limit_window_starts_again_after_60_seconds(make_fake: MakeFake) -> None:
    clock = FakeClock()
    fake = await make_fake(rate_limit_per_min=1, clock=clock)
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as c:
        first = await c.post("/v1/actions", json=ACTION)
        clock.now += 59.5
        refused = await c.post("/v1/actions", json=ACTION)
        clock.now += 0.5
        again = await c.post("/v1/actions", json=ACTION)

    assert [200, 429, 200] == [r.status_code for r in (first, refused, again)]
    assert "1" == refused.headers["Retry-After"]
    assert [1000.0, 1059.5, 1060.0] == fake.arrival_times


async def test_error_rate_one_answers_every_request_with_error_status(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    fake.faults.error_rate = 1.0
    fake.faults.error_status = 502

    answers = [await api.post("/v1/actions", json=ACTION) for _ in range(3)]

    assert [502, 502, 502] == [r.status_code for r in answers]
    assert [] == fake.events()


async def test_error_rate_is_reproducible_with_a_seed(make_fake: MakeFake) -> None:
    async def statuses(fake: FakeValmi) -> list[int]:
        fake.faults.error_rate = 0.5
        async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as c:
            return [(await c.post("/v1/actions", json=ACTION)).status_code for _ in range(20)]

    first = await statuses(await make_fake(seed=7))
    second = await statuses(await make_fake(seed=7))

    assert first == second
    assert {200, 503} == set(first)


async def test_unauthorized_fault_refuses_even_a_good_key(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    fake.faults.unauthorized = True

    assert 401 == (await api.post("/v1/actions", json=ACTION)).status_code


async def test_rate_limited_fault_answers_429_with_retry_after(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    fake.faults = Faults(rate_limited=True, retry_after_s=3.0)

    r = await api.post("/v1/actions", json=ACTION)

    assert (429, "3") == (r.status_code, r.headers["Retry-After"])
    assert "rate_limited" == r.json()["error"]["code"]


async def test_latency_delays_the_answer(fake: FakeValmi, api: httpx.AsyncClient) -> None:
    fake.faults.latency_s = 0.2
    started = time.monotonic()

    r = await api.post("/v1/actions", json=ACTION)

    assert 200 == r.status_code
    assert time.monotonic() - started >= 0.2


async def test_hang_holds_the_answer_until_switched_off(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    fake.faults.hang = True
    pending = asyncio.create_task(api.post("/v1/actions", json=ACTION))
    await fake.wait_until(lambda: fake.requests == 1)
    done, _ = await asyncio.wait({pending}, timeout=0.1)
    assert set() == done
    assert [] == fake.events()

    fake.faults.hang = False

    assert 200 == (await asyncio.wait_for(pending, 5)).status_code
    assert 1 == len(fake.events())


async def test_stop_drops_a_hanging_request_promptly(make_fake: MakeFake) -> None:
    fake = await make_fake()
    fake.faults.hang = True
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH, timeout=10) as c:
        pending = asyncio.create_task(c.post("/v1/actions", json=ACTION))
        await fake.wait_until(lambda: fake.requests == 1)
        started = time.monotonic()

        await fake.stop()

        assert time.monotonic() - started < 1.0
        with pytest.raises(httpx.TransportError):
            await pending
    assert [] == fake.events()


async def test_reset_after_store_stores_the_event_and_drops_the_connection(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    fake.faults.reset_after_store = True

    with pytest.raises(httpx.TransportError):
        await api.post("/v1/actions", json=ACTION, headers={"Idempotency-Key": "k"})

    assert ["k"] == [r.idem_key for r in fake.events()]
    assert (1, {}) == (fake.dropped, fake.status_counts)
    fake.faults.reset_after_store = False
    retry = await api.post("/v1/actions", json=ACTION, headers={"Idempotency-Key": "k"})
    assert (200, fake.events()[0].id) == (retry.status_code, retry.json()["id"])


async def test_go_down_refuses_connections_and_go_up_serves_on_the_same_port(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    assert 200 == (await api.post("/v1/actions", json=ACTION)).status_code
    port = fake.port

    await fake.go_down()
    with pytest.raises(httpx.ConnectError):
        await api.post("/v1/actions", json=ACTION)
    await fake.go_up()

    assert port == fake.port
    assert 200 == (await api.post("/v1/actions", json=ACTION)).status_code
    assert (2, 2) == (len(fake.events()), fake.requests)


async def test_control_endpoint_sets_faults(fake: FakeValmi, api: httpx.AsyncClient) -> None:
    r = await api.post("/_fake/faults", json={"error_rate": 1, "error_status": 500})

    assert 200 == r.status_code
    assert (1.0, 500) == (r.json()["error_rate"], r.json()["error_status"])
    assert Faults(error_rate=1, error_status=500) == fake.faults
    assert 500 == (await api.post("/v1/actions", json=ACTION)).status_code


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"error_rat": 1.0}, "error_rat"),
        ({"hang": "yes"}, "hang"),
        ({"error_status": 5.5}, "error_status"),
        ({"error_rate": 2}, "error_rate"),
        ({"latency_s": -1}, "latency_s"),
    ],
)
async def test_control_endpoint_rejects_unknown_fields_and_bad_values(
    fake: FakeValmi, api: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    r = await api.post("/_fake/faults", json={"unauthorized": True, **change})

    assert 400 == r.status_code
    assert [field] == [d["field"] for d in r.json()["error"]["details"]]
    assert Faults() == fake.faults  # nothing applied


async def test_set_faults_rejects_an_unknown_field(fake: FakeValmi) -> None:
    with pytest.raises(FaultsError, match="nope"):
        fake.set_faults(nope=True)


async def test_control_reset_clears_events_and_counters(
    fake: FakeValmi, api: httpx.AsyncClient
) -> None:
    await api.post("/v1/actions", json=ACTION, headers={"Idempotency-Key": "k"})
    await api.post("/v1/actions", json=ACTION, headers={"Idempotency-Key": "k"})

    r = await api.post("/_fake/reset")

    assert 200 == r.status_code
    assert {"events": [], "requests": 0, "duplicates": 0, "dropped": 0, "status_counts": {}} == (
        (await api.get("/_fake/received")).json()
    )
    assert [] == fake.arrival_times


async def test_received_filters_by_kind(api: httpx.AsyncClient) -> None:
    await api.post("/v1/actions", json=ACTION)
    await api.post("/v1/outcomes", json=OUTCOME)

    listed = (await api.get("/_fake/received", params={"kind": "outcome"})).json()

    assert ["outcome"] == [e["kind"] for e in listed["events"]]


def test_refuses_one_string_as_the_key_collection() -> None:
    with pytest.raises(TypeError):
        FakeValmi(api_keys=DEFAULT_KEY)


async def test_serve_logs_its_url_and_stops_when_cancelled() -> None:
    listening = asyncio.Event()

    def spy(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        if event_dict["event"] == "fake_api_listening":
            listening.set()
        return event_dict

    with structlog.testing.capture_logs(processors=[spy]) as logs:
        task = asyncio.create_task(
            serve("127.0.0.1", 0, api_keys=["sk_test_x"], rate_limit_per_min=None)
        )
        await asyncio.wait_for(listening.wait(), 5)
        url = logs[0]["url"]
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post(
                "/v1/actions", json=ACTION, headers={"Authorization": "Bearer sk_test_x"}
            )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert 200 == r.status_code
    assert ["fake_api_listening", "fake_api_stopped"] == [e["event"] for e in logs]
    assert "sk_test_x" not in repr(logs)
    async with httpx.AsyncClient(base_url=url) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("/_fake/received")
