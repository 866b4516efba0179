"""The upstream client through an egress proxy named by the environment.

The proxy is a real forwarding proxy on loopback (absolute-URI requests and CONNECT),
written here with asyncio; the fake Valmi API is behind it under a name that only the
proxy can reach, so an event that arrives went through the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from valmi_sidecar.config import env_proxy, load_settings
from valmi_sidecar.fake_api import FakeValmi
from valmi_sidecar.upstream import classify, classify_exception

from .conftest import ACTION, SidecarProcessFactory, wait_until

#: A name that resolves nowhere: only the proxy knows where it is.
UPSTREAM_HOST = "valmi-upstream.invalid"
PROXY_USER = "egress"
PROXY_PASSWORD = "pr0xy-s3cret-pw"


@dataclass(kw_only=True)
class LoopbackServer:
    """A server on 127.0.0.1 that owns its connections' tasks: ``stop`` cancels them.
    Subclasses serve one connection in ``_serve_one``."""

    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def listen(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


@dataclass
class ForwardingProxy(LoopbackServer):
    """An HTTP forward proxy that sends every request to one target, and requires Basic
    credentials when ``credentials`` is set (407 otherwise)."""

    target: tuple[str, int]
    credentials: str | None = None
    #: (method, request target, Proxy-Authorization or None) of each request, in order.
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.listen()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = [line for line in lines[1:] if line]
        auth = next(
            (
                h.partition(":")[2].strip()
                for h in headers
                if h.lower().startswith("proxy-authorization:")
            ),
            None,
        )
        self.seen.append((method, target, auth))
        if self.credentials is not None and auth != self.credentials:
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="egress"\r\nContent-Length: 0\r\n'
                b"Connection: close\r\n\r\n"
            )
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
            else:
                # One request per connection: the answer ends the tunnel.
                kept = [
                    h
                    for h in headers
                    if h.split(":")[0].lower()
                    not in ("connection", "proxy-connection", "proxy-authorization")
                ]
                rewritten = [f"{method} {target} {version}", *kept, "Connection: close", "", ""]
                up_writer.write("\r\n".join(rewritten).encode("latin-1"))
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
async def proxy(fake: FakeValmi) -> AsyncIterator[ForwardingProxy]:
    p = ForwardingProxy((fake.host, fake.port), credentials=basic(PROXY_USER, PROXY_PASSWORD))
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def test_events_reach_upstream_through_the_proxy_and_its_password_is_never_logged(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, proxy: ForwardingProxy
) -> None:
    proc = sidecar_process(
        f"http://{UPSTREAM_HOST}:{fake.port}",
        HTTP_PROXY=f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy.port}",
        NO_PROXY="example.com,.internal",
    )
    url = await proc.wait_ready()
    async with httpx.AsyncClient(timeout=10.0) as client:
        for _ in range(5):
            resp = await client.post(f"{url}/v1/actions", json=ACTION)
            assert 202 == resp.status_code
    await wait_until(lambda: len(fake.received) == 5, 15, "five events through the proxy")

    assert 5 <= len(proxy.seen)
    for method, target, auth in proxy.seen:
        assert "POST" == method
        assert target.startswith(f"http://{UPSTREAM_HOST}:{fake.port}/v1/actions")
        assert basic(PROXY_USER, PROXY_PASSWORD) == auth
    chosen = [e for e in proc.log_events() if e.get("event") == "upstream_proxy"]
    assert f"http://[credentials]@127.0.0.1:{proxy.port}" == chosen[0]["proxy"]
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    assert PROXY_PASSWORD not in proc.log_text()


@dataclass
class TlsFront(LoopbackServer):
    """A TLS server for ``UPSTREAM_HOST`` (a certificate made here with openssl, trusted by
    the sidecar through SSL_CERT_FILE) that passes the decrypted bytes to the fake API."""

    target: tuple[str, int]
    cert: Path
    key: Path

    async def start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        await self.listen(ctx)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={UPSTREAM_HOST}",
            "-addext",
            f"subjectAltName=DNS:{UPSTREAM_HOST}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def test_an_https_api_is_reached_through_a_connect_tunnel(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, tmp_path: Path
) -> None:
    """TLS runs end to end inside the tunnel; the credentials go on the CONNECT only."""
    cert, key = make_certificate(tmp_path)
    front = TlsFront((fake.host, fake.port), cert, key)
    await front.start()
    tunnel = ForwardingProxy(("127.0.0.1", front.port), basic(PROXY_USER, PROXY_PASSWORD))
    await tunnel.start()
    try:
        proc = sidecar_process(
            f"https://{UPSTREAM_HOST}",
            HTTPS_PROXY=f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{tunnel.port}",
            SSL_CERT_FILE=str(cert),
        )
        url = await proc.wait_ready()
        async with httpx.AsyncClient(timeout=10.0) as client:
            for _ in range(3):
                resp = await client.post(f"{url}/v1/actions", json=ACTION)
                assert 202 == resp.status_code
        await wait_until(lambda: len(fake.received) == 3, 15, "three events through the tunnel")
        assert tunnel.seen
        for method, target, auth in tunnel.seen:
            assert ("CONNECT", f"{UPSTREAM_HOST}:443") == (method, target)
            assert basic(PROXY_USER, PROXY_PASSWORD) == auth
        proc.signal(signal.SIGTERM)
        assert 0 == await proc.wait_exit()
        assert PROXY_PASSWORD not in proc.log_text()
    finally:
        await tunnel.stop()
        await front.stop()


async def test_a_proxy_refusing_the_credentials_keeps_every_event_queued(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, proxy: ForwardingProxy
) -> None:
    proc = sidecar_process(
        f"http://{UPSTREAM_HOST}:{fake.port}",
        HTTP_PROXY=f"http://{PROXY_USER}:wrong-{PROXY_PASSWORD}@127.0.0.1:{proxy.port}",
    )
    url = await proc.wait_ready()
    async with httpx.AsyncClient(timeout=10.0) as client:
        assert 202 == (await client.post(f"{url}/v1/actions", json=ACTION)).status_code
        await wait_until(lambda: len(proxy.seen) >= 2, 10, "attempts refused by the proxy")
        status = (await client.get(f"{url}/v1/status")).json()
    assert {} == fake.received
    assert 1 == status["events"]["queued"]
    assert 0 == status["events"]["dead_lettered"]
    assert "407" in status["upstream"]["last_error"]
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    assert PROXY_PASSWORD not in proc.log_text()


async def test_proxy_from_env_false_connects_directly(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, proxy: ForwardingProxy
) -> None:
    proc = sidecar_process(
        f"http://{UPSTREAM_HOST}:{fake.port}",
        HTTP_PROXY=f"http://127.0.0.1:{proxy.port}",
        VALMI_SIDECAR_PROXY_FROM_ENV="false",
    )
    url = await proc.wait_ready()
    async with httpx.AsyncClient(timeout=10.0) as client:
        assert 202 == (await client.post(f"{url}/v1/actions", json=ACTION)).status_code

        async def failed_directly() -> bool:
            status = (await client.get(f"{url}/v1/status")).json()
            return status["upstream"]["last_error"] is not None

        await wait_until(failed_directly, 10, "a direct attempt that cannot resolve the name")
    assert [] == proxy.seen
    assert not any(e.get("event") == "upstream_proxy" for e in proc.log_events())
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()


async def test_connect_tunnel_of_the_test_proxy_reaches_the_target(
    fake: FakeValmi, proxy: ForwardingProxy
) -> None:
    """The proxy's CONNECT side, which an https:// API uses, carries bytes both ways."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    creds = basic(PROXY_USER, PROXY_PASSWORD)
    writer.write(
        f"CONNECT {UPSTREAM_HOST}:443 HTTP/1.1\r\nHost: {UPSTREAM_HOST}:443\r\n"
        f"Proxy-Authorization: {creds}\r\n\r\n".encode()
    )
    assert b"HTTP/1.1 200" in await reader.readuntil(b"\r\n\r\n")
    writer.write(b"GET /_fake/faults HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("api_url", "env", "expected"),
    [
        ("https://api.valmi.io", {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
        ("https://api.valmi.io", {"https_proxy": "p:3128"}, "http://p:3128"),
        ("https://api.valmi.io", {"HTTP_PROXY": "http://p:3128"}, None),
        ("http://api.valmi.io", {"HTTP_PROXY": "http://p:3128"}, "http://p:3128"),
        ("https://api.valmi.io", {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "*"}, None),
        ("https://api.valmi.io", {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "valmi.io"}, None),
        ("https://api.valmi.io", {"HTTPS_PROXY": "http://p:3128", "no_proxy": ".valmi.io"}, None),
        (
            "https://api.valmi.io",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "api.valmi.io:443"},
            None,
        ),
        (
            "https://api.valmi.io",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "api.valmi.io:8443"},
            "http://p:3128",
        ),
        (
            "https://api.valmi.io",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "notvalmi.io"},
            "http://p:3128",
        ),
        ("http://127.0.0.1:8788", {"HTTP_PROXY": "http://p:3128"}, None),
        ("http://localhost:8788", {"HTTP_PROXY": "http://p:3128"}, None),
    ],
)
def test_env_proxy_reads_the_variables_as_curl_does(
    api_url: str, env: dict[str, str], expected: str | None
) -> None:
    assert expected == env_proxy(api_url, env)


def test_an_unusable_proxy_url_stops_run_with_exit_2_and_hides_the_password(
    tmp_path: Path,
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("VALMI") and "proxy" not in k.lower()
    }
    env.update(
        XDG_STATE_HOME=str(tmp_path / "state"),
        HTTPS_PROXY="https://user:hunter2-pw@proxy.internal:3128",
    )

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "valmi_sidecar", *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = run("run")
    assert 2 == result.returncode
    assert "only http:// proxies are supported" in result.stderr
    assert "proxy_from_env" in result.stderr
    assert "hunter2-pw" not in result.stderr + result.stdout
    assert not (tmp_path / "state").exists(), "nothing started"
    # The operator commands never go upstream: the variable is not their concern.
    assert "only http:// proxies" not in run("status").stderr
    assert not load_settings(env={**env, "VALMI_SIDECAR_PROXY_FROM_ENV": "false"}).proxy_from_env


def test_a_proxy_refusing_credentials_pauses_forwarding() -> None:
    """407 is the proxy's answer, not upstream's: pause and keep every event, whether it
    came as an answer (plain HTTP) or as a failed CONNECT (https)."""
    answered = classify(407, {}, "")
    assert ("pause", 407) == (answered.verdict, answered.status)
    assert "HTTPS_PROXY" in answered.error
    url = URL("https://api.valmi.io/v1/actions")
    info = aiohttp.RequestInfo(url, "CONNECT", CIMultiDictProxy(CIMultiDict()), url)
    tunnel = classify_exception(aiohttp.ClientHttpProxyError(info, (), status=407))
    assert ("pause", 407) == (tunnel.verdict, tunnel.status)
    assert "HTTPS_PROXY" in tunnel.error
