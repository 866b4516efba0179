"""Where the CPU goes, per event: every thread of one ingest target's processes (the
sidecar and its ingest workers, or bare aiohttp), the fake API and wrk, over one wrk run.

    .venv/bin/python benchmarks/cpu.py --target full                 # closed loop, 64 conns
    .venv/bin/python benchmarks/cpu.py --target full-2 --connections 256
    .venv/bin/python benchmarks/cpu.py --target full --rate 10 --seconds 20   # paced

Targets as in ``run.py --targets`` (``full-N``: N ingest workers). Paced runs (``--rate``)
measure until the fake API has every event the target acknowledged, so forwarding is
counted too. Figures are microseconds of CPU (user + system, from ``/proc``) per
acknowledged event; the machine's line is every core's busy time. Needs wrk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (  # noqa: E402 - beside this script
    _PACED_LUA,
    _WRK_LUA,
    BODY,
    CLK_TCK,
    fake_api,
    fake_counts,
    ingest_target,
    machine_busy_s,
    wrk,
)
from soak import child_pids  # noqa: E402 - beside this script

Snapshot = dict[tuple[str, int, str], float]  # (process role, tid, thread name) -> CPU s


def _threads(pid: int, role: str) -> Iterator[tuple[tuple[str, int, str], float]]:
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        if int(task.name) == pid:
            name = "main thread"  # the event loop's, in the sidecar and aiohttp
        yield (role, int(task.name), name), (int(fields[11]) + int(fields[12])) / CLK_TCK


def snapshot(target_pid: int, fake_pid: int | None) -> Snapshot:
    snap: Snapshot = {}
    roles = [(target_pid, "target")]
    roles += [(p, f"worker {i}") for i, p in enumerate(child_pids(target_pid), 1)]
    if fake_pid is not None:
        roles.append((fake_pid, "fake API"))
    for pid, role in roles:
        snap.update(_threads(pid, role))
    # wrk ran as this process's child and was reaped: its time is in our children's.
    times = os.times()
    snap[("wrk", 0, "wrk")] = times.children_user + times.children_system
    return snap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="full")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, help="events/s in total (paced); else closed loop")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("cpu.py needs wrk (apt-get install wrk)")

    with tempfile.TemporaryDirectory(prefix="valmi-cpu-") as tmp, fake_api() as fake:
        work = Path(tmp)
        script = work / "post.lua"
        if args.rate:
            script.write_text(_PACED_LUA.format(body=BODY.decode(), rate=args.rate))
        else:
            script.write_text(_WRK_LUA.format(body=BODY.decode()))
        fake_pid = _fake_pid(fake)
        with ingest_target(args.target, work / "target", fake) as (url, pid):
            if not args.rate:
                wrk(url, args.connections, 1, script)  # warm-up
            stored = fake_counts(fake)["stored"]
            before, busy = snapshot(pid, fake_pid), machine_busy_s()
            result = wrk(url, args.connections, args.seconds, script)
            n = max(1, result["requests"] - result["non_2xx"])
            if args.rate and args.target not in ("bare", "minimal", "full-idle"):
                deadline = time.monotonic() + 60
                while fake_counts(fake)["stored"] - stored < n and time.monotonic() < deadline:
                    time.sleep(0.05)
            after, busy = snapshot(pid, fake_pid), machine_busy_s() - busy

    print(
        f"{args.target}: {n:,} events, {result['events_per_s']:,.0f}/s, "
        f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms "
        f"({'paced at ' + str(args.rate) + '/s' if args.rate else 'closed loop'}, "
        f"{args.connections} connections); CPU µs per event:"
    )
    totals: dict[str, float] = {}
    for key in sorted(after):
        spent = after[key] - before.get(key, 0.0)
        if spent <= 0:
            continue
        role, tid, name = key
        totals[role] = totals.get(role, 0.0) + spent
        print(f"  {role:<9} {name:<16} {tid:>8}  {spent * 1e6 / n:8.1f}")
    for role, spent in totals.items():
        print(f"  {role:<9} (all threads)             {spent * 1e6 / n:8.1f}")
    print(f"  machine   (every core)              {busy * 1e6 / n:8.1f}")


def _fake_pid(url: str) -> int | None:
    """The fake API's process: this script's child listening on the URL's port."""
    port = url.rsplit(":", 1)[1]
    for pid in child_pids(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fake-api" in cmdline and any(port.encode() in arg for arg in cmdline):
            return pid
    return None


if __name__ == "__main__":
    try:
        main()
    except httpx.HTTPError as exc:
        raise SystemExit(f"cpu.py: {exc}") from exc
