"""Hostile input: garbage bodies, huge and endless requests, slow and idle clients, and
the OpenAPI description kept true by schemathesis against a live sidecar.

Each case gets a clear 4xx or a closed connection; the sidecar (a real process) stays up
and keeps serving others; nothing of it is stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from openapi_spec_validator import validate

from valmi_sidecar import __version__, openapi
from valmi_sidecar.admin import add_admin_routes
from valmi_sidecar.config import Settings
from valmi_sidecar.fake_api import FakeValmi
from valmi_sidecar.receiver import Lifecycle, build_app

from .conftest import ACTION, SidecarProcess, SidecarProcessFactory, wait_until
from .scenarios import SECRET_PREFIX, hostile_fake, secret_leaks, sidecar_env, status

#: client_timeout_s of the sidecars here: how long a slow or idle client may take.
CLIENT_TIMEOUT_S = 2.0
IDLE_CONNECTIONS = 5000


@pytest.fixture
async def upstream() -> AsyncIterator[FakeValmi]:
    async with hostile_fake() as api:
        yield api


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as c:
        yield c


async def start(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, **env: str
) -> tuple[SidecarProcess, str]:
    env = {"VALMI_SIDECAR_CLIENT_TIMEOUT_S": str(CLIENT_TIMEOUT_S), **env}
    proc = sidecar_process(upstream.url, **sidecar_env(**env))
    return proc, await proc.wait_ready()


async def still_serving(client: httpx.AsyncClient, url: str, proc: SidecarProcess) -> None:
    """The process is up, a normal event is accepted, and nothing broke on the way."""
    assert proc.proc.poll() is None
    resp = await client.post(url + "/v1/actions", json=ACTION)
    assert 202 == resp.status_code, resp.text
    assert "request_failed" not in proc.log_text()
    assert [] == await secret_leaks(client, url, proc.log_text())


async def received(client: httpx.AsyncClient, url: str) -> int:
    return int((await status(client, url))["events"]["received"])


# --- raw HTTP on a socket ---------------------------------------------------------------


async def raw_request(
    url: str,
    head: bytes,
    body: Iterable[bytes] = (),
    *,
    delay_s: float = 0.0,
    half_close: bool = False,
    timeout: float = 15.0,
) -> tuple[int | None, bytes, float]:
    """Send ``head`` then ``body`` chunk by chunk (``delay_s`` apart) on a new connection.

    Return the answer's status (``None`` when the server closed without one), its body,
    and the seconds until the answer or the close.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    started = time.monotonic()

    async def send() -> None:
        try:
            writer.write(head)
            await writer.drain()
            for chunk in body:
                if delay_s:
                    await asyncio.sleep(delay_s)
                writer.write(chunk)
                await writer.drain()
            if half_close:
                writer.write_eof()
        except OSError:
            return  # the server closed: what the reader reports

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(timeout):
            try:
                status_line = await reader.readline()
                head_and_body = await reader.read(65536)
            except OSError:
                status_line, head_and_body = b"", b""
    finally:
        elapsed = time.monotonic() - started
        sender.cancel()
        writer.close()
    if not status_line.startswith(b"HTTP/1."):
        return None, b"", elapsed
    _, _, payload = head_and_body.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), payload, elapsed


def post_head(path: str, length: int | None, extra: str = "") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"{extra}{framing}\r\n\r\n"
    ).encode()


def error_code(payload: bytes) -> str:
    body: dict[str, Any] = json.loads(payload)
    return str(body["error"]["code"])


def sidecar_fds(proc: SidecarProcess) -> int:
    return len(os.listdir(f"/proc/{proc.proc.pid}/fd"))


def sidecar_rss_kib(proc: SidecarProcess) -> int:
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- bodies -----------------------------------------------------------------------------

DEEP = b'{"agent_key": "a", "action_type": "t", "metadata": ' + b'{"m":' * 1000 + b"1" + b"}" * 1000
MALFORMED: dict[str, bytes] = {
    "invalid UTF-8": b'{"agent_key": "a\xff\xfe", "action_type": "llm_call"}',
    "duplicate key": b'{"agent_key": "a", "action_type": "llm_call", "action_type": "tool_call"}',
    "duplicate key in metadata": (
        b'{"agent_key": "a", "action_type": "t", "metadata": {"tokens": 1, "tokens": 99}}'
    ),
    "metadata nested 1,000 deep": DEEP + b"}",
    "nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "lone surrogate": b'{"agent_key": "\\ud800", "action_type": "llm_call"}',
    "NaN": b'{"agent_key": "a", "outcome_type": "t", "value": NaN}',
    "truncated JSON": b'{"agent_key": "a", "action_type": "llm_',
}


async def test_malformed_bodies_get_400_and_nothing_is_stored(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    proc, url = await start(sidecar_process, upstream)
    for name, body in MALFORMED.items():
        resp = await client.post(
            url + "/v1/actions", content=body, headers={"Content-Type": "application/json"}
        )
        assert 400 == resp.status_code, f"{name}: {resp.text}"
        assert "invalid_request" == resp.json()["error"]["code"], name
    assert 0 == await received(client, url)
    assert {} == upstream.received
    await still_serving(client, url, proc)


async def test_100_mb_body_is_refused_with_413_without_being_read(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    proc, url = await start(sidecar_process, upstream)
    rss_before = sidecar_rss_kib(proc)
    mib = b"x" * (1 << 20)
    for head in (post_head("/v1/actions", 100 << 20), post_head("/v1/actions", None)):
        chunked = b"Transfer-Encoding" in head
        chunks = (
            (b"100000\r\n" + mib + b"\r\n" for _ in range(100))
            if chunked
            else (mib for _ in range(100))
        )
        status_code, payload, elapsed = await raw_request(url, head, chunks)
        assert 413 == status_code, (chunked, payload)
        assert "payload_too_large" == error_code(payload)
        assert elapsed < 5.0
    # The sidecar never held the body: its memory grew by less than the 1-MiB limit x 10.
    assert sidecar_rss_kib(proc) - rss_before < 10 * 1024
    assert 0 == await received(client, url)
    await still_serving(client, url, proc)


async def test_body_that_stops_half_way_is_refused_or_closed_and_nothing_stored(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    proc, url = await start(sidecar_process, upstream)
    body = json.dumps(ACTION).encode()
    head = post_head("/v1/actions", len(body))
    # The client shuts its side after half the body: a 400, or just the close.
    status_code, payload, _ = await raw_request(
        url, head, [body[: len(body) // 2]], half_close=True
    )
    assert status_code in (400, None)
    if status_code == 400:
        assert "incomplete_body" == error_code(payload)
    # The client sends half and then nothing: 408 once client_timeout_s has passed.
    status_code, payload, elapsed = await raw_request(url, head, [body[: len(body) // 2]])
    assert 408 == status_code
    assert "request_timeout" == error_code(payload)
    assert CLIENT_TIMEOUT_S - 0.5 < elapsed < CLIENT_TIMEOUT_S + 3
    assert 0 == await received(client, url)
    await still_serving(client, url, proc)


async def test_huge_headers_get_4xx_or_a_close_and_nothing_is_stored(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    proc, url = await start(sidecar_process, upstream)
    body = json.dumps(ACTION).encode()
    cases = {
        "one 100-KB header": post_head("/v1/actions", len(body), f"X-Big: {'a' * 100_000}\r\n"),
        "1,000 headers": post_head(
            "/v1/actions", len(body), "".join(f"X-H{i}: v\r\n" for i in range(1000))
        ),
        "a 100-KB request line": post_head("/v1/actions?" + "q" * 100_000, len(body)),
        "a 100-KB Idempotency-Key": post_head(
            "/v1/actions", len(body), f"Idempotency-Key: {'k' * 100_000}\r\n"
        ),
    }
    for name, head in cases.items():
        status_code, _, elapsed = await raw_request(url, head, [body])
        assert status_code is None or 400 <= status_code < 500, f"{name}: {status_code}"
        assert elapsed < 5.0, name
    assert 0 == await received(client, url)
    await still_serving(client, url, proc)


async def test_slow_clients_are_closed_after_the_timeout_and_cost_others_nothing(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    """One byte a second, in the headers and in the body, while others post at full speed."""
    proc, url = await start(sidecar_process, upstream)
    body = json.dumps(ACTION).encode()
    head = post_head("/v1/actions", len(body))
    slow_head = asyncio.create_task(
        raw_request(url, b"", [head[i : i + 1] for i in range(len(head))], delay_s=1.0)
    )
    slow_body = asyncio.create_task(
        raw_request(url, head, [body[i : i + 1] for i in range(len(body))], delay_s=1.0)
    )
    latencies = []
    while not (slow_head.done() and slow_body.done()):
        t0 = time.monotonic()
        resp = await client.post(url + "/v1/actions", json=ACTION)
        latencies.append(time.monotonic() - t0)
        assert 202 == resp.status_code
        await asyncio.sleep(0.02)
    head_status, _, head_s = await slow_head
    body_status, payload, body_s = await slow_body
    # Headers never finished: closed without an answer. Body too slow: 408.
    assert (None, 408) == (head_status, body_status)
    assert "request_timeout" == error_code(payload)
    assert CLIENT_TIMEOUT_S - 0.5 < head_s < CLIENT_TIMEOUT_S + 3
    assert CLIENT_TIMEOUT_S - 0.5 < body_s < CLIENT_TIMEOUT_S + 3
    assert len(latencies) >= 20
    assert max(latencies) < 0.5  # the others did not wait for the slow ones
    assert len(latencies) == await received(client, url)  # only the normal posts
    await still_serving(client, url, proc)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        hard = needed  # root may raise the hard limit; anyone else gets a clear error
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def test_5000_idle_connections_cost_others_nothing_and_are_closed(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    _raise_fd_limit(IDLE_CONNECTIONS * 2 + 1000)  # the sidecar process inherits it
    proc, url = await start(sidecar_process, upstream, VALMI_SIDECAR_CLIENT_TIMEOUT_S="4")
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    baseline_fds = sidecar_fds(proc)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(IDLE_CONNECTIONS // 250):
            idle += await asyncio.gather(
                *(asyncio.open_connection(parts.hostname, parts.port) for _ in range(250))
            )
        await wait_until(
            lambda: sidecar_fds(proc) >= baseline_fds + IDLE_CONNECTIONS,
            10,
            "the sidecar holding every idle connection",
        )
        held_fds = sidecar_fds(proc)
        t0 = time.monotonic()
        answers = await asyncio.gather(
            *(client.post(url + "/v1/actions", json=ACTION) for _ in range(100))
        )
        busy_s = time.monotonic() - t0
        # Every other client is served in full (speed is measured in benchmarks/, not here).
        assert [202] * 100 == [r.status_code for r in answers]

        async def closed(reader: asyncio.StreamReader) -> bool:
            try:
                return b"" == await reader.read(1)
            except OSError:
                return True

        async with asyncio.timeout(15):
            results = await asyncio.gather(*(closed(r) for r, _ in idle))
        assert all(results)  # the server closed each one after client_timeout_s
    finally:
        for _, writer in idle:
            writer.close()
    await wait_until(lambda: sidecar_fds(proc) < baseline_fds + 50, 10, "fds back to baseline")
    print(  # noqa: T201 - a figure for docs/RELIABILITY.md
        f"idle_connections held_fds={held_fds} baseline_fds={baseline_fds} 100_posts_s={busy_s:.2f}"
    )
    # A new client: the pooled connections of the first sat idle past client_timeout_s
    # too, and the server closing them races with their reuse (as with any keep-alive).
    async with httpx.AsyncClient(timeout=10.0) as fresh:
        assert 100 == await received(fresh, url)
        await still_serving(fresh, url, proc)


# --- the OpenAPI description ---------------------------------------------------------


async def test_openapi_document_is_valid_3_1_served_and_covers_the_local_api(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, client: httpx.AsyncClient
) -> None:
    doc = openapi.document()
    validate(doc)  # openapi-spec-validator: raises on any fault
    assert "3.1.0" == doc["openapi"]
    assert __version__ == doc["info"]["version"]
    _, url = await start(sidecar_process, upstream)
    resp = await client.get(url + "/openapi.json")
    assert 200 == resp.status_code
    assert "application/json" == resp.headers["Content-Type"].split(";")[0]
    assert doc == resp.json()
    core = {"/v1/actions", "/v1/outcomes", "/v1/batch", "/v1/status", "/metrics"}
    assert core | {"/healthz", "/readyz", "/openapi.json"} <= set(doc["paths"])
    for path in doc["paths"]:  # every documented path exists
        method = next(iter(doc["paths"][path]))
        served = await client.request(method.upper(), url + path.replace("{id}", "evt_0"), json={})
        if "{id}" in path:  # the route exists: it looked for the dead letter
            assert "no dead letter with id evt_0" in served.text, served.text
        else:
            assert 404 != served.status_code, path
    # and every route the sidecar serves is documented (but the catch-all that answers
    # 404 and 405 for what no route takes)
    app = build_app(Settings(), Lifecycle(), dict, bytes)
    add_admin_routes(app)
    served_paths = {
        re.sub(r"\{(\w+):[^}]*\}$", r"{\1}", r.canonical) for r in app.router.resources()
    }
    assert "/{tail}" in served_paths
    assert served_paths - {"/{tail}"} == set(doc["paths"])


async def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_spec(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, tmp_path: Path
) -> None:
    """Examples, coverage and fuzzing phases, 25 examples per operation, fixed seed.

    Every check but positive_data_acceptance: the date-time format admits a few
    timestamps the sidecar refuses (400), such as a leap second (23:59:60Z)."""
    token = "tok-schemathesis-81d2"
    proc, url = await start(sidecar_process, upstream, VALMI_SIDECAR_INGEST_TOKEN=token)
    argv = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        url + "/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "25",
        "--seed",
        "6",
        "--workers",
        "1",
        "--suppress-health-check",
        "all",
        "--request-timeout",
        "10",
    ]
    done = await asyncio.to_thread(
        subprocess.run,
        argv,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )
    out = done.stdout + done.stderr
    assert 0 == done.returncode, out[-3000:] + proc.log_text()[-6000:]
    assert " passed" in out, out[-3000:]
    assert "failures" not in out.lower(), out[-3000:]
    log = proc.log_text()
    assert "request_failed" not in log
    assert token not in log
    assert SECRET_PREFIX not in log
