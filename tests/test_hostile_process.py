"""Hostile process conditions: SIGKILL at random moments, SIGSTOP longer than every
timeout, data directories the sidecar cannot use, and an operator's command run as root
on the data directory of a service that runs as another user. Real processes, real
signals, real users (``setpriv``: tests run as root).

(A full disk is covered with the store's disk-space tests.)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from valmi_sidecar.events import parse_one
from valmi_sidecar.fake_api import FakeValmi
from valmi_sidecar.store import CLEAN_NAME, DeadLetter, Store

from .conftest import SidecarProcessFactory, wait_until
from .scenarios import (
    SECRET_KEY,
    SECRET_PREFIX,
    Traffic,
    hostile_fake,
    secret_leaks,
    sidecar_env,
    status,
)

ROUNDS = 20


@pytest.fixture
async def upstream() -> AsyncIterator[FakeValmi]:
    async with hostile_fake() as api:
        yield api


async def test_sigkill_at_random_moments_for_20_rounds_loses_and_doubles_nothing(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi, tmp_path: Path
) -> None:
    """Each round: start, post from 6 agents while the flusher forwards (slowly, so
    requests are in flight), SIGKILL after a random 20-400 ms, restart on the same data."""
    upstream.set_faults(latency_s=0.02)
    traffic = Traffic("sigkill_x20")
    rng = random.Random(20)
    data_dir = tmp_path / "data"
    kills_with_upstream_in_flight = 0
    async with httpx.AsyncClient(timeout=5.0) as client:
        for n in range(ROUNDS):
            proc = sidecar_process(upstream.url, data_dir=data_dir, **sidecar_env())
            url = await proc.wait_ready()
            stop = asyncio.Event()
            acked_before = len(traffic.acked)
            posting = asyncio.create_task(
                traffic.run_agents(
                    client,
                    lambda url=url: url,  # type: ignore[misc]
                    agents=6,
                    until=stop.is_set,
                    max_events=5000,
                    first_seq=n * 5000,
                    stop_on_error=True,
                )
            )
            # Once the round's traffic is flowing, a random moment for the kill.
            await wait_until(lambda: len(traffic.acked) > acked_before, 20, "202s")  # noqa: B023
            await asyncio.sleep(rng.uniform(0.02, 0.4))
            requests_before = upstream.requests
            proc.kill()  # SIGKILL
            kills_with_upstream_in_flight += upstream.requests > requests_before
            stop.set()
            await posting
        assert len(traffic.acked) > ROUNDS  # every round really posted

        final = sidecar_process(upstream.url, data_dir=data_dir, **sidecar_env())
        url = await final.wait_ready()
        upstream.set_faults(latency_s=0.0)
        await traffic.settle(upstream, 60)
        counts = (await status(client, url))["events"]
        leaks = await secret_leaks(client, url)
        final.signal(signal.SIGTERM)
        assert 0 == await final.wait_exit()
    assert counts["received"] == counts["queued"] + counts["delivered"] + counts["dead_lettered"]
    ledger = traffic.ledger(
        upstream,
        dead_lettered=counts["dead_lettered"],
        rounds=ROUNDS,
        upstream_requests=upstream.requests,
    )
    ledger.check()
    assert [] == leaks


async def test_sigstop_longer_than_every_timeout_then_sigcont_loses_nothing(
    sidecar_process: SidecarProcessFactory, upstream: FakeValmi
) -> None:
    """Frozen for 3 s (client timeout 1 s, upstream timeout 1 s): clients time out, the
    process resumes, serves again, and every 202 is delivered once."""
    proc = sidecar_process(upstream.url, **sidecar_env())
    url = await proc.wait_ready()
    traffic = Traffic("sigstop")
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=1.0) as client:
        posting = asyncio.create_task(
            traffic.run_agents(client, lambda: url, agents=4, until=stop.is_set, max_events=20_000)
        )
        await wait_until(lambda: len(upstream.received) >= 50, 10, "forwarding under way")
        proc.signal(signal.SIGSTOP)
        # A 202 already in the socket buffer when SIGSTOP lands still reaches its client;
        # count only what arrives after those have had time to land.
        await asyncio.sleep(0.5)
        frozen_at = len(traffic.acked)
        await asyncio.sleep(2.5)  # the freeze itself is the scenario
        acked_while_frozen = len(traffic.acked) - frozen_at
        proc.signal(signal.SIGCONT)
        resumed = len(traffic.acked)
        await wait_until(lambda: len(traffic.acked) >= resumed + 50, 10, "202s after SIGCONT")
        stop.set()
        await posting
        await traffic.settle(upstream, 30)
        counts = (await status(client, url))["events"]
        leaks = await secret_leaks(client, url)
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    timeouts = sum(n for kind, n in traffic.refused.items() if "Timeout" in kind)
    ledger = traffic.ledger(
        upstream, dead_lettered=counts["dead_lettered"], client_timeouts=timeouts, frozen_s=3.0
    )
    ledger.check()
    assert 0 == acked_while_frozen
    assert timeouts > 0  # the freeze was felt by the clients
    assert [] == leaks
    assert SECRET_PREFIX not in proc.log_text()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_and_uncreatable", "Not a directory"),  # its parent is a regular file
        ("read_only", "/proc/1"),  # procfs: refuses every write, even root's
    ],
)
async def test_unusable_data_dir_is_a_clear_startup_error_and_exit_1(
    tmp_path: Path, case: str, expected: str
) -> None:
    # Tests run as root, which chmod cannot stop: use places no one can write to.
    if case == "missing_and_uncreatable":
        (tmp_path / "file").write_text("not a directory")
        data_dir = tmp_path / "file" / "sub"
    else:
        data_dir = Path("/proc/1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    env |= {
        "VALMI_SIDECAR_DATA_DIR": str(data_dir),
        "VALMI_SIDECAR_LISTEN": "127.0.0.1:0",
        "VALMI_SIDECAR_LOG_FORMAT": "json",
        "VALMI_API_KEY": SECRET_KEY,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "valmi_sidecar",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert 1 == proc.returncode, text
    failed = [
        e for e in map(_json_or_none, text.splitlines()) if e and e.get("event") == "startup_failed"
    ]
    assert 1 == len(failed), text
    assert "error" == failed[0]["level"]
    assert expected in failed[0]["error"]
    assert str(data_dir) in failed[0]["error"]
    assert "sidecar_ready" not in text
    assert SECRET_PREFIX not in text


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


# --- an operator's command run as root ---------------------------------------------------

#: The service's own user, as systemd's DynamicUser makes one: not root. It may read
#: (not write) files it does not own, so that it can run the interpreter under /root.
SERVICE_UID = 65534
AS_SERVICE_USER = (
    "setpriv",
    f"--reuid={SERVICE_UID}",
    f"--regid={SERVICE_UID}",
    "--clear-groups",
    "--inh-caps=+dac_read_search",
    "--ambient-caps=+dac_read_search",
    "--",
)
#: Root without the capabilities that let it open any file: a user that cannot read a
#: file that another user owns with mode 0600.
WITHOUT_FILE_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


async def make_queue(data_dir: Path, queued: int, dead: int = 0) -> None:
    """A data directory as a stopped sidecar leaves it: ``queued`` events, ``dead`` dead
    letters, closed cleanly (so with a clean-shutdown record)."""
    store = await Store.open(data_dir, durability="normal")
    try:
        events = [
            parse_one("action", json.dumps({"agent_key": "a", "action_type": f"t{i}"}).encode())
            for i in range(queued + dead)
        ]
        await store.submit(events)
        leased = await store.lease(dead, ()) if dead else []
        await store.settle([DeadLetter(e.seq, "rejected", 400, "refused") for e in leased])
    finally:
        await store.close()


def owners(data_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_uid, p.stat().st_gid) for p in [data_dir, *data_dir.iterdir()]}


async def queued_in_status(url: str) -> int:
    async with httpx.AsyncClient(timeout=5.0) as client:
        return int((await status(client, url))["events"]["queued"])


async def test_a_clean_shutdown_record_it_cannot_read_is_removed_and_the_full_check_runs(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """Another user's 0600 record (a command run as root left it) made start-up fail with
    Permission denied, and systemd restarted it every 2 s without end."""
    data_dir = tmp_path / "data"
    await make_queue(data_dir, queued=3)
    record = data_dir / CLEAN_NAME
    os.chown(record, SERVICE_UID, SERVICE_UID)
    proc = sidecar_process(None, data_dir=data_dir, prefix=WITHOUT_FILE_OVERRIDE)
    url = await proc.wait_ready()
    assert 3 == await queued_in_status(url)
    events = {e["event"]: e for e in proc.log_events()}
    unreadable = events["clean_record_unreadable"]
    assert ("warning", True) == (unreadable["level"], unreadable["removed"])
    assert "Permission denied" in unreadable["error"]
    assert "full start-up check" in unreadable["action"]
    assert "passed" == events["store_opened"]["integrity_check"]
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    assert 0 == record.stat().st_uid  # a new record, its own this time


async def test_a_command_run_as_root_leaves_every_file_to_the_directorys_owner(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """`dead-letters retry --data-dir` as root on a stopped service's directory wrote a
    root-owned clean-shutdown record, and the service could not start again."""
    data_dir = tmp_path / "data"
    await make_queue(data_dir, queued=2, dead=1)
    for path in [data_dir, *data_dir.iterdir()]:
        os.chown(path, SERVICE_UID, SERVICE_UID)
    command = asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "valmi_sidecar", "dead-letters", "retry"),
        *("--data-dir", str(data_dir), "--url", "http://127.0.0.1:9"),
        env={k: v for k, v in os.environ.items() if not k.startswith("VALMI")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        retry = await command
        out, err = await retry.communicate()
    assert 0 == retry.returncode, err.decode()
    assert "re-queued 1 dead letter" in out.decode()
    assert {(SERVICE_UID, SERVICE_UID)} == set(owners(data_dir).values()), owners(data_dir)
    proc = sidecar_process(None, data_dir=data_dir, prefix=AS_SERVICE_USER)
    url = await proc.wait_ready()
    assert 3 == await queued_in_status(url)
    assert "skipped" == next(
        e["integrity_check"] for e in proc.log_events() if e["event"] == "store_opened"
    )
    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    assert {(SERVICE_UID, SERVICE_UID)} == set(owners(data_dir).values()), owners(data_dir)


async def test_root_gives_the_directorys_owner_back_files_an_older_command_left(
    tmp_path: Path,
) -> None:
    """Files left as root's before this fix are given back; a link planted in the
    directory is not followed to a file elsewhere."""
    data_dir = tmp_path / "data"
    await make_queue(data_dir, queued=1)
    linked, hard_linked = tmp_path / "linked", tmp_path / "hard-linked"
    for path in (linked, hard_linked):
        path.write_text("root's own file")
    for path in [data_dir, *data_dir.iterdir()]:
        os.chown(path, SERVICE_UID, SERVICE_UID)
    os.chown(data_dir / CLEAN_NAME, 0, 0)
    (data_dir / f"{CLEAN_NAME}.tmp").symlink_to(linked)
    os.link(hard_linked, data_dir / "queue.db.corrupt-20260101T000000Z")
    store = await Store.open(data_dir, durability="normal")
    await store.close()
    (data_dir / "queue.db.corrupt-20260101T000000Z").unlink()
    assert {(SERVICE_UID, SERVICE_UID)} == set(owners(data_dir).values()), owners(data_dir)
    for path in (linked, hard_linked):
        assert (0, 0, "root's own file") == (
            path.stat().st_uid,
            path.stat().st_gid,
            path.read_text(),
        )


@pytest.mark.parametrize("name", ["lock", "queue.db", "queue.db-wal", "queue.db-shm"])
async def test_a_data_file_it_cannot_open_is_an_error_that_says_whose_it_is(
    sidecar_process: SidecarProcessFactory, tmp_path: Path, name: str
) -> None:
    """Unlike the clean-shutdown record, these hold the queue: never removed; exit 1 with
    the owner and the command that gives the files back, not a bare errno."""
    data_dir = tmp_path / "data"
    await make_queue(data_dir, queued=1)
    (data_dir / CLEAN_NAME).unlink()
    path = data_dir / name
    path.touch(mode=0o600)
    os.chown(path, SERVICE_UID, SERVICE_UID)
    proc = sidecar_process(None, data_dir=data_dir, prefix=WITHOUT_FILE_OVERRIDE)
    assert 1 == await proc.wait_exit()
    [failed] = [e for e in proc.log_events() if e["event"] == "startup_failed"]
    assert f"cannot open {path}: permission denied" in failed["error"]
    assert f"belongs to uid {SERVICE_UID}" in failed["error"]
    assert f"chown -R 0:0 {data_dir}" in failed["error"]
    assert path.exists()
