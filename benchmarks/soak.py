"""Soak: a sidecar process under a steady load for minutes while upstream faults come and go.

    .venv/bin/python benchmarks/soak.py --duration-s 600     # what `make soak` runs
    .venv/bin/python benchmarks/soak.py --ingest-processes 2 # the same with 2 ingest workers

A fake Valmi API runs in this process; the sidecar is a real ``valmi-sidecar run``
subprocess. Agents post at ``--rate`` events a second. Every ``--phase-s`` seconds the
fault changes (none, half 5xx, down, 429 storm, slow, reset after store, hang, none, ...).
Every 5 s the sidecar's RSS and open file descriptors (summed over its processes) and
the database size are sampled. At the
end the faults are lifted, the queue drains, SIGTERM, and the ledger of
tests/scenarios.py is computed.

Pass (exit 0) when: lost 0 and double 0; RSS of the last third within 25 % (+16 MiB) of
the first third after warm-up; file descriptors within 50 of the start; database size
under ``--max-db-mib``. Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.scenarios import SECRET_KEY, SECRET_PREFIX, Traffic

from valmi_sidecar.fake_api import FakeValmi

PHASES: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("half_5xx", {"error_rate": 0.5}),
    ("down", {}),
    ("429_storm", {"rate_limited": True, "retry_after_s": 1.0}),
    ("slow", {"latency_s": 1.5}),
    ("reset_after_store", {"reset_after_store": True}),
    ("hang", {"hang": True}),
]
CLEAR = {
    "error_rate": 0.0,
    "rate_limited": False,
    "latency_s": 0.0,
    "reset_after_store": False,
    "hang": False,
}


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (for the sidecar: its ingest workers), in pid order."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(out)


def sample(pid: int, data_dir: Path) -> dict[str, float]:
    """RSS and open file descriptors summed over the sidecar's processes; database size."""
    rss_kib = 0
    fds = 0
    for p in (pid, *child_pids(pid)):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kib += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
    db = sum(p.stat().st_size for p in data_dir.glob("*") if p.is_file())
    return {
        "t": time.monotonic(),
        "rss_mib": rss_kib / 1024,
        "fds": fds,
        "db_mib": db / 2**20,
    }


async def wait_ready(log_path: Path, proc: subprocess.Popen[bytes]) -> str:
    # A harness, not the service: small reads of our own log file while polling.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sidecar exited: {log_path.read_text()[-2000:]}")  # noqa: ASYNC240
        for line in log_path.read_text(errors="replace").splitlines():  # noqa: ASYNC240
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev.get("event") == "sidecar_ready":
                return "http://" + str(ev["listen"])
        await asyncio.sleep(0.05)
    raise SystemExit("sidecar not ready in 30 s")


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="valmi-soak-"))
    data_dir = work / "data"
    fake = FakeValmi(api_keys=(SECRET_KEY,), seed=10)
    await fake.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    env |= {
        "VALMI_SIDECAR_DATA_DIR": str(data_dir),
        "VALMI_SIDECAR_LISTEN": "127.0.0.1:0",
        "VALMI_SIDECAR_LOG_FORMAT": "json",
        "VALMI_API_URL": fake.url,
        "VALMI_API_KEY": SECRET_KEY,
        "VALMI_SIDECAR_UPSTREAM_TIMEOUT_S": "1",
        "VALMI_SIDECAR_BACKOFF_CAP_S": "2",
        "VALMI_SIDECAR_RATE_LIMIT_PER_MIN": "600000",
        "VALMI_SIDECAR_INGEST_PROCESSES": str(args.ingest_processes),
    }
    log_path = work / "sidecar.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
            [sys.executable, "-m", "valmi_sidecar", "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    traffic = Traffic("soak")
    samples: list[dict[str, float]] = []
    phases_run: list[str] = []
    try:
        url = await wait_ready(log_path, proc)
        started = time.monotonic()
        end = started + args.duration_s
        async with httpx.AsyncClient(timeout=10.0) as client:

            async def post_steadily() -> None:
                seq = 0
                interval = 1.0 / args.rate
                next_at = time.monotonic()
                pending: set[asyncio.Task[bool]] = set()
                while time.monotonic() < end:
                    task = asyncio.create_task(traffic.post(client, url, seq))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    seq += 1
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                if pending:
                    await asyncio.gather(*pending)

            async def change_faults() -> None:
                i = 0
                while time.monotonic() < end:
                    name, faults = PHASES[i % len(PHASES)]
                    phases_run.append(name)
                    fake.set_faults(**CLEAR)
                    await fake.go_up()
                    if name == "down":
                        await fake.go_down()
                    else:
                        fake.set_faults(**faults)
                    await asyncio.sleep(min(args.phase_s, max(0.0, end - time.monotonic())))
                    i += 1
                fake.set_faults(**CLEAR)
                await fake.go_up()

            async def sample_loop() -> None:
                while time.monotonic() < end:
                    samples.append(sample(proc.pid, data_dir))
                    await asyncio.sleep(5.0)

            await asyncio.gather(post_steadily(), change_faults(), sample_loop())
            drained = await traffic.settle(fake, args.drain_s)
            samples.append(sample(proc.pid, data_dir))
            status = (await client.get(url + "/v1/status")).json()
            metrics = (await client.get(url + "/metrics")).text
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        await fake.stop()

    ledger = traffic.ledger(
        fake,
        dead_lettered=status["events"]["dead_lettered"],
        phases=phases_run,
        rate_per_s=args.rate,
    )
    ledger.report()
    steady = samples[len(samples) // 6 :] or samples
    third = max(1, len(steady) // 3)
    rss_first = statistics.median(s["rss_mib"] for s in steady[:third])
    rss_last = statistics.median(s["rss_mib"] for s in steady[-third:])
    fds = [s["fds"] for s in samples]
    db_max = max(s["db_mib"] for s in samples)
    leaked = SECRET_PREFIX in log_path.read_text(errors="replace") or SECRET_PREFIX in metrics
    checks = {
        "drained": drained,
        "lost_0": ledger.lost == 0,
        "double_0": ledger.double == 0,
        "rss_flat": rss_last <= rss_first * 1.25 + 16,
        "fds_flat": max(fds) - fds[0] <= 50,
        "db_bounded": db_max <= args.max_db_mib,
        "exit_0": exit_code == 0,
        "no_key_in_logs_or_metrics": not leaked,
    }
    return {
        "duration_s": args.duration_s,
        "ledger": {
            k: getattr(ledger, k)
            for k in ("sent", "acknowledged", "delivered", "dead_lettered", "lost", "double")
        },
        "resent_same_key": ledger.resent_same_key,
        "rss_mib_first_third": round(rss_first, 1),
        "rss_mib_last_third": round(rss_last, 1),
        "fds_min_max": [min(fds), max(fds)],
        "db_mib_max": round(db_max, 2),
        "samples": len(samples),
        "checks": checks,
        "ok": all(checks.values()),
        "log": str(log_path),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=100.0, help="events posted per second")
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds per fault phase")
    parser.add_argument("--drain-s", type=float, default=120.0)
    parser.add_argument("--max-db-mib", type=float, default=256.0)
    parser.add_argument(
        "--ingest-processes", type=int, default=1, help="the sidecar's ingest_processes"
    )
    summary = asyncio.run(soak(parser.parse_args()))
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
