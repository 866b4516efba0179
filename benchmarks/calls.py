"""Python function calls per delivered event on the event loop's thread, the sidecar
against the lean floor: a count, which this shared machine's noise does not move, where
CPU times move by a tenth between runs.

    .venv/bin/python benchmarks/calls.py                    # 100 events/s for 10 s
    .venv/bin/python benchmarks/calls.py --rate 20 --seconds 2 --top 0

Each target (``benchmarks/floor.py``, then ``valmi-sidecar run`` with ``durability=full``)
runs under ``benchmarks/profiled.py`` and forwards to the fake API. After a warm-up whose
deliveries are waited for, ``cProfile`` is switched on (SIGUSR1), events are posted at
``--rate`` for ``--seconds`` (an httpx client on one keep-alive connection), and once the
fake API holds every one of them and its count has held still, switched off (SIGUSR2).
The calls are counted by where the function lives: the target's own code, aiohttp,
asyncio and uvloop, builtins (C functions and methods), and the rest. ``cProfile`` makes
every call slower, so the counts, not the times, are the figures; they cover the main
thread only (the event loop's; SQLite runs on threads of its own in both).
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from floor_compare import SETTLE_S, target_process, wait_delivered  # noqa: E402
from run import PY, fake_api  # noqa: E402 - beside this script
from tools import BODY  # noqa: E402 - beside this script

TARGETS = ("floor", "sidecar")
ORIGINS = ("own code", "aiohttp", "asyncio", "builtins", "other")
PROFILE_TIMEOUT_S = 30.0


def origin(filename: str) -> str:
    """Where a profiled function lives, as ``ORIGINS`` names it."""
    if filename == "~":
        return "builtins"
    path = filename.replace(os.sep, "/")
    if "/valmi_sidecar/" in path or path.endswith("/floor.py"):
        return "own code"
    if "/aiohttp/" in path:
        return "aiohttp"
    if "/asyncio/" in path or "/uvloop/" in path:
        return "asyncio"
    return "other"


def count(stats: pstats.Stats, events: int) -> tuple[dict[str, float], dict[str, float]]:
    """Calls per event by origin, and per function of the target's own code."""
    by_origin: dict[str, float] = dict.fromkeys(ORIGINS, 0.0)
    own: collections.Counter[str] = collections.Counter()
    # ``Stats.stats``, not ``get_stats_profile()``: that one keys functions by name alone,
    # so the many ``__init__``s (and every other repeated name) would be counted as one.
    for (filename, line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        calls = row[1] / events
        where = origin(filename)
        by_origin[where] += calls
        if where == "own code":
            own[f"{Path(filename).name}:{line}:{name}"] += calls
    return by_origin, dict(own)


def post_paced(url: str, rate: float, seconds: float) -> int:
    """Post ``rate`` events a second for ``seconds``; how many were acknowledged."""
    acked = 0
    interval = 1.0 / rate
    with httpx.Client(headers={"Content-Type": "application/json"}, timeout=30.0) as client:
        start = time.monotonic()
        for i in range(max(1, round(rate * seconds))):
            wait = start + i * interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing the load, not waiting for a result
            acked += client.post(url, content=BODY).status_code == 202
    return acked


def signalled_window(
    url: str, pid: int, fake: str, args: argparse.Namespace, out: Path, label: str
) -> int:
    """A warm-up whose deliveries are waited for, then ``--rate`` events for ``--seconds``
    between SIGUSR1 and SIGUSR2 to ``pid`` (a target under ``profiled.py`` or
    ``traced.py``), once the fake API holds them all; waits for the target to write
    ``out``. The events delivered in the window."""
    warm = post_paced(url, args.rate, 1.0)
    wait_delivered(fake, warm, args.settle_s, 60.0)
    httpx.post(fake + "/_fake/reset", timeout=30.0)
    os.kill(pid, signal.SIGUSR1)
    acked = post_paced(url, args.rate, args.seconds)
    events = wait_delivered(fake, acked, args.settle_s, 60.0)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + PROFILE_TIMEOUT_S
    while not out.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{label}: nothing written to {out}")
        time.sleep(0.02)
    return events


def measure(target: str, work: Path, fake: str, args: argparse.Namespace) -> dict[str, object]:
    out = work / f"{target}.prof"
    os.environ["BENCH_PROFILE_OUT"] = str(out)
    python = (PY, str(HERE / "profiled.py"))
    with target_process(
        target, work / target, fake, forwarding=True, concurrency=16, python=python
    ) as (url, pid):
        events = signalled_window(url, pid, fake, args, out, target)
    by_origin, own = count(pstats.Stats(str(out)), events)
    return {"events": events, "by_origin": by_origin, "own": own}


def markdown(results: Mapping[str, Mapping[str, object]], top: int) -> str:
    lines = [
        "| calls per delivered event, event loop's thread | all | " + " | ".join(ORIGINS) + " |",
        "| --- | ---: |" + " ---: |" * len(ORIGINS),
    ]
    for target in TARGETS:
        by = results[target]["by_origin"]
        assert isinstance(by, dict)
        cells = [f"{by[o]:.1f}" for o in ORIGINS]
        lines.append(f"| {target} | {sum(by.values()):.1f} | " + " | ".join(cells) + " |")
    own = results["sidecar"]["own"]
    assert isinstance(own, dict)
    if top:
        lines += ["", f"The sidecar's own functions called most per event (top {top}):", ""]
        for name, calls in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"- {calls:.2f} `{name}`")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=100.0, help="events a second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--settle-s", type=float, default=SETTLE_S)
    ap.add_argument("--top", type=int, default=20, help="the sidecar's own functions listed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, fake_api() as fake:
        results = {t: measure(t, Path(tmp), fake, args) for t in TARGETS}
    print(f"{args.rate:g} events/s for {args.seconds:g} s, forwarding to the fake API:\n")
    print(markdown(results, args.top))


if __name__ == "__main__":
    main()
