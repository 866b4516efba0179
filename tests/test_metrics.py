"""``GET /metrics`` of a real sidecar, parsed with prometheus-client's parser: names follow
Prometheus conventions, values move as events flow, and the example dashboard and alerts
name only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ACTION, OUTCOME, SidecarFactory, wait_until

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
    assert all(n.startswith("valmi_sidecar_") for n, _ in before)
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
        lambda: sidecar._store is not None and sidecar._store.counts().delivered == 4,
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

    # A permanent refusal upstream: a dead letter by reason, and a 4xx request.
    fake.faults.error_rate, fake.faults.error_status = 1.0, 400
    assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    await wait_until(
        lambda: sidecar._store is not None and sidecar._store.counts().dead_lettered == 1,
        what="1 dead letter",
    )
    last, _ = await scrape(client, url)
    assert 1 == value(
        last, "valmi_sidecar_dead_lettered_events_total", kind="action", reason="rejected"
    )
    assert 1 == value(last, "valmi_sidecar_upstream_requests_total", status_class="4xx")
    assert 1 == value(last, "valmi_sidecar_dead_letters")
    assert 1 == value(last, "valmi_sidecar_events", state="dead_lettered")


async def test_metrics_show_transport_errors_and_the_queue_age(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """Upstream down: requests count as errors, events queue and age."""
    await fake.go_down()
    _, url = await sidecar_factory(fake.url)
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
