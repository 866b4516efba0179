"""What a reload applies (``reload.py``), without a process: which settings need a
restart, the key and the token replaced in place, and what is logged. The processes and
signals are in ``test_reload.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from valmi_sidecar.config import Secret, Settings
from valmi_sidecar.receiver import IngestToken
from valmi_sidecar.reload import announce, apply_reload, needs_restart
from valmi_sidecar.upstream import Upstream

from .conftest import fast_settings

OLD_KEY = "sk_test_old_0123456789"
NEW_KEY = "sk_test_new_9876543210"


@pytest.fixture
def old(tmp_path: Path) -> Settings:
    return fast_settings(
        tmp_path,
        "http://127.0.0.1:9",
        api_key=Secret(OLD_KEY),
        ingest_token=Secret("tok-reload-apply-1"),
    )


@pytest.fixture
async def upstream(old: Settings) -> AsyncIterator[Upstream]:
    assert old.api_key is not None
    client = Upstream(old.api_url, old.api_key, timeout_s=1.0, max_connections=1)
    try:
        yield client
    finally:
        await client.aclose()


def test_needs_restart_names_changed_settings_a_reload_cannot_apply(old: Settings) -> None:
    new = dataclasses.replace(
        old, listen="127.0.0.1:1", durability="normal", log_level="debug", api_key=Secret("x")
    )
    assert {"listen", "durability"} == set(needs_restart(old, new))
    assert [] == needs_restart(old, dataclasses.replace(old, log_level="debug"))


async def test_a_new_key_and_token_are_applied_in_place(old: Settings, upstream: Upstream) -> None:
    holder = IngestToken(old.ingest_token)
    probed: list[bool] = []
    new = dataclasses.replace(
        old, api_key=Secret(NEW_KEY), ingest_token=Secret("tok-reload-apply-2"), log_level="debug"
    )
    done = apply_reload(
        old, new, upstream=upstream, token=holder, on_new_key=lambda: probed.append(True)
    )
    assert ["api_key", "ingest_token", "log_level"] == done.applied
    assert [] == done.restart
    assert [True] == probed
    assert holder.secret is not None
    assert "tok-reload-apply-2" == holder.secret.reveal()
    assert done.settings.api_key == Secret(NEW_KEY)
    assert "debug" == done.settings.log_level
    assert done.for_workers


async def test_the_same_key_changes_nothing(old: Settings, upstream: Upstream) -> None:
    holder = IngestToken(old.ingest_token)
    done = apply_reload(old, old, upstream=upstream, token=holder, on_new_key=pytest.fail)
    assert ([], []) == (done.applied, done.restart)
    assert not done.for_workers


async def test_adding_or_removing_a_secret_waits_for_a_restart(tmp_path: Path) -> None:
    bare = fast_settings(tmp_path, None)
    new = dataclasses.replace(bare, api_key=Secret(NEW_KEY), ingest_token=Secret("tok"))
    done = apply_reload(bare, new, upstream=None, token=IngestToken(None), on_new_key=pytest.fail)
    assert ["api_key", "ingest_token"] == done.restart
    assert (None, None) == (done.settings.api_key, done.settings.ingest_token)


async def test_an_unusable_key_is_refused_and_the_old_one_kept(
    old: Settings, upstream: Upstream
) -> None:
    new = dataclasses.replace(old, api_key=Secret("bad\nkey"))
    with capture_logs() as logs:
        done = apply_reload(
            old, new, upstream=upstream, token=IngestToken(old.ingest_token), on_new_key=pytest.fail
        )
    assert done.settings.api_key == Secret(OLD_KEY)
    assert "api_key" not in done.applied
    [failed] = [e for e in logs if e["event"] == "reload_failed"]
    assert "fix the API key file" == failed["action"]
    assert "bad" not in str(failed)


async def test_announce_logs_what_changed_and_what_needs_a_restart(
    old: Settings, upstream: Upstream
) -> None:
    new = dataclasses.replace(old, api_key=Secret(NEW_KEY), listen="127.0.0.1:1")
    done = apply_reload(
        old, new, upstream=upstream, token=IngestToken(old.ingest_token), on_new_key=lambda: None
    )
    with capture_logs() as logs:
        announce(done, old.log_level, owns_logging=False)
    assert ["settings_reloaded", "reload_needs_restart"] == [e["event"] for e in logs]
    assert ["api_key"] == logs[0]["changed"]
    assert ["listen"] == logs[1]["settings"]
    assert NEW_KEY not in str(logs)
