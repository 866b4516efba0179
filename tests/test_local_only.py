"""Only programs on this host can bill: what a web page in a browser can send to the sidecar
is refused on every route, and the clients agents use are not.

The browser requests are replayed with the headers Chromium sends for them (a page on
``http://127.0.0.1:9000``; a rebinding page on ``evil.test``), against a real sidecar
process, and the queue, the dead letters and the ledger are compared before and after.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from valmi_sidecar.events import parse_one
from valmi_sidecar.guard import Policy, check_origin, host_name, is_json_media_type
from valmi_sidecar.store import DeadLetter, Store

from .conftest import ACTION, OUTCOME, SidecarProcessFactory
from .test_dead_letters import run_cli

PAGE = "http://127.0.0.1:9000"
#: What Chromium adds to a page's no-cors fetch, beacon or Blob POST to another port.
BROWSER = {
    "Origin": PAGE,
    "Sec-Fetch-Site": "same-site",
    "Sec-Fetch-Mode": "no-cors",
    "Sec-Fetch-Dest": "empty",
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0.0.0 Safari/537.36",
}
#: A top-level ``<form enctype="text/plain">`` auto-submitted by a page treated as public.
FORM = {
    "Origin": "null",
    "Sec-Fetch-Site": "cross-site",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Dest": "document",
    "Content-Type": "text/plain",
}
#: What Chromium adds to a page's CORS fetch to another port (after a granted preflight).
BROWSER_SITE = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}
FORGED_OUTCOME = {**OUTCOME, "value": 1000}
PURGE_ALL = b'{"agent_key":"", "agent_key":null}'
SALVAGE = json.dumps(
    {
        "events": [
            {
                "id": "evt_forged",
                "idempotency_key": "forged-key",
                "kind": "outcome",
                "body": json.dumps(FORGED_OUTCOME),
                "fingerprint": None,
                "agent_key": OUTCOME["agent_key"],
                "event_type": OUTCOME["outcome_type"],
                "value": 1000,
                "received_at": 1.0,
                "created_at": "1970-01-01T00:00:01Z",
            }
        ]
    }
).encode()
#: Every POST route with a body it would act on.
POSTS: dict[str, bytes] = {
    "/v1/actions": json.dumps(ACTION).encode(),
    "/v1/outcomes": json.dumps(FORGED_OUTCOME).encode(),
    "/v1/batch": json.dumps({"outcomes": [FORGED_OUTCOME]}).encode(),
    "/v1/dead-letters/retry": b"{}",
    "/v1/dead-letters/purge": PURGE_ALL,
    "/v1/salvage": SALVAGE,
}
READS = (
    "/v1/status",
    "/v1/ledger",
    "/v1/dead-letters",
    "/v1/dead-letters/summary",
    "/v1/dead-letters/count",
    "/metrics",
    "/healthz",
    "/readyz",
    "/openapi.json",
)
JSON = {"Content-Type": "application/json"}


async def seeded(data_dir: Path) -> None:
    """A data directory with 3 dead letters and 2 queued events, as a sidecar left it."""
    store = await Store.open(data_dir, prune_interval_s=None)
    try:
        bodies = [{"agent_key": "agent_seed", "action_type": f"type_{i}"} for i in range(5)]
        await store.submit([parse_one("action", json.dumps(b).encode()) for b in bodies])
        leased = await store.lease(3, frozenset())
        await store.settle([DeadLetter(e.seq, "rejected", 422, "{}") for e in leased])
    finally:
        await store.close()


async def snapshot(client: httpx.AsyncClient, url: str) -> tuple[Any, ...]:
    """The counts, the dead letters and the ledger, read the way an operator does."""
    status = (await client.get(url + "/v1/status")).json()
    dead = (await client.get(url + "/v1/dead-letters")).json()
    ledger = (await client.get(url + "/v1/ledger")).json()
    assert 3 == len(dead["dead_letters"])
    return status["events"], [d["id"] for d in dead["dead_letters"]], ledger


async def start(
    sidecar_process: SidecarProcessFactory, tmp_path: Path, **env: str
) -> tuple[str, int]:
    data_dir = tmp_path / "data"
    await seeded(data_dir)
    proc = sidecar_process(None, data_dir=data_dir, **env)
    url = await proc.wait_ready()
    return url, int(url.rsplit(":", 1)[1])


def refused_counts(metrics: str) -> dict[str, float]:
    out = {}
    for line in metrics.splitlines():
        if line.startswith("valmi_sidecar_refused_requests_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


async def test_what_a_browser_page_can_send_is_refused_and_changes_nothing(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    url, port = await start(sidecar_process, tmp_path)
    async with httpx.AsyncClient(timeout=10) as client:
        before = await snapshot(client, url)
        seen: list[tuple[str, str, int, str]] = []

        async def post(path: str, body: bytes, headers: Mapping[str, str]) -> None:
            resp = await client.post(url + path, content=body, headers=dict(headers))
            seen.append((path, str(dict(headers)), resp.status_code, resp.json()["error"]["code"]))

        for path, body in POSTS.items():
            # fetch(no-cors) / sendBeacon with a Blob or Uint8Array body: no Content-Type.
            await post(path, body, BROWSER)
            # The same without the browser's headers (a proxy stripped them): still no JSON.
            await post(path, body, {})
            await post(path, body, {"Content-Type": "text/plain;charset=UTF-8"})
            await post(path, body, {"Content-Type": "application/x-www-form-urlencoded"})
            await post(path, body, {"Content-Type": "multipart/form-data; boundary=x"})
            await post(path, body, FORM)
            # JSON from a page (a browser would need a preflight; refused all the same).
            await post(path, body, {**BROWSER, **JSON})
            await post(path, body, {**JSON, "Sec-Fetch-Site": "cross-site"})
            # A rebinding page: same-origin to the browser, only Host tells it apart.
            await post(
                path, body, {**JSON, "Host": f"evil.test:{port}", "Sec-Fetch-Site": "same-origin"}
            )
        for path in READS:
            for headers in (
                {"Host": f"evil.test:{port}", "Sec-Fetch-Site": "same-origin"},
                {"Origin": PAGE, "Sec-Fetch-Site": "same-site"},
                {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},  # <img>, <script>
            ):
                resp = await client.get(url + path, headers=headers)
                seen.append((path, str(headers), resp.status_code, resp.json()["error"]["code"]))
        expected = {
            "unsupported_media_type": 415,
            "origin_not_allowed": 403,
            "host_not_allowed": 403,
        }
        for path, sent, status, code in seen:
            assert expected.get(code) == status, (path, sent, status, code)
        codes = [code for *_, code in seen]
        assert 6 * 4 == codes.count("unsupported_media_type")
        assert 6 * 4 + len(READS) * 2 == codes.count("origin_not_allowed")
        assert 6 + len(READS) == codes.count("host_not_allowed")
        assert before == await snapshot(client, url)
        refused = refused_counts((await client.get(url + "/metrics")).text)
        assert codes.count("host_not_allowed") == refused["host_not_allowed"]
        assert codes.count("origin_not_allowed") == refused["origin_not_allowed"]
        assert codes.count("unsupported_media_type") == refused["unsupported_media_type"]


async def test_the_clients_agents_use_still_work(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """httpx and requests with ``json=``, through 127.0.0.1 and localhost, and the sidecar's
    own CLI; an explicit charset and a ``+json`` media type are JSON too."""
    url, port = await start(sidecar_process, tmp_path)
    local = f"http://localhost:{port}"
    async with httpx.AsyncClient(timeout=10) as client:
        received = (await client.get(url + "/v1/status")).json()["events"]["received"]
        for base in (url, local):
            resp = await client.post(base + "/v1/actions", json=ACTION)
            assert 202 == resp.status_code, resp.text
        for media in ("application/json; charset=utf-8", "application/vnd.valmi+json"):
            resp = await client.post(
                url + "/v1/outcomes",
                content=json.dumps(OUTCOME).encode(),
                headers={"Content-Type": media},
            )
            assert 202 == resp.status_code, (media, resp.text)

        def with_requests(base: str) -> int:
            r = requests.post(base + "/v1/actions", json=ACTION, timeout=10)
            return r.status_code

        for base in (url, local):
            assert 202 == await asyncio.to_thread(with_requests, base)
        status = (await client.get(local + "/v1/status")).json()
        assert received + 6 == status["events"]["received"]

    for args in (("status", "--json"), ("dead-letters", "list", "--json")):
        code, out, err = await run_cli(*args, "--url", local)
        assert 0 == code, err
        assert json.loads(out)
    code, out, err = await run_cli("dead-letters", "retry", "--url", local)
    assert 0 == code, err
    assert out.startswith("re-queued 3 dead letters"), out


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl program")
async def test_curl_with_a_json_content_type_works_and_without_it_is_told_how(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    url, port = await start(sidecar_process, tmp_path)

    async def curl(*args: str) -> tuple[int, dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-s", "-o", "-", "-w", "\n%{http_code}", *args, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        body, _, code = out.decode().rpartition("\n")
        return int(code), json.loads(body)

    body = json.dumps(ACTION)
    for base in (url, f"http://localhost:{port}"):
        code, answer = await curl(
            base + "/v1/actions", "-H", "Content-Type: application/json", "-d", body
        )
        assert (202, "queued") == (code, answer["status"])
    # curl -d alone sends application/x-www-form-urlencoded: the error says what to add.
    code, answer = await curl(url + "/v1/actions", "-d", body)
    assert 415 == code
    assert "-H 'Content-Type: application/json'" in answer["error"]["message"]


async def test_ipv6_loopback_is_one_of_the_sidecars_names(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    await seeded(tmp_path / "data")
    proc = sidecar_process(None, data_dir=tmp_path / "data", VALMI_SIDECAR_LISTEN="[::1]:0")
    url = await proc.wait_ready()
    assert url.startswith("http://[::1]:")
    async with httpx.AsyncClient(timeout=10) as client:
        assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
        resp = await client.post(url + "/v1/actions", json=ACTION, headers={"Origin": PAGE})
        assert 403 == resp.status_code


async def test_allowed_origins_and_hosts_let_exactly_the_listed_ones_through(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    url, port = await start(
        sidecar_process,
        tmp_path,
        VALMI_SIDECAR_ALLOWED_ORIGINS="http://localhost:3000, https://Dash.Example",
        VALMI_SIDECAR_ALLOWED_HOSTS="sidecar.internal",
    )
    async with httpx.AsyncClient(timeout=10, headers=JSON) as client:
        for origin in ("http://localhost:3000", "https://dash.example"):
            resp = await client.post(
                url + "/v1/actions", json=ACTION, headers={"Origin": origin, **BROWSER_SITE}
            )
            assert 202 == resp.status_code, origin
            assert origin == resp.headers["Access-Control-Allow-Origin"]
            # The preflight a browser sends before a JSON POST is granted to it alone.
            pre = await client.options(
                url + "/v1/actions",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            assert 204 == pre.status_code
            assert "Content-Type" in pre.headers["Access-Control-Allow-Headers"]
            # A refusal still carries the header, so the page can read why.
            resp = await client.post(url + "/v1/actions", json={}, headers={"Origin": origin})
            assert (400, origin) == (
                resp.status_code,
                resp.headers.get("Access-Control-Allow-Origin"),
            )
        for origin in ("http://localhost:3001", "https://dash.example.evil", "null"):
            resp = await client.post(url + "/v1/actions", json=ACTION, headers={"Origin": origin})
            assert 403 == resp.status_code, origin
            assert "Access-Control-Allow-Origin" not in resp.headers
            pre = await client.options(
                url + "/v1/actions",
                headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
            )
            assert 403 == pre.status_code
        for host, expected in (
            (f"sidecar.internal:{port}", 202),
            ("SIDECAR.INTERNAL", 202),
            (f"localhost:{port}", 202),
            (f"[::1]:{port}", 202),
            (f"other.internal:{port}", 403),
            (f"sidecar.internal.evil:{port}", 403),
        ):
            resp = await client.post(url + "/v1/actions", json=ACTION, headers={"Host": host})
            assert expected == resp.status_code, host


async def test_with_an_ingest_token_the_token_is_the_gate_for_host(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """A pod's neighbours reach a token-protected sidecar by a service name: no Host check
    unless allowed_hosts is set; Origin and the media type are still refused."""
    token = "tok-local-only-5e1"
    auth = {"Authorization": f"Bearer {token}", **JSON}
    url, port = await start(sidecar_process, tmp_path, VALMI_SIDECAR_INGEST_TOKEN=token)
    async with httpx.AsyncClient(timeout=10) as client:
        service = {"Host": f"valmi-sidecar.default.svc:{port}"}
        resp = await client.post(url + "/v1/actions", json=ACTION, headers={**auth, **service})
        assert 202 == resp.status_code
        resp = await client.post(url + "/v1/actions", json=ACTION, headers=service)
        assert 401 == resp.status_code
        resp = await client.post(url + "/v1/actions", json=ACTION, headers={**auth, **BROWSER})
        assert 403 == resp.status_code
        resp = await client.post(
            url + "/v1/actions", content=json.dumps(ACTION).encode(), headers=auth
        )
        assert 202 == resp.status_code
        no_type = {"Authorization": auth["Authorization"]}
        resp = await client.post(
            url + "/v1/actions", content=json.dumps(ACTION).encode(), headers=no_type
        )
        assert 415 == resp.status_code


async def test_ingest_workers_refuse_browser_requests_too(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """With ingest workers, the workers serve ingest and pass operator routes through to
    the main process: both refuse a page's requests, and agents still get through."""
    url, port = await start(sidecar_process, tmp_path, VALMI_SIDECAR_INGEST_PROCESSES="2")
    async with httpx.AsyncClient(timeout=10) as client:
        before = await snapshot(client, url)
        for path, body in POSTS.items():
            resp = await client.post(url + path, content=body, headers=BROWSER)
            assert 403 == resp.status_code, path
            resp = await client.post(
                url + path, content=body, headers={"Host": f"evil.test:{port}"}
            )
            assert 403 == resp.status_code, path
            resp = await client.post(url + path, content=body)
            assert 415 == resp.status_code, path
        resp = await client.get(url + "/v1/ledger", headers={"Host": f"evil.test:{port}"})
        assert 403 == resp.status_code
        assert before == await snapshot(client, url)
        resp = await client.post(f"http://localhost:{port}/v1/actions", json=ACTION)
        assert 202 == resp.status_code


# -- the rules, without sockets ---------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8787", "localhost"),
        ("LocalHost", "localhost"),
        ("127.0.0.1:8787", "127.0.0.1"),
        ("[::1]:8787", "::1"),
        ("[::1]", "::1"),
        ("[0:0:0:0:0:0:0:1]:8787", "::1"),
        ("evil.test:8787", "evil.test"),
        ("::1", None),
        ("[::1", None),
        ("localhost:port", None),
        ("a b", None),
        ("", None),
    ],
)
def test_host_name_of_a_host_header(header: str, name: str | None) -> None:
    assert name == host_name(header)


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/problem+json", True),
        (None, False),
        ("", False),
        ("text/plain", False),
        ("text/json", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/jsonp", False),
    ],
)
def test_json_media_types(content_type: str | None, ok: bool) -> None:
    assert ok is is_json_media_type(content_type)


@pytest.mark.parametrize(
    ("origin", "fetch_site", "ok"),
    [
        (None, None, True),
        (None, "none", True),
        (None, "same-origin", True),
        (None, " Same-Site ", False),
        (None, "cross-site", False),
        ("http://localhost:3000", None, True),
        ("http://localhost:3000", "cross-site", True),
        ("http://evil.test", None, False),
        ("null", None, False),
    ],
)
def test_where_a_request_comes_from(origin: str | None, fetch_site: str | None, ok: bool) -> None:
    assert ok is check_origin(origin, fetch_site, frozenset({"http://localhost:3000"}))


def test_policy_of_a_sidecar_listening_beyond_loopback_with_a_token() -> None:
    off = Policy.build("0.0.0.0", (), (), token_set=True)
    assert off.hosts is None
    assert off.refusal("GET", {"Host": "anything:1"}) is None
    on = Policy.build("0.0.0.0", ("sidecar",), (), token_set=True)
    assert on.hosts is not None
    assert "host_not_allowed" == getattr(on.refusal("GET", {"Host": "other:1"}), "code", None)
    assert on.refusal("GET", {"Host": "sidecar:1"}) is None
    mine = Policy.build("10.1.2.3", (), (), token_set=False)
    assert mine.refusal("GET", {"Host": "10.1.2.3:8787"}) is None
