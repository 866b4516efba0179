"""``GET /metrics`` of a real sidecar, parsed with prometheus-client's parser: names follow
Prometheus conventions, values move as events flow, and the example dashboard and alerts
name only metrics that exist."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ACTION, OUTCOME, SidecarFactory, wait_until
from valmi_sidecar import __version__
from valmi_sidecar.metrics import DrainForecast, UpstreamStats, drain_forecast

if TYPE_CHECKING:
    from valmi_sidecar.fake_api import FakeValmi

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "examples" / "grafana" / "valmi-sidecar.json"
ALERTS = ROOT / "examples" / "prometheus" / "alerts.yml"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient, url: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and every family's type."""
    r = await client.get(url + "/metrics")
    assert 200 == r.status_code
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_as_events_flow(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    sidecar, url = await sidecar_factory(fake.url)
    before, types = await scrape(client, url)
    assert all(n.startswith(("valmi_sidecar_", "process_", "python_")) for n, _ in before)
    assert "counter" == types["valmi_sidecar_received_events"]
    assert "histogram" == types["valmi_sidecar_upstream_request_duration_seconds"]
    assert "histogram" == types["valmi_sidecar_commit_duration_seconds"]
    assert 0 == value(before, "valmi_sidecar_received_events_total", kind="action")
    assert value(before, "valmi_sidecar_database_size_bytes") > 0
    assert 1 == value(before, "valmi_sidecar_upstream_state", state="ok")
    assert 1 == value(before, "valmi_sidecar_store_writable")

    for _ in range(3):
        assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    for _ in range(2):
        r = await client.post(url + "/v1/outcomes", json=OUTCOME, headers={"Idempotency-Key": "k1"})
        assert 202 == r.status_code  # the second is a duplicate
    r = await client.post(
        url + "/v1/actions", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert 400 == r.status_code
    r = await client.post(url + "/v1/actions", content=b"x", headers={"Content-Type": "text/plain"})
    assert 415 == r.status_code
    assert 404 == (await client.get(url + "/v1/nothing")).status_code  # not an ingest path
    await wait_until(
        lambda: sidecar.store is not None and sidecar.store.counts().delivered == 4,
        what="4 delivered",
    )

    after, _ = await scrape(client, url)
    assert 3 == value(after, "valmi_sidecar_received_events_total", kind="action")
    assert 1 == value(after, "valmi_sidecar_received_events_total", kind="outcome")
    assert 1 == value(after, "valmi_sidecar_deduplicated_events_total", kind="outcome")
    assert 3 == value(after, "valmi_sidecar_delivered_events_total", kind="action")
    assert 1 == value(after, "valmi_sidecar_delivered_events_total", kind="outcome")
    assert 1 == value(after, "valmi_sidecar_refused_requests_total", reason="invalid_request")
    assert 1 == value(
        after, "valmi_sidecar_refused_requests_total", reason="unsupported_media_type"
    )
    assert 0 == value(after, "valmi_sidecar_refused_requests_total", reason="not_found")
    assert 4 == value(after, "valmi_sidecar_upstream_requests_total", status_class="2xx")
    assert 4 == value(after, "valmi_sidecar_upstream_request_duration_seconds_count")
    assert value(after, "valmi_sidecar_upstream_request_duration_seconds_sum") > 0
    assert 4 == value(after, "valmi_sidecar_upstream_request_duration_seconds_bucket", le="+Inf")
    commits = value(after, "valmi_sidecar_commit_duration_seconds_count")
    assert commits >= 2  # at least one submit and one settle transaction
    assert commits == value(after, "valmi_sidecar_commit_batch_events_count")
    # Each submit and settle counts its events: 5 submitted (one a duplicate), 4 settled.
    assert 9 == value(after, "valmi_sidecar_commit_batch_events_sum")
    for state, n in (("received", 4), ("queued", 0), ("delivered", 4), ("dead_lettered", 0)):
        assert n == value(after, "valmi_sidecar_events", state=state)
    assert 4 == value(after, "valmi_sidecar_events_received_total")
    assert 4 == value(after, "valmi_sidecar_events_delivered_total")
    assert 1 == value(after, "valmi_sidecar_events_duplicates_total")
    assert 0 == value(after, "valmi_sidecar_events_current", state="queued")

    # A permanent refusal upstream: a dead letter by reason, and a 4xx request.
    fake.faults.error_rate, fake.faults.error_status = 1.0, 400
    assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    await wait_until(lambda: 1 == fake.status_counts.get(400, 0), what="1 refusal")
    fake.faults.error_rate = 0.0  # the next delivery shows the refusal was the event's
    assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    await wait_until(
        lambda: sidecar.store is not None and sidecar.store.counts().dead_lettered == 1,
        what="1 dead letter",
    )
    last, _ = await scrape(client, url)
    assert 1 == value(
        last, "valmi_sidecar_dead_lettered_events_total", kind="action", reason="rejected"
    )
    assert 1 == value(last, "valmi_sidecar_upstream_requests_total", status_class="4xx")
    assert 1 == value(last, "valmi_sidecar_dead_letters")
    assert 1 == value(last, "valmi_sidecar_events", state="dead_lettered")
    assert 1 == value(last, "valmi_sidecar_events_current", state="dead_lettered")


async def test_current_states_are_a_gauge_and_totals_are_counters(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Summing events_current over state means something (every event not delivered);
    the running totals are counters of their own, never in that family."""
    _, url = await sidecar_factory(None)
    for _ in range(2):
        assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    samples, types = await scrape(client, url)
    assert "gauge" == types["valmi_sidecar_events_current"]
    states = {dict(labels)["state"] for n, labels in samples if n == "valmi_sidecar_events_current"}
    assert {"queued", "dead_lettered"} == states
    assert 2 == value(samples, "valmi_sidecar_events_current", state="queued")
    for total in ("received", "delivered", "duplicates"):
        assert "counter" == types[f"valmi_sidecar_events_{total}"]
    assert 2 == value(samples, "valmi_sidecar_events_received_total")


async def test_standard_process_and_python_metrics_and_build_info(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    _, url = await sidecar_factory(None)
    samples, types = await scrape(client, url)
    assert 1 == value(samples, "valmi_sidecar_build_info", version=__version__)
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "process_open_fds") > 0
    assert "counter" == types["process_cpu_seconds"]
    assert any(n == "python_info" for n, _ in samples)
    assert any(n == "python_gc_collections_total" for n, _ in samples)
    again, _ = await scrape(client, url)
    assert value(again, "process_start_time_seconds") == value(
        samples, "process_start_time_seconds"
    )


# --- the drain forecast -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"queued": 0}, DrainForecast(0.0, 0.0, "empty")),
        ({"stalled": True}, DrainForecast(math.inf, 0.0, "stalled")),
        # Young queue: the flusher's own rate is unknown; the rate limit is the best case.
        (
            {"oldest_age_s": 5.0, "delivered_per_s": 1.0},
            DrainForecast(60.0, 10000 / 60, "rate_limit"),
        ),
        ({"delivered_per_s": None}, DrainForecast(60.0, 10000 / 60, "rate_limit")),
        ({"oldest_age_s": None}, DrainForecast(60.0, 10000 / 60, "rate_limit")),
        # The queue waited the whole window: the observed rate is what the flusher does.
        ({"delivered_per_s": 20.0}, DrainForecast(500.0, 20.0, "observed")),
        ({"delivered_per_s": 0.0}, DrainForecast(math.inf, 0.0, "observed")),
        # Never above the rate limit, whatever a short sample says.
        ({"delivered_per_s": 1000.0}, DrainForecast(60.0, 10000 / 60, "observed")),
    ],
)
def test_drain_forecast(kwargs: dict[str, object], expected: DrainForecast) -> None:
    args: dict[str, object] = {
        "queued": 10_000,
        "oldest_age_s": 120.0,
        "delivered_per_s": 50.0,
        "rate_limit_per_min": 10_000,
        "stalled": False,
        "window_s": 60.0,
        **kwargs,
    }
    assert expected == drain_forecast(**args)  # type: ignore[arg-type]


def test_drain_forecast_json_has_no_infinity() -> None:
    assert {"forecast_s": None, "rate_per_s": 0.0, "basis": "stalled"} == DrainForecast(
        math.inf, 0.0, "stalled"
    ).as_json()


async def test_drain_forecast_in_status_and_metrics(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Upstream down, 5 events queued at 600 a minute: 0.5 s at the rate limit."""
    _, url = await sidecar_factory(fake.url, rate_limit_per_min=600)
    await fake.go_down()
    for _ in range(5):
        assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    drain = (await client.get(url + "/v1/status")).json()["drain"]
    assert {"forecast_s": 0.5, "rate_per_s": 10.0, "basis": "rate_limit"} == drain
    samples, types = await scrape(client, url)
    assert "gauge" == types["valmi_sidecar_drain_forecast_seconds"]
    assert 0.5 == value(samples, "valmi_sidecar_drain_forecast_seconds")


async def test_drain_forecast_is_infinite_when_nothing_forwards(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """No API key: the queue never drains; status says null, the gauge +Inf (so the alert
    on max_event_age_s fires)."""
    _, url = await sidecar_factory(None)
    assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    drain = (await client.get(url + "/v1/status")).json()["drain"]
    assert {"forecast_s": None, "rate_per_s": 0.0, "basis": "stalled"} == drain
    samples, _ = await scrape(client, url)
    assert math.isinf(value(samples, "valmi_sidecar_drain_forecast_seconds"))


async def test_metrics_show_transport_errors_and_the_queue_age(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Upstream down: requests count as errors, events queue and age."""
    _, url = await sidecar_factory(fake.url)
    await fake.go_down()
    assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code

    async def failed() -> bool:
        samples, _ = await scrape(client, url)
        return value(samples, "valmi_sidecar_upstream_requests_total", status_class="error") >= 1

    await wait_until(failed, what="a failed upstream request counted")
    samples, _ = await scrape(client, url)
    assert 1 == value(samples, "valmi_sidecar_queue_events")
    assert value(samples, "valmi_sidecar_queue_bytes") > 0
    assert value(samples, "valmi_sidecar_queue_oldest_age_seconds") > 0
    assert 0 == value(samples, "valmi_sidecar_upstream_requests_total", status_class="2xx")


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bvalmi_sidecar_[a-z0-9_]+", text))


def dashboard_exprs() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    rules: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_dashboard_and_alerts_are_well_formed() -> None:
    """Valid JSON and YAML; every panel has a query; every rule an alert, expr and summary."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    for expected in (
        "ValmiSidecarBacklogNearMaxEventAge",
        "ValmiSidecarUpstreamPaused",
        "ValmiSidecarDeadLettersRising",
        "ValmiSidecarQueueNearFull",
        "ValmiSidecarDrainSlowerThanMaxEventAge",
        "ValmiSidecarDiskFull",
        "ValmiSidecarDeadLettersFillTheDisk",
    ):
        assert expected in names
    for rule in rules:
        assert rule["expr"].strip()
        assert rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in ("warning", "critical")


async def test_examples_name_only_real_metrics(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Every metric the dashboard and the alerts name is in a real /metrics output."""
    _, url = await sidecar_factory(None)
    samples, _ = await scrape(client, url)
    exposed = {name for name, _ in samples}
    named = set()
    for expr in [*dashboard_exprs(), *(r["expr"] for r in alert_rules())]:
        named |= metric_names(expr)
    assert named, "the examples name no metric"
    assert set() == named - exposed


README = Path(__file__).resolve().parent.parent / "README.md"


async def test_every_metric_the_sidecar_exposes_is_in_the_readme(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """An operator reads what a metric means in the README: every family /metrics serves
    (but the standard process_* and python_* ones) is named there, unprefixed."""
    _, url = await sidecar_factory(None, ingest_processes=1)
    text = (await client.get(url + "/metrics")).text
    readme = await asyncio.to_thread(README.read_text)
    names = {f.name for f in text_string_to_metric_families(text)}
    ours = {n.removeprefix("valmi_sidecar_") for n in names if n.startswith("valmi_sidecar_")}
    assert len(ours) > 30
    assert set() == {n for n in ours if f"`{n}" not in readme}


@pytest.mark.parametrize(
    ("status", "status_class"),
    [(None, "error"), (99, "error"), (100, "1xx"), (204, "2xx"), (308, "3xx"), (404, "4xx"),
     (599, "5xx"), (600, "error")],
)  # fmt: skip
def test_each_upstream_answer_counts_in_its_status_class(
    status: int | None, status_class: str
) -> None:
    stats = UpstreamStats()
    stats.observe(status, 0.01)
    assert {status_class: 1} == {k: n for k, n in stats.requests.items() if n}
    assert (1, 0.01) == (stats.duration.count, stats.duration.sum)
