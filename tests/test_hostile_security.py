"""Security under hostile conditions: the ingest token, non-loopback binds, and the API
key kept out of every log line, error, status and metric, even when the upstream echoes
it back in its error bodies."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from valmi_sidecar.fake_api import FakeValmi

from .conftest import ACTION, SidecarProcessFactory, wait_until
from .scenarios import SECRET_KEY, SECRET_PREFIX, hostile_fake, sidecar_env, status

TOKEN = "tok-hostile-4c1f9e0a7b"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeValmi]:
    async with hostile_fake() as api:
        yield api


async def test_ingest_token_accepts_only_the_exact_token_and_refusals_store_nothing(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi
) -> None:
    proc = sidecar_process(upstream.url, **sidecar_env(VALMI_SIDECAR_INGEST_TOKEN=TOKEN))
    url = await proc.wait_ready()
    wrong = {
        "missing": None,
        "empty": "Bearer",
        "same length, last char differs": f"Bearer {TOKEN[:-1]}X",
        "a prefix": f"Bearer {TOKEN[:-1]}",
        "longer": f"Bearer {TOKEN}0",
        "another scheme": f"Basic {TOKEN}",
        "the API key": f"Bearer {SECRET_KEY}",
        "non-ASCII": "Bearer tök",
    }
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=10) as client:
        for name, value in wrong.items():
            headers = {} if value is None else {b"Authorization": value.encode()}
            for path in ("/v1/actions", "/v1/batch"):
                body = ACTION if path == "/v1/actions" else {"actions": [ACTION]}
                resp = await client.post(url + path, json=body, headers=headers)
                assert 401 == resp.status_code, name
                assert "unauthorized" == resp.json()["error"]["code"]
                assert TOKEN not in resp.text
            assert 401 == (await client.get(url + "/v1/status", headers=headers)).status_code
        assert 0 == (await status(client, url, **auth))["events"]["received"]
        lower = {"Authorization": f"bearer {TOKEN}"}
        assert (
            202 == (await client.post(url + "/v1/actions", json=ACTION, headers=lower)).status_code
        )
        assert 1 == (await status(client, url, **auth))["events"]["received"]
        await wait_until(lambda: len(upstream.received) == 1, 10, "delivery")
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    log = proc.log_text()
    assert TOKEN not in log
    assert SECRET_PREFIX not in log


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.1:0"])
async def test_refuses_to_start_on_a_non_loopback_address_without_a_token(listen: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    env |= {"VALMI_SIDECAR_LOG_FORMAT": "json", "VALMI_API_KEY": SECRET_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "valmi_sidecar",
        "run",
        "--listen",
        listen,
        "--data-dir",
        os.devnull + "-never-created",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert 0 != proc.returncode
    assert "ingest token" in text.lower() or "INGEST_TOKEN" in text, text
    assert "sidecar_ready" not in text
    assert SECRET_PREFIX not in text
    assert not await asyncio.to_thread(os.path.exists, os.devnull + "-never-created")


class EchoingUpstream:
    """An upstream that answers every request with ``status`` and a body that quotes the
    request's Authorization header just past ``pad`` characters (where an excerpt of the
    body is likely to be cut)."""

    def __init__(self, status: int, pad: int) -> None:
        self.status = status
        self.pad = pad
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        body = "e" * self.pad + " you sent " + request.headers.get("Authorization", "")
        return web.Response(status=self.status, text=body)

    async def __aenter__(self) -> EchoingUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.mark.parametrize(
    ("status_code", "pad"),
    [
        (500, 10),  # retried: last_error
        (500, 460),  # the key straddles the 500-character excerpt
        (400, 460),  # dead-lettered: the reason
        (401, 10),  # paused: last_error
    ],
)
async def test_api_key_echoed_by_the_upstream_never_reaches_logs_status_metrics_or_dead_letters(
    sidecar_process: SidecarProcessFactory, status_code: int, pad: int
) -> None:
    async with EchoingUpstream(status_code, pad) as echo:
        proc = sidecar_process(echo.url, **sidecar_env(VALMI_SIDECAR_LOG_LEVEL="debug"))
        url = await proc.wait_ready()
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(5):
                resp = await client.post(url + "/v1/actions", json=ACTION)
                assert 202 == resp.status_code
            await wait_until(lambda: echo.requests >= 5, 10, "upstream answers")

            async def errored() -> bool:
                return (await status(client, url))["upstream"]["last_error"] is not None

            await wait_until(errored, 10, "an upstream error in the status")
            seen = [(await client.get(url + p)).text for p in ("/v1/status", "/metrics")]
            dead = await client.get(url + "/v1/dead-letters")
            if dead.status_code != 404:
                seen.append(dead.text)
            if status_code == 400:
                await wait_until(
                    lambda: "you sent" in proc.log_text(), 10, "the dead letter's reason logged"
                )
        proc.signal(signal.SIGTERM)
        assert 0 == await proc.wait_exit()
    seen.append(proc.log_text())
    assert "you sent" in "".join(seen)  # the echo itself did arrive
    # Not the key, and not a recognisable piece of it either.
    for text in seen:
        assert SECRET_PREFIX not in text
        assert SECRET_KEY[-12:] not in text
