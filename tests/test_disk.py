"""Disk trouble without crash loops: a full disk (a size-limited database) through the HTTP
API, and a database corrupted on purpose at start-up, then salvaged and checked."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tests.conftest import ACTION, SidecarFactory, SidecarProcessFactory, wait_until
from tests.test_dead_letters import free_port, run_cli
from valmi_sidecar.disk import data_dir_bytes
from valmi_sidecar.events import rfc3339
from valmi_sidecar.store import moved_aside_files

if TYPE_CHECKING:
    from valmi_sidecar.fake_api import FakeValmi

BIG = {**ACTION, "metadata": {"blob": "x" * 60_000}}


async def test_full_disk_refuses_with_503_keeps_every_acknowledged_event_and_recovers(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    sidecar, url = await sidecar_factory(fake.url)
    await fake.go_down()  # nothing leaves the queue while the disk is full
    store = sidecar.store
    assert store is not None
    acked: set[str] = set()
    for _ in range(3):
        r = await client.post(url + "/v1/actions", json=ACTION)
        assert 202 == r.status_code
        acked.add(r.json()["id"])

    # The database may not grow beyond its current pages: the disk is "full".
    ((pages,),) = await store.writer_connection.fetchall("PRAGMA page_count")
    await store.writer_connection.fetchall(f"PRAGMA max_page_count = {int(pages)}")
    refused: httpx.Response | None = None
    for _ in range(200):
        r = await client.post(url + "/v1/actions", json=BIG)
        if r.status_code != 202:
            refused = r
            break
        acked.add(r.json()["id"])
    assert refused is not None, "the size-limited database never filled up"
    assert 503 == refused.status_code
    assert "store_unavailable" == refused.json()["error"]["code"]
    assert refused.headers["Retry-After"].isdigit()

    # A small write that still fits (the flusher recording a failed attempt) may succeed
    # between two refusals and mark the store writable again; each refusal marks it not.
    async def seen_unwritable() -> bool:
        r = await client.post(url + "/v1/actions", json=BIG)
        assert 503 == r.status_code
        ready = await client.get(url + "/readyz")
        metrics = (await client.get(url + "/metrics")).text
        return (
            503 == ready.status_code
            and any("not writable" in reason for reason in ready.json()["reasons"])
            and "valmi_sidecar_store_writable 0.0" in metrics
            and "valmi_sidecar_commit_failures_total 0.0" not in metrics
        )

    await wait_until(seen_unwritable, timeout=10, what="/readyz 503 and store_writable 0")
    assert len(acked) == store.counts().received  # nothing refused was counted

    # /v1/status says why: since when, how many commits failed, SQLite's words for it.
    async def status_says_why() -> bool:
        await client.post(url + "/v1/actions", json=BIG)  # keep it failing
        s = (await client.get(url + "/v1/status")).json()["store"]
        u = s.get("unwritable")
        return (
            s["writable"] is False
            and u is not None
            and u["failed_commits"] >= 1
            and "full" in u["error"]
            and isinstance(u["fs_free_bytes"], int)
            and u["for_s"] >= 0
        )

    await wait_until(status_says_why, timeout=10, what="/v1/status store.unwritable")

    # Space comes back: the writer's probe finds it without any new traffic.
    await store.writer_connection.fetchall("PRAGMA max_page_count = 1073741823")

    async def ready_again() -> bool:
        return 200 == (await client.get(url + "/readyz")).status_code

    await wait_until(ready_again, timeout=10, what="/readyz 200 again")
    r = await client.post(url + "/v1/actions", json=BIG)
    assert 202 == r.status_code
    acked.add(r.json()["id"])
    assert {"writable": True, "path": str(store.path)} == (
        await client.get(url + "/v1/status")
    ).json()["store"]

    # Every acknowledged event reaches upstream, once.
    await fake.go_up()
    await wait_until(
        lambda: len(fake.events()) == len(acked), timeout=20, what="all acknowledged delivered"
    )
    assert {e.body.get("metadata", {}).get("blob", "")[:1] for e in fake.events()} <= {"", "x"}
    c = store.counts()
    assert (len(acked), 0) == (c.received, c.dead_lettered)


async def test_disk_budget_is_never_passed_and_the_sidecar_says_full_before(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """max_queue_bytes=8 MiB, nothing forwarded, ~1 KB actions posted until the first 503:
    every file in the data directory together stays within 8 MiB at every moment, the
    refusal is queue_full with Retry-After, and every acknowledged event is kept."""
    budget = 8 * 1024 * 1024
    data_dir = tmp_path / "data"
    proc = sidecar_process(None, data_dir=data_dir, VALMI_SIDECAR_MAX_QUEUE_BYTES=str(budget))
    url = await proc.wait_ready()
    largest = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal largest
        while not done.is_set():
            largest = max(largest, data_dir_bytes(data_dir))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    acked: set[str] = set()
    refusals: list[httpx.Response] = []
    body = {**ACTION, "metadata": {"pad": "p" * 1000}}
    async with httpx.AsyncClient(timeout=10) as client:

        async def post_until_refused() -> None:
            while not refusals:
                r = await client.post(url + "/v1/actions", json=body)
                if r.status_code == 202:
                    acked.add(r.json()["id"])
                else:
                    refusals.append(r)

        await asyncio.wait_for(asyncio.gather(*(post_until_refused() for _ in range(8))), 120)
        refused = refusals[0]
        assert 503 == refused.status_code, refused.text
        assert "queue_full" == refused.json()["error"]["code"]
        assert "max_queue_bytes" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"].isdigit()
        ready = await client.get(url + "/readyz")
        assert 503 == ready.status_code
        assert any("max_queue_bytes" in reason for reason in ready.json()["reasons"])
        status = (await client.get(url + "/v1/status")).json()
        metrics = dict(
            line.split()
            for line in (await client.get(url + "/metrics")).text.splitlines()
            if line.startswith("valmi_sidecar_disk")
        )
    done.set()
    await watcher
    assert len(acked) > 1500  # most of the budget holds events, not overhead
    assert largest <= budget, f"the data directory reached {largest} bytes"
    disk = status["disk"]
    assert (budget, True) == (disk["max_bytes"], disk["full"])
    assert 0 < disk["bytes"] <= budget
    assert len(acked) == status["events"]["queued"]
    assert budget == float(metrics["valmi_sidecar_disk_max_bytes"])
    assert 0 < float(metrics["valmi_sidecar_disk_bytes"]) <= budget
    assert 1 == float(metrics["valmi_sidecar_disk_full"])

    proc.signal(signal.SIGTERM)
    assert 0 == await proc.wait_exit()
    assert data_dir_bytes(data_dir) <= budget
    code, out, err = await run_cli(
        "status", "--json", "--data-dir", str(data_dir), "--url", f"http://127.0.0.1:{free_port()}",
        VALMI_SIDECAR_MAX_QUEUE_BYTES=str(budget),
    )  # fmt: skip
    assert 0 == code, err
    offline = json.loads(out)["disk"]
    assert budget == offline["max_bytes"]
    assert 0 < offline["bytes"] <= budget
    # Nothing acknowledged was lost; a restart on the full directory keeps refusing. The
    # refusal errs high (an event's estimate against the room left), so the restart, which
    # measures the file, may find room for the odd event, never for a group of 8 of them.
    again = sidecar_process(None, data_dir=data_dir, VALMI_SIDECAR_MAX_QUEUE_BYTES=str(budget))
    url = await again.wait_ready()
    more: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:
        status = (await client.get(url + "/v1/status")).json()
        for _ in range(8):
            r = await client.post(url + "/v1/actions", json=body)
            if r.status_code != 202:
                break
            more.append(r.json()["id"])
        ready = await client.get(url + "/readyz")
        after = (await client.get(url + "/v1/status")).json()
    assert len(acked) == status["events"]["queued"]
    assert (503, "queue_full") == (r.status_code, r.json()["error"]["code"]), more
    assert 503 == ready.status_code
    assert len(acked) + len(more) == after["events"]["queued"]
    assert data_dir_bytes(data_dir) <= budget


async def test_a_disk_that_fills_while_forwarding_stops_sending_within_the_unsaved_bound(
    fake: FakeValmi, sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """When delivery results cannot be saved, the flusher stops leasing: at most
    max_unsaved events are sent unrecorded, so a crash then re-sends at most that many.
    The disk fills for real: the sidecar's file size limit (RLIMIT_FSIZE) is lowered below
    its database file, so no write past 64 KiB of any file succeeds (WAL frames, pages
    checkpointed into the database), as on a full file system; its log stays below."""
    await fake.go_down()
    data_dir = tmp_path / "data"
    proc = sidecar_process(fake.url, data_dir=data_dir, VALMI_SIDECAR_UPSTREAM_CONCURRENCY="4")
    url = await proc.wait_ready()
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(300):
            assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
        bound = (await client.get(url + "/v1/status")).json()["upstream"]["max_unsaved"]
        assert 16 == bound  # 4 per sender
        # Forwarding at about 80 events/s, then the disk fills.
        fake.set_faults(latency_s=0.05)
        await fake.go_up()
        await wait_until(lambda: len(fake.events()) >= 20, timeout=30, what="forwarding")
        limit = max(64 * 1024, proc.log_path.stat().st_size + 32 * 1024)
        assert (data_dir / "queue.db").stat().st_size > limit
        resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))

        def settle_failures() -> int:
            return sum(e.get("event") == "settle_failed" for e in proc.log_events())

        await wait_until(lambda: settle_failures() >= 3, timeout=30, what="3 failed settles")
        status = (await client.get(url + "/v1/status")).json()
        sent = len(fake.events())
        ready = await client.get(url + "/readyz")
    assert not status["store"]["writable"]
    assert 503 == ready.status_code
    assert sent - status["events"]["delivered"] <= bound, (sent, status["events"])
    assert sent < 300  # it stopped sending

    # A crash now: the restarted sidecar sends the unsaved ones again, and only those.
    proc.kill()
    fake.set_faults(latency_s=0.0)
    again = sidecar_process(fake.url, data_dir=data_dir)
    await again.wait_ready()
    await wait_until(lambda: 300 == len(fake.events()), timeout=30, what="all 300 delivered")
    assert fake.duplicates <= bound


def corrupt_middle(path: Path, pages: int = 4) -> None:
    """Overwrite ``pages`` pages in the middle of an SQLite file with garbage."""
    size = path.stat().st_size
    page = 4096
    assert size > 20 * page, "the database is too small to corrupt in the middle"
    start = (size // page // 2) * page
    with path.open("r+b") as f:
        f.seek(start)
        f.write(b"\xde\xad\xbe\xef" * (page * pages // 4))
        f.flush()
        os.fsync(f.fileno())


async def metric(url: str, name: str) -> float:
    async with httpx.AsyncClient() as client:
        for line in (await client.get(url + "/metrics")).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def salvage_offline(moved: Path, data_dir: Path, **env: str) -> tuple[int, str, str]:
    """``valmi-sidecar salvage`` with no sidecar listening: it writes the database."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    return await run_cli(
        "salvage", str(moved), "--data-dir", str(data_dir), "--url", nowhere, **env
    )


async def test_corrupt_database_is_moved_aside_then_salvaged_with_original_keys(
    fake: FakeValmi, sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    sent: dict[str, dict[str, Any]] = {}
    first = sidecar_process(None, data_dir=data_dir)  # no upstream: everything stays queued
    url = await first.wait_ready()
    async with httpx.AsyncClient() as client:
        for i in range(400):
            body = {**ACTION, "metadata": {"i": i, "pad": "p" * 400}}
            r = await client.post(
                url + "/v1/actions", json=body, headers={"Idempotency-Key": f"key-{i}"}
            )
            assert 202 == r.status_code
            sent[f"key-{i}"] = body
    first.signal(signal.SIGTERM)
    assert 0 == await first.wait_exit()
    db = data_dir / "queue.db"
    corrupt_middle(db)

    code, out, err = await run_cli(
        "check", "--data-dir", str(data_dir), "--url", "http://127.0.0.1:9"
    )
    assert 1 == code
    assert "failed the integrity check" in err or "is damaged" in err, out + err

    # Start-up: no crash loop. The file is moved aside and the queue starts empty.
    second = sidecar_process(fake.url, data_dir=data_dir)
    url = await second.wait_ready()
    (corrupt_event,) = [e for e in second.log_events() if e.get("event") == "database_corrupt"]
    assert "error" == corrupt_event["level"]
    moved = Path(corrupt_event["moved_to"])
    assert [moved] == moved_aside_files(data_dir)
    assert moved.name.startswith("queue.db.corrupt-")
    assert 1 == await metric(url, "valmi_sidecar_database_corruptions_total")
    assert 1 == await metric(url, "valmi_sidecar_database_moved_aside_files")
    assert 0 == await metric(url, "valmi_sidecar_queue_events")
    code, out, _ = await run_cli("status", "--url", url)
    assert 0 == code
    second.signal(signal.SIGTERM)
    assert 0 == await second.wait_exit()

    # Salvage on the stopped sidecar's data directory: every readable event, original key.
    code, out, err = await salvage_offline(moved, data_dir)
    assert 0 == code, err
    salvaged = int(out.split()[1])
    unreadable = int(out.split("with a reused key skipped, ")[1].split()[0])
    assert 300 <= salvaged <= 400  # 4 damaged pages of about 9 events each
    assert salvaged + unreadable <= 400
    code, out, _ = await run_cli(
        "status", "--json", "--data-dir", str(data_dir), "--url", f"http://127.0.0.1:{free_port()}"
    )
    status = json.loads(out)
    assert salvaged == status["events"]["queued"]
    assert [str(moved)] == [m["path"] for m in status["moved_aside"]]

    # Forwarded with their original keys and bodies.
    third = sidecar_process(fake.url, data_dir=data_dir)
    url = await third.wait_ready()
    await wait_until(lambda: salvaged == len(fake.events()), timeout=20, what="salvaged delivered")
    for e in fake.events():
        assert e.idem_key is not None
        assert sent[e.idem_key]["metadata"] == e.body["metadata"]

    # Salvaging again through the running sidecar stores nothing twice.
    code, out, err = await run_cli("salvage", str(moved), "--url", url, "--data-dir", str(data_dir))
    assert 0 == code, err
    assert out.startswith(f"salvaged 0 events from {moved} ({salvaged} already queued"), out
    code, out, _ = await run_cli("check", "--data-dir", str(data_dir), "--url", url)
    assert (0, f"{data_dir / 'queue.db'}: ok") == (code, out.strip())


async def test_a_file_that_is_not_a_database_does_not_stop_start_up(
    sidecar_factory: SidecarFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    data_dir = tmp_path / "garbage"
    data_dir.mkdir(mode=0o700)
    (data_dir / "queue.db").write_bytes(os.urandom(64 * 1024))
    sidecar, url = await sidecar_factory(None, data_dir=data_dir)
    assert 200 == (await client.get(url + "/readyz")).status_code
    assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
    assert 1 == len(moved_aside_files(data_dir))
    assert sidecar.store is not None
    assert 1 == sidecar.store.stats.corrupt_moved_aside


async def test_salvage_through_a_running_sidecar_keeps_each_request_within_its_body_limit(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    # A moved-aside database of 60 events of about 1 KiB (and one of 9 KiB), from a
    # sidecar that took 1 MiB bodies; salvaged into one that takes 8 KiB.
    old_dir = tmp_path / "old"
    first = sidecar_process(None, data_dir=old_dir)
    url = await first.wait_ready()
    async with httpx.AsyncClient() as client:
        for i in range(60):
            body = {**ACTION, "metadata": {"i": i, "pad": "p" * 800}}
            r = await client.post(url + "/v1/actions", json=body)
            assert 202 == r.status_code
        big = {**ACTION, "metadata": {"pad": "b" * 9_000}}
        assert 202 == (await client.post(url + "/v1/actions", json=big)).status_code
    first.signal(signal.SIGTERM)
    assert 0 == await first.wait_exit()
    moved = tmp_path / "queue.db.old"
    (old_dir / "queue.db").rename(moved)

    limit = {"VALMI_SIDECAR_MAX_BODY_BYTES": "8192"}
    data_dir = tmp_path / "data"
    second = sidecar_process(None, data_dir=data_dir, **limit)
    url = await second.wait_ready()
    code, out, err = await run_cli(
        "salvage", str(moved), "--url", url, "--data-dir", str(data_dir), **limit
    )
    # The 60 small ones went in bodies under 8 KiB; the big one cannot go in any.
    assert 1 == code, out + err
    assert "too big to salvage through the sidecar's API" in err
    assert "max_body_bytes=8192" in err
    assert "stop the sidecar" in err
    assert "(60 salvaged before it)" in err
    code, out, _ = await run_cli("status", "--json", "--url", url)
    assert 60 == json.loads(out)["events"]["queued"]

    # As the error says: stopped, the sidecar's database takes it directly, and the 60
    # already salvaged are recognised by their keys.
    second.signal(signal.SIGTERM)
    assert 0 == await second.wait_exit()
    code, out, err = await salvage_offline(moved, data_dir, **limit)
    assert 0 == code, err
    assert out.startswith(f"salvaged 1 events from {moved} (60 already queued"), out


async def test_salvage_api_refuses_records_that_cannot_be_stored_or_sent(
    fake: FakeValmi, sidecar_factory: SidecarFactory, client: httpx.AsyncClient
) -> None:
    """A receipt time without a UTC day once stopped the store's writer, and a key with a
    control character the flusher (each stopped the service): both are 400s now."""
    _, url = await sidecar_factory(fake.url)
    good = {
        "id": "evt_0001",
        "idempotency_key": "key-1",
        "kind": "action",
        "body": json.dumps(ACTION),
        "agent_key": ACTION["agent_key"],
        "event_type": ACTION["action_type"],
        "received_at": time.time(),  # recent: not expired (max_event_age_s)
        "created_at": rfc3339(time.time()),
    }
    for bad, field in (
        ({"received_at": 1e300}, "events[0].received_at"),
        ({"received_at": -1.0}, "events[0].received_at"),
        ({"idempotency_key": "key\r\nX-Injected: 1"}, "events[0].idempotency_key"),
        ({"value": "5"}, "events[0].value"),
        ({"extra": 1}, "events[0].extra"),
    ):
        r = await client.post(url + "/v1/salvage", json={"events": [{**good, **bad}]})
        assert 400 == r.status_code, (bad, r.text)
        assert field == r.json()["error"]["details"][0]["field"], r.text
    r = await client.post(url + "/v1/salvage", json={"events": [good]})
    assert {"imported": 1, "duplicates": 0, "conflicts": 0} == r.json()
    await wait_until(lambda: len(fake.events()) == 1, timeout=10, what="salvaged event sent")
    assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code
