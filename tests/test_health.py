"""``valmi-sidecar healthcheck``: the image's HEALTHCHECK and exec probes. Exit 0 when
ready (``--live``: alive), 1 with one line saying why not, and cheap enough to run every
few seconds (nothing of the service is imported)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from valmi_sidecar.config import Settings
from valmi_sidecar.health import probe_url

from .conftest import ACTION, SidecarFactory


async def healthcheck(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """``python -m valmi_sidecar healthcheck ARGS`` with only ``env`` set; exit code,
    stdout, stderr. Asynchronous, so that a sidecar in this event loop can answer it."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    full.update({"HOME": str(tmp_path), **env})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "valmi_sidecar",
        "healthcheck",
        *args,
        env=full,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def listen_of(url: str) -> str:
    return url.removeprefix("http://")


async def test_ready_sidecar_exits_0(tmp_path: Path, sidecar_factory: SidecarFactory) -> None:
    _, url = await sidecar_factory(None)
    code, out, err = await healthcheck(tmp_path, VALMI_SIDECAR_LISTEN=listen_of(url))
    assert (0, "") == (code, err)
    assert f"ready: {url}/readyz\n" == out


async def test_asks_the_ops_listener_when_there_is_one(
    tmp_path: Path, sidecar_factory: SidecarFactory
) -> None:
    """The local API's address is wrong on purpose: the answer comes from ops_listen."""
    sidecar, _ = await sidecar_factory(None, ops_listen="127.0.0.1:0")
    assert sidecar.ops_address is not None
    ops = "{}:{}".format(*sidecar.ops_address)
    code, out, _ = await healthcheck(
        tmp_path, VALMI_SIDECAR_LISTEN="127.0.0.1:9", VALMI_SIDECAR_OPS_LISTEN=ops
    )
    assert 0 == code
    assert f"ready: http://{ops}/readyz\n" == out


async def test_not_ready_exits_1_with_the_reason_and_live_still_passes(
    tmp_path: Path, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """A full queue: not ready (one line with the sidecar's reason), but alive."""
    _, url = await sidecar_factory(None, max_queue_events=1)
    assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    env = {"VALMI_SIDECAR_LISTEN": listen_of(url)}
    code, out, err = await healthcheck(tmp_path, **env)
    assert (1, "") == (code, out)
    assert 1 == len(err.splitlines())
    assert f"{url}/readyz answered HTTP 503: the queue is full" in err
    code, out, _ = await healthcheck(tmp_path, "--live", **env)
    assert 0 == code
    assert f"alive: {url}/healthz\n" == out


async def test_nothing_listening_exits_1(tmp_path: Path) -> None:
    code, out, err = await healthcheck(tmp_path, VALMI_SIDECAR_LISTEN="127.0.0.1:9")
    assert (1, "") == (code, out)
    assert "no sidecar answers at http://127.0.0.1:9/readyz" in err
    assert 1 == len(err.splitlines())


async def test_bad_configuration_exits_1_not_2(tmp_path: Path) -> None:
    """Docker reserves exit code 2: a configuration error is unhealthy (1), said in a line."""
    code, _, err = await healthcheck(tmp_path, VALMI_SIDECAR_LISTEN="nowhere")
    assert 1 == code
    assert "VALMI_SIDECAR_LISTEN" in err
    assert 1 == len(err.splitlines())


async def test_imports_nothing_of_the_service(tmp_path: Path) -> None:
    """The light path: no aiohttp, httpx, structlog, prometheus-client or store."""
    script = (
        "import json, sys; from valmi_sidecar.entry import main; "
        "code = main(['healthcheck', '--url', 'http://127.0.0.1:9']); "
        "print(json.dumps([code, sorted(sys.modules)]))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env={**os.environ, "HOME": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    code, modules = json.loads(out)
    assert 1 == code
    heavy = ("aiohttp", "httpx", "structlog", "prometheus_client", "msgspec")
    loaded = {m.split(".")[0] for m in modules}
    assert set() == loaded & set(heavy)
    # A package counts as one module: valmi_sidecar.config.settings is valmi_sidecar.config.
    ours = {".".join(m.split(".")[:2]) for m in modules if m.startswith("valmi_sidecar.")}
    assert {"valmi_sidecar.entry", "valmi_sidecar.health", "valmi_sidecar.config"} <= ours
    assert set() == ours - {
        "valmi_sidecar.entry",
        "valmi_sidecar.health",
        "valmi_sidecar.config",
        # What the settings check with, standard library only:
        "valmi_sidecar.guard",  # allowed_origins and allowed_hosts
        "valmi_sidecar.disk",  # the smallest disk budget
    }


@pytest.mark.parametrize(
    ("listen", "ops", "expected"),
    [
        ("127.0.0.1:8787", "", "http://127.0.0.1:8787/readyz"),
        ("0.0.0.0:8787", "", "http://127.0.0.1:8787/readyz"),
        ("[::]:8787", "", "http://[::1]:8787/readyz"),
        ("[::1]:8787", "", "http://[::1]:8787/readyz"),
        ("127.0.0.1:8787", "0.0.0.0:9787", "http://127.0.0.1:9787/readyz"),
        ("127.0.0.1:8787", "10.0.0.5:9787", "http://10.0.0.5:9787/readyz"),
    ],
)
def test_probe_url(listen: str, ops: str, expected: str) -> None:
    assert expected == probe_url(Settings(listen=listen, ops_listen=ops), "/readyz")


def test_listed_and_served_by_the_full_command_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    """``valmi-sidecar --help`` names it, and cli.main runs it the same way."""
    from valmi_sidecar import cli  # noqa: PLC0415

    assert "healthcheck" in cli.build_parser().format_help()
    assert 1 == cli.main(["healthcheck", "--url", "http://127.0.0.1:9", "--timeout", "2"])
    assert "no sidecar answers at http://127.0.0.1:9/readyz" in capsys.readouterr().err
