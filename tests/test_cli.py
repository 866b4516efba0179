"""The command line as users run it (real subprocesses), and the logging it sets up."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from aiohttp import web

from valmi_sidecar import __version__
from valmi_sidecar.cli import format_status, format_status_details, status_url
from valmi_sidecar.config import PLAIN_FIELDS, Settings, env_var, flag
from valmi_sidecar.logs import configure_logging


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The process environment without any VALMI_* variable, state kept under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    env.pop("STATE_DIRECTORY", None)
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env.update(extra)
    return env


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "valmi_sidecar", *args],
        capture_output=True,
        text=True,
        env=clean_env(tmp_path, **env),
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- help and version -----------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    result = cli(tmp_path, "--version")
    assert 0 == result.returncode
    assert f"valmi-sidecar {__version__}" == result.stdout.strip()


def test_top_level_help_lists_commands_and_secrets(tmp_path: Path) -> None:
    result = cli(tmp_path, "--help")
    assert 0 == result.returncode
    for word in ("run", "fake-api", "status", "VALMI_API_KEY", "VALMI_SIDECAR_INGEST_TOKEN"):
        assert word in result.stdout


def test_run_help_explains_every_setting(tmp_path: Path) -> None:
    """Each non-secret field has a flag whose help names its default and its variable."""
    result = cli(tmp_path, "run", "--help")
    assert 0 == result.returncode
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    for name in PLAIN_FIELDS:
        assert flag(name) in text
        assert f"env: {env_var(name)}" in text
    for word in ("--config", "default: 1073741824", "default: 127.0.0.1:8787", "VALMI_API_KEY"):
        assert word in text
    assert "--api-key " not in text
    assert "--ingest-token " not in text


def test_fake_api_help(tmp_path: Path) -> None:
    result = cli(tmp_path, "fake-api", "--help")
    assert 0 == result.returncode
    text = " ".join(result.stdout.split())
    for word in ("--listen", "127.0.0.1:8788", "--api-key", "sk_test_fake", "--rate-limit-per-min"):
        assert word in text


def test_status_help(tmp_path: Path) -> None:
    result = cli(tmp_path, "status", "--help")
    assert 0 == result.returncode
    text = " ".join(result.stdout.split())
    for word in ("--url", "--json", "--config", "VALMI_SIDECAR_LISTEN", "/v1/status"):
        assert word in text


def test_no_command_prints_usage_and_exits_2(tmp_path: Path) -> None:
    result = cli(tmp_path)
    assert 2 == result.returncode
    assert "usage:" in result.stderr


# --- run: config errors stop it before anything starts --------------------------------


def test_run_with_bad_environment_value_exits_2_before_starting(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = cli(
        tmp_path,
        "run",
        VALMI_SIDECAR_DATA_DIR=str(data_dir),
        VALMI_SIDECAR_MAX_QUEUE_EVENTS="lots",
    )
    assert 2 == result.returncode
    assert (
        "valmi-sidecar: error: VALMI_SIDECAR_MAX_QUEUE_EVENTS: 'lots' is not a whole number"
        in result.stderr
    )
    assert not data_dir.exists()


def test_run_with_misspelt_environment_variable_exits_2(tmp_path: Path) -> None:
    result = cli(tmp_path, "run", VALMI_SIDECAR_LISTN="127.0.0.1:1")
    assert 2 == result.returncode
    assert "unknown key 'VALMI_SIDECAR_LISTN'" in result.stderr


def test_run_on_all_interfaces_without_token_exits_2(tmp_path: Path) -> None:
    result = cli(tmp_path, "run", "--listen", "0.0.0.0:8787", VALMI_API_KEY="sk_live_zzz")
    assert 2 == result.returncode
    assert "VALMI_SIDECAR_INGEST_TOKEN" in result.stderr
    assert "sk_live_zzz" not in result.stderr


def test_run_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    result = cli(tmp_path, "run", "--upstream-timeout-s", "never")
    assert 2 == result.returncode
    assert "--upstream-timeout-s: 'never' is not a number" in result.stderr


@pytest.mark.parametrize(
    ("flag_value", "expected"),
    [
        ("https://api..valmi.io", "is not a valid name"),
        (f"https://{'x' * 64}.valmi.io", "longer than 63 characters"),
        ("https://api.valmi.io:0", "has port 0"),
        ("https://api.valmi.io:99999", "is not a valid URL"),
        ("gopher://api.valmi.io", "is not an http:// or https:// URL"),
    ],
)
def test_run_with_an_api_url_that_can_never_work_exits_2_naming_the_setting(
    tmp_path: Path, flag_value: str, expected: str
) -> None:
    """Refused before the data directory exists: no event can be dead-lettered by it."""
    data_dir = tmp_path / "data"
    result = cli(
        tmp_path,
        "run",
        "--api-url",
        flag_value,
        VALMI_SIDECAR_DATA_DIR=str(data_dir),
        VALMI_API_KEY="sk_live_zzz",
    )
    assert 2 == result.returncode
    assert f"valmi-sidecar: error: --api-url: {flag_value!r}" in result.stderr
    assert expected in result.stderr
    assert "sk_live_zzz" not in result.stderr
    assert not data_dir.exists()


def test_run_with_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = cli(tmp_path, "run", "--config", str(tmp_path / "absent.toml"))
    assert 2 == result.returncode
    assert f"config file {tmp_path / 'absent.toml'}" in result.stderr


# --- status -----------------------------------------------------------------------------


def test_status_with_nothing_listening_exits_1(tmp_path: Path) -> None:
    port = free_port()
    result = cli(tmp_path, "status", VALMI_SIDECAR_LISTEN=f"127.0.0.1:{port}")
    assert 1 == result.returncode
    url = f"http://127.0.0.1:{port}/v1/status"
    assert f"no sidecar answering at {url}; is `valmi-sidecar run` running?" in result.stderr


STATUS = {
    "version": "0.1.0",
    "ready": True,
    "draining": False,
    "events": {
        "received": 12,
        "queued": 3,
        "in_flight": 1,
        "delivered": 8,
        "dead_lettered": 1,
        "duplicates": 2,
    },
    "queue": {"events": 3, "bytes": 900, "max_events": 10, "max_bytes": 4096},
    "oldest_queued_age_s": 300.0,
    "upstream": {"state": "paused", "last_error": "HTTP 401 unauthorized"},
}


async def status_server(token: str | None) -> tuple[web.AppRunner, str]:
    """A stand-in sidecar on loopback that answers /v1/status like the real one."""

    async def handler(request: web.Request) -> web.Response:
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return web.json_response({"error": {"code": "unauthorized"}}, status=401)
        return web.json_response(STATUS)

    app = web.Application()
    app.router.add_get("/v1/status", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.addresses
    host, port = runner.addresses[0][:2]
    return runner, f"{host}:{port}"


async def acli(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "valmi_sidecar",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(tmp_path, **env),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_prints_a_summary_and_sends_the_token(tmp_path: Path) -> None:
    runner, listen = await status_server(token="tok_status")
    try:
        code, out, err = await acli(
            tmp_path,
            "status",
            VALMI_SIDECAR_LISTEN=listen,
            VALMI_SIDECAR_INGEST_TOKEN="tok_status",
        )
    finally:
        await runner.cleanup()
    assert (0, "") == (code, err)
    lines = {line.split("  ")[0].strip(): line.split("  ")[-1].strip() for line in out.splitlines()}
    assert "12" == lines["received"]
    assert "1" == lines["in flight"]
    assert "5.0 min" == lines["oldest queued"]
    assert "paused" == lines["upstream"]
    assert "HTTP 401 unauthorized" == lines["last error"]
    assert "tok_status" not in out


async def test_status_json_prints_the_answer_and_whose_it_is(tmp_path: Path) -> None:
    runner, listen = await status_server(token=None)
    try:
        code, out, _ = await acli(
            tmp_path, "status", "--json", "--url", f"http://{listen}/v1/status"
        )
    finally:
        await runner.cleanup()
    assert 0 == code
    assert {**STATUS, "source": f"http://{listen} (--url)"} == json.loads(out)


async def test_status_without_the_token_explains_401(tmp_path: Path) -> None:
    runner, listen = await status_server(token="tok_status")
    try:
        code, _, err = await acli(tmp_path, "status", VALMI_SIDECAR_LISTEN=listen)
    finally:
        await runner.cleanup()
    assert 1 == code
    assert "HTTP 401" in err
    assert "VALMI_SIDECAR_INGEST_TOKEN" in err


def test_format_status_shows_the_disk_against_its_budget() -> None:
    text = format_status(
        {
            "queue": {"bytes": 500, "max_bytes": 8_388_608},
            "disk": {
                "bytes": 8_000_000,
                "max_bytes": 8_388_608,
                "full": True,
                "dead_letters_warning": "dead letters take a large share of max_queue_bytes",
            },
        }
    )
    assert "queued bytes   500 (bodies)" in text
    assert "disk           8000000 of 8388608 bytes (full: new events get 503)" in text
    assert "dead letters take a large share" in text


def test_format_status_says_why_the_store_takes_no_writes() -> None:
    """While commits fail, the summary says since when, why and what it means; while
    they succeed, nothing."""
    failing = {
        "store": {
            "writable": False,
            "path": "/data/queue.db",
            "unwritable": {
                "for_s": 7.0,
                "failed_commits": 732,
                "error": "database or disk is full",
                "fs_free_bytes": 0,
            },
        }
    }
    line = next(x for x in format_status(failing).splitlines() if x.startswith("store"))
    assert line.startswith("store          not writable for 7")
    assert ": database or disk is full (732 commits failed), 0 bytes free" in line
    assert line.endswith("new events get 503, nothing queued is lost")
    writable = {"store": {"writable": True, "path": "/data/queue.db"}}
    assert not any(x.startswith("store") for x in format_status(writable).splitlines())


def test_format_status_tolerates_missing_fields() -> None:
    text = format_status({"events": {"received": 1}})
    assert "received       1" in text
    assert "queued         -" in text
    assert "oldest queued  none" in text


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8787", "http://127.0.0.1:8787/v1/status"),
        ("0.0.0.0:9000", "http://127.0.0.1:9000/v1/status"),
        ("[::]:9000", "http://[::1]:9000/v1/status"),
        ("[::1]:9000", "http://[::1]:9000/v1/status"),
    ],
)
def test_status_url_from_listen(listen: str, expected: str) -> None:
    assert expected == status_url(Settings(listen=listen))


# --- fake-api -----------------------------------------------------------------------------


@pytest.fixture
def fake_api_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``valmi-sidecar fake-api`` on a free port, up and answering; killed if left running."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "valmi_sidecar", "fake-api", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(tmp_path),
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("fake-api did not start listening")
                time.sleep(0.05)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_fake_api_exits_0_on_signal(
    fake_api_process: tuple[subprocess.Popen[str], int], sig: signal.Signals
) -> None:
    proc, _ = fake_api_process
    proc.send_signal(sig)
    assert 0 == proc.wait(timeout=20)


def test_fake_api_rejects_bad_listen(tmp_path: Path) -> None:
    result = cli(tmp_path, "fake-api", "--listen", "nowhere")
    assert 2 == result.returncode
    assert "is not HOST:PORT" in result.stderr


# --- logging ------------------------------------------------------------------------------


SECRET = "sk_live_7f3a9c2e51"


def fail_with_secret() -> None:
    raise RuntimeError(f"failed with {SECRET}")


@pytest.mark.usefixtures("reset_logging")
def test_json_log_lines_redact_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json", secrets=[SECRET, "tok_ingest_42"])
    log = structlog.get_logger("test")
    log.info("upstream_request", header=f"Bearer {SECRET}", nested={"k": [SECRET]}, n=3)
    log.warning(f"key {SECRET} rejected", token="tok_ingest_42")
    try:
        fail_with_secret()
    except RuntimeError:
        log.exception("send_failed")
    err = capsys.readouterr().err
    assert SECRET not in err
    assert "tok_ingest_42" not in err
    lines = [json.loads(line) for line in err.splitlines()]
    assert ["upstream_request", "key [redacted] rejected", "send_failed"] == [
        x["event"] for x in lines
    ]
    first = lines[0]
    assert ("info", "Bearer [redacted]", {"k": ["[redacted]"]}, 3) == (
        first["level"],
        first["header"],
        first["nested"],
        first["n"],
    )
    assert first["timestamp"].endswith("Z")
    assert "RuntimeError: failed with [redacted]" in lines[2]["exception"]


@pytest.mark.usefixtures("reset_logging")
def test_console_log_lines_redact_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "console", secrets=[SECRET])
    log = structlog.get_logger("test")
    log.debug("shown", key=SECRET)
    try:
        fail_with_secret()
    except RuntimeError:
        log.exception("send_failed")
    err = capsys.readouterr().err
    assert SECRET not in err
    assert "shown" in err
    assert "failed with [redacted]" in err


@pytest.mark.usefixtures("reset_logging")
def test_stdlib_logging_goes_through_the_same_filter_and_redactor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("warning", "json", secrets=[SECRET])
    logging.getLogger("aiohttp.server").warning("bad request with %s", SECRET)
    logging.getLogger("aiohttp.server").info("not shown")
    logging.getLogger("aiohttp.access").warning("access is silenced below warning only")
    structlog.get_logger().info("not shown either")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [
        ("bad request with [redacted]", "aiohttp.server", "warning"),
        ("access is silenced below warning only", "aiohttp.access", "warning"),
    ] == [(x["event"], x["logger"], x["level"]) for x in lines]


@pytest.mark.usefixtures("reset_logging")
def test_access_log_is_silent_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    logging.getLogger("aiohttp.access").info("GET /healthz")
    assert "" == capsys.readouterr().err
    configure_logging("info", "json", access_log=True)
    logging.getLogger("aiohttp.access").info("GET /healthz")
    assert "GET /healthz" == json.loads(capsys.readouterr().err)["event"]


@pytest.mark.usefixtures("reset_logging")
def test_configure_logging_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    configure_logging("info", "json")
    logging.getLogger("x").warning("once")
    assert 1 == len(capsys.readouterr().err.splitlines())


@pytest.mark.usefixtures("reset_logging")
def test_auto_format_is_json_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "auto")
    structlog.get_logger().info("plain_event")
    assert "plain_event" == json.loads(capsys.readouterr().err)["event"]


def test_configure_logging_rejects_unknown_level() -> None:
    with pytest.raises(ValueError, match="log level 'loud'"):
        configure_logging("loud")


async def test_an_admin_on_a_vm_reads_the_services_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no --data-dir, no VALMI_SIDECAR_DATA_DIR and no queue of one's own, an operator
    command reads the systemd service's directory; anything named explicitly wins."""
    from valmi_sidecar.cli import service_data_dir  # noqa: PLC0415
    from valmi_sidecar.config import load_settings  # noqa: PLC0415
    from valmi_sidecar.store import Store  # noqa: PLC0415

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    system = tmp_path / "var-lib-valmi-sidecar"
    settings = load_settings(env={"HOME": str(tmp_path / "home")})
    own = settings.data_dir
    assert own == service_data_dir(settings, explicit=False, system_dir=system)
    await (await Store.open(system, prune_interval_s=None)).close()
    assert system == service_data_dir(settings, explicit=False, system_dir=system)
    assert own == service_data_dir(settings, explicit=True, system_dir=system)
    await (await Store.open(own, prune_interval_s=None)).close()
    assert own == service_data_dir(settings, explicit=False, system_dir=system)


async def test_status_says_when_the_upstream_was_not_tried_and_when_it_is_tried_next(
    tmp_path: Path,
) -> None:
    """A fresh sidecar's upstream is "not tried yet", not plainly ok; paused, status says
    when the next probe goes and when the last error happened."""
    import httpx  # noqa: PLC0415

    from valmi_sidecar.fake_api import FakeValmi  # noqa: PLC0415

    from .conftest import ACTION, SidecarProcess, wait_until  # noqa: PLC0415

    fake = FakeValmi()
    await fake.start()
    proc = SidecarProcess(
        tmp_path / "data",
        fake.url,
        {"VALMI_SIDECAR_BACKOFF_BASE_S": "5", "VALMI_SIDECAR_BACKOFF_CAP_S": "30"},
    )
    try:
        url = await proc.wait_ready()
        code, out, _ = await acli(tmp_path, "status", "--url", url)
        assert 0 == code
        assert "ok (not tried yet since start)" in out
        fake.faults.unauthorized = True
        async with httpx.AsyncClient() as client:
            assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code

            async def paused() -> bool:
                data = (await client.get(url + "/v1/status")).json()
                return bool(data["upstream"]["state"] == "paused")

            await wait_until(paused, 10, "paused")
        code, out, _ = await acli(tmp_path, "status", "--url", url)
        lines = {line[:14].strip(): line[15:].strip() for line in out.splitlines()}
        assert lines["upstream"].startswith("paused, next attempt in "), out
        assert lines["last error"].startswith("HTTP 401"), out
        assert " (at 20" in lines["last error"], out
    finally:
        proc.kill()
        await fake.stop()


@pytest.mark.parametrize(
    ("drain", "expected"),
    [
        (
            {"forecast_s": 600.0, "rate_per_s": 166.667, "basis": "rate_limit"},
            "drains in      10.0 min at 166.667/s (at best: the rate limit)",
        ),
        (
            {"forecast_s": 30.0, "rate_per_s": 20.0, "basis": "observed"},
            "drains in      30.0 s at 20/s (delivery rate of the last minute)",
        ),
        (
            {"forecast_s": None, "rate_per_s": 0.0, "basis": "stalled"},
            "drains in      never at this rate: nothing is delivered (see upstream)",
        ),
        ({"forecast_s": 0.0, "rate_per_s": 0.0, "basis": "empty"}, None),
    ],
)
def test_status_shows_the_drain_forecast(drain: dict[str, object], expected: str | None) -> None:
    text = format_status_details({"drain": drain})
    if expected is None:
        assert "drains in" not in text
    else:
        assert expected in text.splitlines()
