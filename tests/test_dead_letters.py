"""``valmi-sidecar dead-letters list|show|retry|purge|export``, ``status`` and ``ledger`` as
real subprocesses: through the admin API of a running sidecar (with its ingest token), and
on the database of a stopped one."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tests.conftest import SidecarFactory, SidecarProcessFactory, wait_until
from valmi_sidecar.events import parse_one
from valmi_sidecar.store import DeadLetter, Store

if TYPE_CHECKING:
    from valmi_sidecar.fake_api import FakeValmi

TOKEN = "tok_dead_letters"


async def run_cli(*args: str, **env: str) -> tuple[int, str, str]:
    """``python -m valmi_sidecar ARGS`` with a clean environment (no VALMI_* inherited)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "valmi_sidecar",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    out, err = await asyncio.wait_for(proc.communicate(b""), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def post_events(
    url: str, agent: str, n: int, *, outcome: bool = False, token: str = ""
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers) as client:
        for i in range(n):
            if outcome:
                r = await client.post(
                    url + "/v1/outcomes",
                    json={"agent_key": agent, "outcome_type": "sale", "value": i + 1},
                )
            else:
                r = await client.post(
                    url + "/v1/actions", json={"agent_key": agent, "action_type": "llm_call"}
                )
            assert 202 == r.status_code, r.text


async def get_status(url: str, token: str = "") -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers) as client:
        data: dict[str, Any] = (await client.get(url + "/v1/status")).json()
        return data


async def test_dead_letter_commands_through_the_running_sidecar(
    fake: FakeValmi, sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    # Refused, and held until another event is delivered (more refusals than these in a
    # row would pause forwarding instead).
    fake.faults.error_rate, fake.faults.error_status = 1.0, 400
    proc = sidecar_process(
        fake.url, VALMI_SIDECAR_INGEST_TOKEN=TOKEN, VALMI_SIDECAR_PAUSE_AFTER_REFUSALS="10"
    )
    url = await proc.wait_ready()
    await post_events(url, "agent_a", 3, token=TOKEN)
    await post_events(url, "agent_b", 2, outcome=True, token=TOKEN)
    await wait_until(lambda: 5 == fake.status_counts.get(400, 0), what="5 refusals")
    fake.faults.error_rate = 0.0
    await post_events(url, "agent_z", 1, token=TOKEN)

    async def dead() -> bool:
        dead_lettered: int = (await get_status(url, TOKEN))["events"]["dead_lettered"]
        return 5 == dead_lettered

    await wait_until(dead, what="5 dead letters")
    env = {"VALMI_SIDECAR_INGEST_TOKEN": TOKEN}
    common = ("--url", url, "--data-dir", str(proc.data_dir))

    code, out, err = await run_cli("dead-letters", "list", *common, "--json", **env)
    assert (0, f"source: {url} (--url)\n") == (code, err)
    listed = json.loads(out)
    assert 5 == len(listed)
    assert {"rejected"} == {d["reason"] for d in listed}
    assert {400} == {d["status"] for d in listed}

    code, _, err = await run_cli("dead-letters", "list", *common)
    assert 1 == code
    assert "HTTP 401" in err
    assert TOKEN not in err

    for flags, expected in (
        (("--agent-key", "agent_b"), 2),
        (("--reason", "expired"), 0),
        (("--newer-than", "1h"), 5),
        (("--older-than", "1h"), 0),
        (("--id", listed[0]["id"], "--id", listed[1]["id"]), 2),
    ):
        code, out, _ = await run_cli("dead-letters", "list", *common, "--json", *flags, **env)
        assert (0, expected) == (code, len(json.loads(out))), flags

    code, out, _ = await run_cli("dead-letters", "list", *common, **env)
    assert 0 == code
    lines = out.splitlines()
    assert 6 == len(lines)  # piped: a header and tab-separated rows
    assert ["id", "kind", "agent_key"] == lines[0].split("\t")[:3]

    code, out, _ = await run_cli("dead-letters", "show", *common, listed[0]["id"], **env)
    assert 0 == code
    shown = json.loads(out)
    assert listed[0]["idempotency_key"] == shown["idempotency_key"]
    assert "agent_a" == shown["body"]["agent_key"]
    # Times for people: RFC 3339 UTC, not Unix floats.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", shown["dead_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", listed[0]["received_at"])
    # Piped, the table keeps every byte of the detail (it is cut only on a terminal).
    code, out, _ = await run_cli("dead-letters", "list", *common, "--limit", "1", **env)
    assert out.splitlines()[1].split("\t")[-1] == listed[0]["detail"]
    # An unknown reason is a usage error, in the CLI (exit 2) and in the API (400).
    code, _, err = await run_cli("dead-letters", "list", *common, "--reason", "bogus", **env)
    assert 2 == code
    assert "invalid choice: 'bogus'" in err
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        resp = await client.get(url + "/v1/dead-letters", params={"reason": "bogus"})
        assert 400 == resp.status_code
        assert "reason" == resp.json()["error"]["details"][0]["field"]
    code, _, err = await run_cli("dead-letters", "show", *common, "evt_nope", **env)
    assert 1 == code
    assert "no dead letter with id evt_nope" in err

    export = tmp_path / "dead.ndjson"
    code, out, _ = await run_cli("dead-letters", "export", *common, "-o", str(export), **env)
    assert 0 == code
    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert [d["id"] for d in listed] == [d["id"] for d in exported]

    # retry: agent_b's outcomes go upstream again, with their original keys.
    keys_b = {d["idempotency_key"] for d in listed if d["agent_key"] == "agent_b"}
    code, out, _ = await run_cli("dead-letters", "retry", *common, "--agent-key", "agent_b", **env)
    assert (0, "re-queued 2 dead letters (original ids and idempotency keys)") == (
        code,
        out.strip(),
    )
    await wait_until(lambda: 3 == len(fake.events()), what="2 re-queued events delivered")
    assert keys_b == {e.idem_key for e in fake.events() if e.body["agent_key"] == "agent_b"}

    async def settled() -> bool:
        events = (await get_status(url, TOKEN))["events"]
        return (6, 0, 3, 3) == (
            events["received"],
            events["queued"],
            events["delivered"],
            events["dead_lettered"],
        )

    await wait_until(settled, what="2 delivered, 3 dead letters")

    # purge: asks first; without a terminal it needs --yes.
    code, _, err = await run_cli("dead-letters", "purge", *common, **env)
    assert 1 == code
    assert "3 dead letters match; pass --yes" in err
    code, out, _ = await run_cli("dead-letters", "purge", *common, "--yes", **env)
    assert (0, "purged 3 dead letters (still counted as dead-lettered)") == (code, out.strip())
    code, out, _ = await run_cli("dead-letters", "list", *common, "--json", **env)
    assert [] == json.loads(out)
    assert 3 == (await get_status(url, TOKEN))["events"]["dead_lettered"]

    code, out, _ = await run_cli("ledger", *common, "--json", **env)
    assert 0 == code
    totals = json.loads(out)["totals"]
    assert (6, 0, 3, 3) == (
        totals["received"],
        totals["queued"],
        totals["delivered"],
        totals["dead_lettered"],
    )


async def test_commands_work_on_the_database_when_no_sidecar_runs(
    fake: FakeValmi, sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    """Stopped sidecar: list, retry, purge, status, ledger and check use the data directory;
    a re-queued dead letter is delivered once a sidecar runs again."""
    data_dir = tmp_path / "stopped"
    fake.faults.error_rate, fake.faults.error_status = 1.0, 422
    sidecar, url = await sidecar_factory(fake.url, data_dir=data_dir)
    await post_events(url, "agent_c", 4)
    await wait_until(lambda: 4 == fake.status_counts.get(422, 0), what="4 refusals")
    fake.faults.error_rate = 0.0
    await post_events(url, "agent_d", 1)  # its delivery shows the refusals were the events'
    await wait_until(
        lambda: sidecar.store is not None and sidecar.store.counts().dead_lettered == 4,
        what="4 dead letters",
    )
    await sidecar.stop()
    common = ("--url", f"http://127.0.0.1:{free_port()}", "--data-dir", str(data_dir))

    code, out, err = await run_cli("dead-letters", "list", *common, "--json")
    assert (0, f"source: {data_dir / 'queue.db'} (no sidecar running)\n") == (code, err)
    listed = json.loads(out)
    assert 4 == len(listed)

    code, out, err = await run_cli("dead-letters", "retry", *common, "--limit", "1")
    assert (0, "re-queued 1 dead letter (original ids and idempotency keys)") == (
        code,
        out.strip(),
    ), err

    code, out, _ = await run_cli("status", *common, "--json")
    assert 0 == code
    status = json.loads(out)
    assert False is status["running"]
    assert (5, 1, 1, 3) == (
        status["events"]["received"],
        status["events"]["queued"],
        status["events"]["delivered"],
        status["events"]["dead_lettered"],
    )
    assert [{"reason": "rejected", "count": 3}] == [
        {"reason": r["reason"], "count": r["count"]} for r in status["dead_letters"]["reasons"]
    ]
    assert 1 == status["dead_letters"]["requeued"]

    code, out, _ = await run_cli("status", *common)
    assert 0 == code
    assert f"no (read from {data_dir})" in out
    assert "3 rejected" in out

    code, out, _ = await run_cli("dead-letters", "purge", *common, "--yes", "--limit", "2")
    assert (0, "purged 2 dead letters (still counted as dead-lettered)") == (code, out.strip())

    code, out, _ = await run_cli("ledger", *common, "--csv")
    assert 0 == code
    (row,) = [r for r in csv.DictReader(io.StringIO(out)) if r["agent_key"] == "agent_c"]
    assert ("agent_c", "4", "1", "0", "3") == (
        row["agent_key"],
        row["received"],
        row["queued"],
        row["delivered"],
        row["dead_lettered"],
    )
    code, out, _ = await run_cli("check", *common)
    assert (0, f"{data_dir / 'queue.db'}: ok") == (code, out.strip())

    # A sidecar again: the re-queued event goes upstream with its original key.
    sidecar2, url2 = await sidecar_factory(fake.url, data_dir=data_dir)
    await wait_until(lambda: 2 == len(fake.events()), what="the re-queued event delivered")
    [requeued] = [e for e in fake.events() if e.body["agent_key"] == "agent_c"]
    assert requeued.idem_key in {d["idempotency_key"] for d in listed}

    # While it holds the data directory, a wrong --url is an error, not a direct write.
    code, _, err = await run_cli("dead-letters", "retry", *common)
    assert 1 == code
    assert f"a sidecar holds {data_dir}" in err
    code, out, _ = await run_cli("dead-letters", "list", "--url", url2, "--json")
    assert (0, 1) == (code, len(json.loads(out)))
    assert sidecar2.store is not None


async def test_salvage_says_which_dead_letters_stay_behind_and_from_reads_them(
    tmp_path: Path,
) -> None:
    """Salvage queues again only what a moved-aside file still had queued: its dead
    letters (refused upstream, or expired) are not re-sent unasked, and would go with the
    file. Salvage says how many stay, and ``--from FILE`` lists, shows and exports them."""
    old_dir, live_dir = tmp_path / "old", tmp_path / "live"
    store = await Store.open(old_dir, prune_interval_s=None)
    try:
        bodies = [{"agent_key": "agent_d", "action_type": f"type_{i}"} for i in range(3)]
        accepted = await store.submit([parse_one("action", json.dumps(b).encode()) for b in bodies])
        refused, expired, _queued = await store.lease(3, frozenset())
        await store.settle(
            [
                DeadLetter(refused.seq, "rejected", 422, '{"error": "bad value"}'),
                DeadLetter(expired.seq, "expired", None, "not delivered within 7 days"),
            ]
        )
    finally:
        await store.close()
    moved = tmp_path / "queue.db.corrupt-20261126T160000Z"
    (old_dir / "queue.db").rename(moved)  # closed cleanly: no WAL beside it
    await (await Store.open(live_dir, prune_interval_s=None)).close()  # the new, empty one
    common = ("--url", f"http://127.0.0.1:{free_port()}", "--data-dir", str(live_dir))

    code, out, err = await run_cli("salvage", str(moved), *common)
    assert 0 == code, err
    salvaged, stays = out.strip().splitlines()
    assert salvaged.startswith(f"salvaged 1 events from {moved} (0 already queued"), out
    assert stays.startswith(f"2 dead letters stay in {moved}, not queued again"), out
    assert f"dead-letters list --from {moved}" in stays
    assert f"dead-letters export --from {moved} -o FILE" in stays

    code, out, err = await run_cli("dead-letters", "list", "--from", str(moved), "--json", *common)
    assert (0, f"source: {moved} (--from)\n") == (code, err)
    listed = {d["id"]: d for d in json.loads(out)}
    assert {accepted[0].id: "rejected", accepted[1].id: "expired"} == {
        k: d["reason"] for k, d in listed.items()
    }
    assert 422 == listed[accepted[0].id]["status"]
    code, out, _ = await run_cli(
        "dead-letters", "list", "--from", str(moved), "--reason", "expired", "--json", *common
    )
    assert [accepted[1].id] == [d["id"] for d in json.loads(out)]
    code, out, err = await run_cli(
        "dead-letters", "show", "--from", str(moved), accepted[0].id, *common
    )
    assert 0 == code, err
    assert "type_0" == json.loads(out)["body"]["action_type"]
    export = tmp_path / "kept.ndjson"
    code, out, err = await run_cli(
        "dead-letters", "export", "--from", str(moved), "-o", str(export), *common
    )
    assert (0, f"exported 2 dead letters to {export}") == (code, out.strip()), err
    assert set(listed) == {json.loads(line)["id"] for line in export.read_text().splitlines()}

    # The file's ledger too: received 3, delivered 0, dead-lettered 2, queued 1.
    code, out, err = await run_cli("ledger", "--from", str(moved), "--json", *common)
    assert (0, f"source: {moved} (--from)\n") == (code, err)
    totals = json.loads(out)["totals"]
    assert (3, 1, 0, 2) == (
        totals["received"],
        totals["queued"],
        totals["delivered"],
        totals["dead_lettered"],
    )

    # The live database has the salvaged event queued and none of the file's dead letters.
    code, out, _ = await run_cli("dead-letters", "list", "--json", *common)
    assert (0, []) == (code, json.loads(out))
    code, out, _ = await run_cli("status", "--json", *common)
    counts = json.loads(out)["events"]
    assert (1, 0) == (counts["queued"], counts["dead_lettered"])

    # A file with no dead letters gets no such line.
    empty = tmp_path / "queue.db.corrupt-20261126T170000Z"
    shutil.copy(live_dir / "queue.db", empty)
    code, out, err = await run_cli("salvage", str(empty), *common)
    assert 0 == code, err
    assert "dead letters" not in out, out


async def test_from_given_the_data_directory_names_the_file_to_pass(tmp_path: Path) -> None:
    """``--from`` takes a database file; an operator who passes the data directory it is
    in is told which file that is, and nothing is read or created there."""
    data_dir = tmp_path / "data"
    await (await Store.open(data_dir, prune_interval_s=None)).close()
    before = sorted(p.name for p in data_dir.iterdir())
    common = ("--url", f"http://127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "none"))
    for command in (("ledger",), ("dead-letters", "list")):
        code, out, err = await run_cli(*command, "--from", str(data_dir), *common)
        assert (1, "") == (code, out), err
        assert f"{data_dir} is a directory; pass its database, {data_dir / 'queue.db'}" in err
    assert before == sorted(p.name for p in data_dir.iterdir())


async def test_status_with_no_sidecar_and_no_database_says_so(tmp_path: Path) -> None:
    code, _, err = await run_cli(
        "status", "--url", f"http://127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "none")
    )
    assert 1 == code
    assert "is `valmi-sidecar run` running?" in err
    assert "no database at" in err


async def test_status_given_a_data_dir_asks_the_sidecar_holding_it_and_says_so(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    """Two sidecars: ``status --data-dir B`` shows B's numbers, read from B's recorded
    address, even when the listen setting points at A; with B stopped, B's file, never
    A's answer. The output names its source."""
    a = sidecar_process(None, data_dir=tmp_path / "a")
    b = sidecar_process(None, data_dir=tmp_path / "b")
    url_a, url_b = await a.wait_ready(), await b.wait_ready()
    await post_events(url_a, "agent_a", 3)
    await post_events(url_b, "agent_b", 1)
    as_if_default = {"VALMI_SIDECAR_LISTEN": url_a.removeprefix("http://")}

    code, out, err = await run_cli(
        "status", "--json", "--data-dir", str(b.data_dir), **as_if_default
    )
    assert (0, "") == (code, err)
    data = json.loads(out)
    assert 1 == data["events"]["received"]
    assert f"{url_b} (the sidecar holding {b.data_dir})" == data["source"]

    code, out, _ = await run_cli("status", "--data-dir", str(b.data_dir), **as_if_default)
    assert 0 == code
    assert f"source         {url_b} (the sidecar holding {b.data_dir})" in out.splitlines()

    b.signal(signal.SIGTERM)
    assert 0 == await b.wait_exit()
    assert not (b.data_dir / "listening.json").exists()
    code, out, err = await run_cli(
        "status", "--json", "--data-dir", str(b.data_dir), **as_if_default
    )
    assert (0, "") == (code, err)
    data = json.loads(out)
    assert (False, 1) == (data["running"], data["events"]["received"])
    assert f"{b.data_dir / 'queue.db'} (no sidecar running)" == data["source"]


async def test_status_lists_a_moved_aside_database_with_its_size_and_the_command(
    sidecar_process: SidecarProcessFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "queue.db").write_bytes(b"not a database " * 1000)
    proc = sidecar_process(None, data_dir=data_dir)
    url = await proc.wait_ready()
    status = await get_status(url)
    (moved,) = status["moved_aside"]
    assert ".corrupt-" in moved["path"]
    assert 15_000 == moved["bytes"]
    assert f"valmi-sidecar salvage {moved['path']}" == moved["salvage"]
    code, out, _ = await run_cli("status", "--url", url)
    assert 0 == code
    assert f"recover its events: valmi-sidecar salvage {moved['path']}" in out
    os.unlink(moved["path"])
    assert [] == (await get_status(url))["moved_aside"]
