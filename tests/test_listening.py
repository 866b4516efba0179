"""Where a sidecar listens (``listening.py``): a failed bind said plainly, the ops listener
on a real loopback port, and the address record operator commands read."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from valmi_sidecar import __version__
from valmi_sidecar.config import ADDRESS_NAME
from valmi_sidecar.listening import (
    ListenError,
    address_text,
    listen,
    listen_error,
    ops_listener,
    record_address,
    url_of,
)
from valmi_sidecar.receiver import make_runner
from valmi_sidecar.workers import IngestWorkers

from .conftest import fast_settings, occupied_port


def no_workers(_socks: list[socket.socket], _port: int) -> IngestWorkers:
    raise AssertionError("one process: no ingest workers")


async def hello(_request: web.Request) -> web.Response:
    return web.Response(text="hello")


def test_listen_error_says_what_to_do_for_each_bind_failure() -> None:
    in_use = listen_error(OSError(errno.EADDRINUSE, "in use"), "127.0.0.1:8321")
    assert in_use is not None
    assert "cannot listen on 127.0.0.1:8321: the address is already in use" == str(in_use)
    assert "sport = :8321" in in_use.action
    denied = listen_error(OSError(errno.EACCES, "denied"), "127.0.0.1:80", flag="--ops-listen")
    assert denied is not None
    assert "--ops-listen" in denied.action
    assert listen_error(OSError(errno.EADDRNOTAVAIL, "x"), "10.9.9.9:1") is not None
    assert listen_error(OSError(errno.EMFILE, "too many files"), "127.0.0.1:1") is None


def test_an_ipv6_host_is_bracketed() -> None:
    assert "[::1]:8321" == address_text("::1", 8321)
    assert "127.0.0.1:8321" == address_text("127.0.0.1", 8321)
    assert "http://[::1]:8321" == url_of("::1", 8321)


async def test_listen_on_a_taken_port_raises_a_listen_error(tmp_path: Path) -> None:
    app = web.Application()
    with occupied_port() as port:
        settings = fast_settings(tmp_path, None, listen=f"127.0.0.1:{port}")
        runner = make_runner(app, settings)
        await runner.setup()
        try:
            with pytest.raises(ListenError, match="already in use"):
                await listen(runner, settings, no_workers)
        finally:
            await runner.cleanup()


async def test_listen_serves_on_the_address_it_returns(tmp_path: Path) -> None:
    app = web.Application()
    app.router.add_get("/hello", hello)
    settings = fast_settings(tmp_path, None)
    runner = make_runner(app, settings)
    await runner.setup()
    try:
        host, port = await listen(runner, settings, no_workers)
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"{url_of(host, port)}/hello")
        assert (200, "hello") == (resp.status_code, resp.text)
    finally:
        await runner.cleanup()


async def test_the_ops_listener_serves_while_the_block_runs(tmp_path: Path) -> None:
    ops = web.Application()
    ops.router.add_get("/hello", hello)
    settings = fast_settings(tmp_path, None, ops_listen="127.0.0.1:0")
    async with httpx.AsyncClient() as client:
        async with ops_listener(ops, settings) as (host, port):
            resp = await client.get(f"{url_of(host, port)}/hello")
            assert 200 == resp.status_code
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url_of(host, port)}/hello")


async def test_an_ops_listen_address_taken_names_the_setting(tmp_path: Path) -> None:
    with occupied_port() as port:
        settings = fast_settings(tmp_path, None, ops_listen=f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=re.escape("ops_listen '127.0.0.1:")):
            async with ops_listener(web.Application(), settings):
                pytest.fail("the ops listener cannot have started")


def test_record_address_writes_a_private_record(tmp_path: Path) -> None:
    path = record_address(tmp_path, "http://127.0.0.1:8321")
    assert tmp_path / ADDRESS_NAME == path
    record = json.loads(path.read_text())
    assert {"url": "http://127.0.0.1:8321", "pid": os.getpid(), "version": __version__} == record
    assert 0o600 == path.stat().st_mode & 0o777
    assert [ADDRESS_NAME] == [p.name for p in tmp_path.iterdir()]


def test_record_address_in_a_missing_directory_is_not_fatal(tmp_path: Path) -> None:
    assert record_address(tmp_path / "missing", "http://127.0.0.1:8321") is None
