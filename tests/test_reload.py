"""SIGHUP reloads, and a key rotated under a running sidecar: real processes, real signals,
real key files, the fake Valmi API refusing the old key."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from valmi_sidecar.fake_api import FakeValmi

from .conftest import ACTION, SidecarProcess, SidecarProcessFactory, wait_until

OLD_KEY = "sk_test_old_0123456789"
NEW_KEY = "sk_test_new_9876543210"


@pytest.fixture
async def rotating_fake() -> Any:
    """A fake Valmi API that accepts only the new key."""
    api = FakeValmi(api_keys=(NEW_KEY,))
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


def write_secret(path: Path, text: str) -> None:
    """Replace the file the way a Kubernetes Secret volume or an editor does: a new file
    renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)


def events_named(proc: SidecarProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in proc.log_events() if e.get("event") == name]


def assert_no_secret_logged(proc: SidecarProcess, *secrets: str) -> None:
    text = proc.log_text()
    for secret in secrets:
        assert secret not in text


async def post(client: httpx.AsyncClient, url: str, **headers: str) -> httpx.Response:
    return await client.post(f"{url}/v1/actions", json=ACTION, headers=headers)


async def test_sighup_reloads_key_and_log_level_and_keeps_running(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    write_secret(key_file, OLD_KEY)
    config = tmp_path / "sidecar.toml"
    config.write_text(f'api_key_file = "{key_file}"\nlog_level = "info"\n')
    fake.api_keys = frozenset({OLD_KEY})
    proc = sidecar_process(fake.url, VALMI_API_KEY="", VALMI_SIDECAR_CONFIG=str(config))
    url = await proc.wait_ready()
    async with httpx.AsyncClient(timeout=10.0) as client:
        assert 202 == (await post(client, url)).status_code
        await wait_until(lambda: len(fake.received) == 1, 10, "first event delivered")

        # Rotate: upstream now takes only the new key; the file and the config change.
        fake.api_keys = frozenset({NEW_KEY})
        write_secret(key_file, NEW_KEY)
        config.write_text(f'api_key_file = "{key_file}"\nlog_level = "debug"\n')
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: bool(events_named(proc, "settings_reloaded")), 10, "reload")
        reloaded = events_named(proc, "settings_reloaded")[0]
        assert ["api_key", "log_level"] == reloaded["changed"]
        assert "debug" == reloaded["log_level"]

        assert 202 == (await post(client, url)).status_code
        await wait_until(lambda: len(fake.received) == 2, 10, "second event, new key")
    assert proc.proc.poll() is None, "SIGHUP must not end the process"
    assert [] == events_named(proc, "upstream_paused"), "the new key was used at once"
    await wait_until(
        lambda: any(e.get("level") == "debug" for e in proc.log_events()), 10, "debug lines now"
    )
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    assert_no_secret_logged(proc, OLD_KEY, NEW_KEY)


async def test_sighup_with_a_bad_setting_logs_it_and_keeps_the_settings_in_force(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text('log_level = "info"\n')
    proc = sidecar_process(fake.url, VALMI_SIDECAR_CONFIG=str(config))
    url = await proc.wait_ready()
    config.write_text('log_level = "loud"\nmax_queue_events = 10\n')
    proc.signal(signal.SIGHUP)
    await wait_until(lambda: bool(events_named(proc, "reload_failed")), 10, "reload_failed")
    failed = events_named(proc, "reload_failed")[0]
    assert "log_level" in failed["error"]
    assert "SIGHUP again" in failed["action"]

    # A good file again, with a change that cannot be applied while running.
    config.write_text('log_level = "info"\nmax_queue_events = 10\n')
    proc.signal(signal.SIGHUP)
    await wait_until(lambda: bool(events_named(proc, "reload_needs_restart")), 10, "restart hint")
    assert ["max_queue_events"] == events_named(proc, "reload_needs_restart")[0]["settings"]
    async with httpx.AsyncClient(timeout=10.0) as client:
        assert 202 == (await post(client, url)).status_code
        await wait_until(lambda: len(fake.received) == 1, 10, "delivered after the reloads")
    assert proc.proc.poll() is None
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()


async def test_a_key_file_fixed_while_paused_on_401_resumes_delivery_without_a_restart(
    sidecar_process: SidecarProcessFactory, rotating_fake: FakeValmi, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    write_secret(key_file, OLD_KEY)
    proc = sidecar_process(rotating_fake.url, VALMI_API_KEY="", VALMI_API_KEY_FILE=str(key_file))
    url = await proc.wait_ready()
    async with httpx.AsyncClient(timeout=10.0) as client:
        for _ in range(3):
            assert 202 == (await post(client, url)).status_code
        await wait_until(lambda: bool(events_named(proc, "upstream_paused")), 10, "paused")
        assert 401 == events_named(proc, "upstream_paused")[0]["status"]
        assert {} == rotating_fake.received

        write_secret(key_file, NEW_KEY)  # no signal, no restart
        await wait_until(lambda: len(rotating_fake.received) == 3, 15, "all three delivered")
        status = (await client.get(f"{url}/v1/status")).json()
    assert "ok" == status["upstream"]["state"]
    assert 0 == status["events"]["dead_lettered"]
    reloaded = events_named(proc, "api_key_reloaded")
    assert 1 == len(reloaded)
    assert str(key_file) == reloaded[0]["path"]
    assert proc.proc.poll() is None
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    assert_no_secret_logged(proc, OLD_KEY, NEW_KEY)


async def test_an_empty_key_file_while_paused_is_logged_and_the_old_key_kept(
    sidecar_process: SidecarProcessFactory, rotating_fake: FakeValmi, tmp_path: Path
) -> None:
    """A file caught half-written must not stop the sidecar or count as a key."""
    key_file = tmp_path / "api-key"
    write_secret(key_file, OLD_KEY)
    proc = sidecar_process(rotating_fake.url, VALMI_API_KEY="", VALMI_API_KEY_FILE=str(key_file))
    url = await proc.wait_ready()
    async with httpx.AsyncClient(timeout=10.0) as client:
        assert 202 == (await post(client, url)).status_code
        await wait_until(lambda: bool(events_named(proc, "upstream_paused")), 10, "paused")
        write_secret(key_file, "")
        await wait_until(
            lambda: bool(events_named(proc, "api_key_file_unreadable")), 10, "empty file noted"
        )
        assert "is empty" in events_named(proc, "api_key_file_unreadable")[0]["error"]
        assert proc.proc.poll() is None
        write_secret(key_file, NEW_KEY)
        await wait_until(lambda: len(rotating_fake.received) == 1, 15, "delivered")
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()


async def test_sighup_rotates_the_ingest_token_in_every_worker_process(
    sidecar_process: SidecarProcessFactory, fake: FakeValmi, tmp_path: Path
) -> None:
    token_file = tmp_path / "ingest-token"
    write_secret(token_file, "tok_old_123")
    proc = sidecar_process(
        fake.url,
        VALMI_SIDECAR_INGEST_TOKEN_FILE=str(token_file),
        VALMI_SIDECAR_INGEST_PROCESSES="2",
    )
    url = await proc.wait_ready()
    pids = events_named(proc, "ingest_workers_started")[0]["pids"]
    async with httpx.AsyncClient(timeout=10.0) as client:
        old = {"Authorization": "Bearer tok_old_123"}
        new = {"Authorization": "Bearer tok_new_456"}
        assert 202 == (await post(client, url, **old)).status_code

        write_secret(token_file, "tok_new_456")
        # As a closed terminal or `systemctl kill -s HUP` would: every process gets it.
        for pid in [proc.proc.pid, *pids]:
            os.kill(pid, signal.SIGHUP)
        await wait_until(lambda: bool(events_named(proc, "settings_reloaded")), 10, "reload")
        assert ["ingest_token"] == events_named(proc, "settings_reloaded")[0]["changed"]

        async def every_connection_takes_the_new_token() -> bool:
            # New connections each time: the kernel spreads them over both workers.
            async with httpx.AsyncClient(timeout=10.0) as fresh:
                answers = [(await post(fresh, url, **old)).status_code for _ in range(8)]
            return answers == [401] * 8

        await wait_until(every_connection_takes_the_new_token, 10, "old token refused")
        for _ in range(8):
            async with httpx.AsyncClient(timeout=10.0) as fresh:
                assert 202 == (await post(fresh, url, **new)).status_code
    assert [] == events_named(proc, "ingest_worker_exited"), "workers survive SIGHUP"
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    assert_no_secret_logged(proc, "tok_old_123", "tok_new_456")
