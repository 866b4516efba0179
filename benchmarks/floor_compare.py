"""``make floor``: CPU per delivered event of the sidecar against a lean floor (issue 19).

    .venv/bin/python benchmarks/floor_compare.py                       # 3 rounds, about 20 min
    .venv/bin/python benchmarks/floor_compare.py --rounds 1 --seconds 10   # a quick look
    git archive HEAD~1 src | tar -x -C /tmp/before       # old against new, one run:
    .venv/bin/python benchmarks/floor_compare.py --rates 1000 --no-closed --rounds 5 \
        --also /tmp/before/src

Three targets, each a fresh process and data directory per measurement: the floor
(``benchmarks/floor.py``), the sidecar (``valmi-sidecar run``, ``durability=full``, no rate
limit so that it can forward 1,000 events/s) and bare aiohttp (``tools.py bare``: reads and
parses the body, answers 202, stores nothing). Floor and sidecar forward to the project's
fake API (``valmi-sidecar fake-api``), with the same ``--upstream-concurrency``.

A fourth target, the control (``floor-again``; ``--no-control`` leaves it out), is the
floor once more, a process of its own measured as the first: its ratio to the floor is
what a ratio reads when nothing differs, the run's own noise; a CPU verdict nearer 1.2
than that noise is marked as within it (docs/PERFORMANCE.md, "The run's own noise").

Load points, each measured for every target in turn, ``--rounds`` times, interleaved
(round 1: every point for every target; then round 2; ...), each round in another order
(``round_order``: floor, sidecar, control, bare; then sidecar, bare, floor, control; ...),
so that the machine's drift falls on all of them alike and no target always runs first or
right after the same other:

- paced at ``--rates`` (10, 100 and 1,000 events/s in total): wrk with the Lua ``delay``
  of ``run.py`` (one thread, ``--paced-connections`` keep-alive connections), a process of
  its own. A warm-up at the same rate first; its deliveries are waited for (the fake
  API's count holds still for ``--settle-s``), then the fake API's counters are reset.
  The window runs from just before the load until the fake API holds every event the
  target acknowledged and its count has held still for ``--settle-s``, so that recording
  the deliveries (the floor's delete, the sidecar's settle) falls inside it too.
  Before the warm-up, the floor and the sidecar (and the control) first serve a closed
  loop of ``--steady-s`` seconds (3 by default), forwarded and waited for: the window then
  measures a process that has run (its WAL at full size and reused, its tables holding
  what it served), as a pod's does, not a fresh one whose WAL still grows (0 measures
  fresh processes, as runs before this default did).
- a closed loop, ingest only: 64 connections back to back (wrk, else ``tools.py load``),
  after a one-second warm-up; floor and sidecar start without an API key, so neither
  forwards, as the issue's last column.

``--also SRC`` (repeatable) adds the sidecar once more for each source tree given (a
directory holding ``valmi_sidecar``, such as a copy of ``src/`` before a change, imported
through ``PYTHONPATH``): ``also-1``, ... run in the same rounds as the other targets, and
the table gains their CPU per event and p99, each against the sidecar's of the same round.
The issue's verdicts stay the installed sidecar's.

``--pool A.json B.json ...`` measures nothing: it prints the table and verdicts of the
rounds of several saved runs (``floor.json``, of the same code) taken together, each ratio
still per round, each against the run of its own round (``floor_stats.pooled``; the
``--also`` trees are left out). More rounds narrow a median that three leave to the host.

CPU is the target process's only (its threads together; see ``floor_stats.py`` for why
the process's CPU-time clock and not ``/proc/<pid>/task/*/schedstat``), per delivered event
(per acknowledged event for bare, and in the closed loop). Latency is wrk's p50/p99 at the
highest paced rate. Writes ``benchmarks/results/floor.{md,json}`` and prints the table.
Only ratios within one run mean much on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from valmi_sidecar.settler import RIDE_S

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from floor_stats import (  # noqa: E402 - beside this script
    ALSO_PREFIX,
    CLOSED,
    CONTROL,
    LOOP,
    NAMES,
    TARGETS,
    also_target,
    cpu_sample,
    cpu_spent,
    markdown,
    pooled,
    summarize,
    verdicts,
)
from run import (  # noqa: E402 - beside this script
    _PACED_LUA,
    _WRK_LUA,
    PY,
    TOOLS,
    UNLIMITED_PER_MIN,
    Sidecar,
    add_also,
    check_also,
    fake_api,
    from_source,
    ingest_target,
    machine,
    shown,
    stop,
    wrk,
)
from tools import API_KEY, BODY  # noqa: E402 - beside this script

CLOSED_CONNECTIONS = 64
#: How long the fake API's count holds still before a window ends, by default: longer
#: than a delivery may ride before the sidecar records it (``settler.RIDE_S``), so that
#: recording the last deliveries falls inside the window.
SETTLE_S = RIDE_S + 0.3
READY_TIMEOUT_S = 60.0


@contextlib.contextmanager
def floor_process(
    run_dir: Path,
    api_url: str,
    *,
    forwarding: bool,
    concurrency: int,
    python: Sequence[str] = (PY,),
) -> Iterator[tuple[str, int]]:
    """``benchmarks/floor.py`` with the sidecar's flags: ``(ingest URL, pid)``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    if forwarding:
        env["VALMI_API_KEY"] = API_KEY
    log_path = run_dir.with_suffix(".log")
    cmd = [*python, str(HERE / "floor.py"), "--listen", "127.0.0.1:0", "--data-dir", str(run_dir)]
    cmd += ["--api-url", api_url, "--upstream-concurrency", str(concurrency)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        listen = None
        while listen is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the floor did not start: {log_path.read_text()[-2000:]}")
            for line in log_path.read_text(errors="replace").splitlines():
                if '"floor_ready"' in line:
                    listen = json.loads(line)["listen"]
            time.sleep(0.01)
        yield f"http://{listen}/v1/actions", proc.pid
    finally:
        stop(proc)


@contextlib.contextmanager
def target_process(
    target: str,
    run_dir: Path,
    fake: str,
    *,
    forwarding: bool,
    concurrency: int,
    python: Sequence[str] = (PY,),
) -> Iterator[tuple[str, int]]:
    """A fresh process and data directory for one measurement: ``(ingest URL, pid)``;
    ``python``, the interpreter's command for the floor and the sidecar."""
    if target in ("floor", CONTROL):
        with floor_process(
            run_dir, fake, forwarding=forwarding, concurrency=concurrency, python=python
        ) as x:
            yield x
    elif target == "sidecar":
        side = Sidecar(
            run_dir,
            fake,
            durability="full",
            rate_limit_per_min=UNLIMITED_PER_MIN,
            upstream_concurrency=concurrency,
            api_key=API_KEY if forwarding else None,
            python=python,
        )
        try:
            yield side.url + "/v1/actions", side.proc.pid
        finally:
            side.stop()
    else:
        with ingest_target("bare", run_dir, fake) as x:
            yield x


# -- the fake API's count of deliveries -------------------------------------------------


def delivered(fake: str) -> tuple[int, int]:
    """Events the fake API stored (first attempts) and repeats of a stored key. Its
    counters only: the events themselves are not fetched (no event is an outcome)."""
    snap = httpx.get(fake + "/_fake/received", params={"kind": "outcome"}, timeout=30.0).json()
    ok = sum(n for status, n in snap["status_counts"].items() if 200 <= int(status) < 300)
    return ok - int(snap["duplicates"]), int(snap["duplicates"])


def wait_delivered(fake: str, at_least: int, settle_s: float, timeout_s: float) -> int:
    """Once the fake API holds ``at_least`` events and its count has not moved for
    ``settle_s``: that count. A target that falls short by the deadline is an error."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while True:
        n, _ = delivered(fake)
        now = time.monotonic()
        if n != last:
            last, since = n, now
        elif n >= at_least and now - since >= settle_s:
            return n
        if now > deadline:
            raise SystemExit(f"only {n} of {at_least} events reached the fake API in {timeout_s} s")
        time.sleep(0.02)


def acknowledged(result: dict[str, Any]) -> int:
    if "accepted" in result:  # tools.py load
        return int(result["accepted"])
    return int(result["requests"]) - int(result["non_2xx"])


def closed_loop(url: str, seconds: float, script: Path) -> dict[str, Any]:
    """64 connections back to back: wrk when installed, else ``tools.py load``."""
    if shutil.which("wrk"):
        return wrk(url, CLOSED_CONNECTIONS, seconds, script)
    cmd = [*TOOLS, "load", "--url", url, "-c", str(CLOSED_CONNECTIONS), "-d", f"{seconds:g}"]
    cmd += ["--warmup", "0"]
    return dict(json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout))


# -- one measurement --------------------------------------------------------------------


def measure(
    args: argparse.Namespace,
    target: str,
    point: str,
    run_dir: Path,
    fake: str,
    script: Path,
    burst_script: Path,
    *,
    python: Sequence[str] = (PY,),
) -> dict[str, Any]:
    """One target at one load point; an ``--also`` target is the sidecar run by ``python``."""
    paced = point != CLOSED
    forwards = paced and target != "bare"
    kind = "sidecar" if target.startswith(ALSO_PREFIX) else target
    with target_process(
        kind, run_dir, fake, forwarding=paced, concurrency=args.upstream_concurrency, python=python
    ) as (url, pid):
        if forwards and args.steady_s > 0:
            # A process that has run for a while: its WAL at full size, its tables holding
            # what it served. A fresh one's first minutes are not what a pod pays for each
            # event, and they differ between targets (docs/PERFORMANCE.md, "A fresh process
            # against one that has run").
            httpx.post(fake + "/_fake/reset", timeout=30.0)
            burst = closed_loop(url, args.steady_s, burst_script)
            wait_delivered(fake, acknowledged(burst), args.settle_s, args.drain_timeout_s)
        if paced:
            warm = wrk(url, args.paced_connections, args.warmup_s, script)
            if forwards:
                wait_delivered(fake, acknowledged(warm), args.settle_s, args.drain_timeout_s)
            httpx.post(fake + "/_fake/reset", timeout=30.0)
            before, t0 = cpu_sample(pid), time.monotonic()
            result = wrk(url, args.paced_connections, args.seconds, script)
            acked = acknowledged(result)
            n = acked
            if forwards:
                n = wait_delivered(fake, acked, args.settle_s, args.drain_timeout_s)
            else:
                time.sleep(args.settle_s)  # the same window's tail as the others
            after, wall = cpu_sample(pid), time.monotonic() - t0
        else:
            closed_loop(url, 1, script)
            before, t0 = cpu_sample(pid), time.monotonic()
            result = closed_loop(url, args.closed_seconds, script)
            after, wall = cpu_sample(pid), time.monotonic() - t0
            acked = n = acknowledged(result)
    spent = cpu_spent(before, after)
    repeats = delivered(fake)[1] if forwards else 0
    return {
        "target": target,
        "point": point,
        "acknowledged": acked,
        "events": n,
        "sent_again": repeats,
        "wall_s": wall,
        **spent,
        "us_per_event": spent["cpu_s"] * 1e6 / max(n, 1),
        LOOP: spent["cpu_main_s"] * 1e6 / max(n, 1),
        "cpu_pct_of_core": 100 * spent["cpu_s"] / wall,
        "events_per_s": float(result["events_per_s"]),
        "p50_ms": float(result["p50_ms"]),
        "p99_ms": float(result["p99_ms"]),
        "non_2xx": int(result.get("non_2xx", result.get("non_202", 0))),
        "load_tool": result.get("tool", ""),
    }


def round_order(targets: Sequence[str], n: int) -> list[str]:
    """The order of ``targets`` in round ``n`` (from 0), a Williams design: over a cycle of
    rounds each target runs once in every place and right after each other target once
    (with an even number of targets; with an odd number, every second cycle runs the
    orders backwards), so that no target always runs first or after the same other."""
    k = len(targets)
    first = [0]
    for i in range(1, k):  # 0, 1, k-1, 2, k-2, ...
        first.append((i + 1) // 2 if i % 2 else k - i // 2)
    order = [targets[(j + n) % k] for j in first]
    return order[::-1] if k % 2 and (n // k) % 2 else order


def _shown_arg(value: Any) -> Any:
    """An argument as the results show it: paths relative to the repository."""
    if isinstance(value, Path):
        return shown(value)
    if isinstance(value, list):
        return [_shown_arg(v) for v in value]
    return value


def pooled_table(files: Sequence[Path]) -> str:
    """``--pool``: the table and verdicts of several runs' rounds taken together, each
    ratio still per round. More rounds narrow a median that one run's three leave to the
    host's noise; the runs should be of the same code (the header names each)."""
    results = []
    for path in files:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: cannot read a floor.json there ({exc})") from None
        if not isinstance(result, dict) or not isinstance(result.get("runs"), list):
            raise SystemExit(f"{path}: not a result of floor_compare.py (it has no runs)")
        results.append(result)
    runs, points = pooled(results)
    rounds = len({r["round"] for r in runs})
    header = (
        f"The rounds of {len(results)} runs taken together, {rounds} in all (each ratio "
        "is still per round, each against the run of the same round): "
        + "; ".join(f"{r.get('started', '?')}, `{r.get('command', '?')}`" for r in results)
        + "."
    )
    return markdown(summarize(runs, points), points, header)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--rates",
        type=int,
        nargs="*",
        default=[10, 100, 1000],
        help="paced events/s in total (none: the closed loop alone)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="each paced window's load")
    parser.add_argument("--closed-seconds", type=float, default=10.0)
    parser.add_argument("--no-closed", action="store_true", help="paced points only")
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="measure the floor once a round, not a second time as the run's noise",
    )
    parser.add_argument("--paced-connections", type=int, default=16)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument(
        "--steady-s",
        type=float,
        default=3.0,
        help="before each paced window of the floor and the sidecar, a closed loop of this "
        "many seconds, forwarded and waited for, so that the window measures a process that "
        "has run (its WAL at full size, its tables holding what it served); 0: a fresh one "
        "(default 3)",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=SETTLE_S,
        help="a window ends once the fake API's count has held still this long (default "
        f"{SETTLE_S:g}: longer than a delivery rides before it is recorded)",
    )
    parser.add_argument("--drain-timeout-s", type=float, default=60.0)
    parser.add_argument("--upstream-concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--dir", type=Path, default=HERE, help="where the temporary data goes")
    add_also(parser)
    parser.add_argument(
        "--pool",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        metavar="JSON",
        help="measure nothing: the rounds of the floor.json files given (runs of the same "
        "code), taken together, as one table and its verdicts, printed",
    )
    args = parser.parse_args()
    if args.pool:
        print(pooled_table(args.pool))
        return 0
    check_also(args.also)
    # Each --also tree runs as a target of its own, in the same rounds as the rest.
    also = {also_target(i + 1): src.resolve() for i, src in enumerate(args.also)}
    if args.rates and shutil.which("wrk") is None:
        raise SystemExit(
            "the paced points need wrk (apt-get install wrk); give --rates with no value "
            "to measure the closed loop alone"
        )
    points = [str(r) for r in sorted(args.rates)] + ([] if args.no_closed else [CLOSED])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = " ".join(["benchmarks/floor_compare.py", *sys.argv[1:]])
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-floor-", dir=args.dir) as tmp,
        fake_api() as fake,
    ):
        work = Path(tmp)
        scripts = {CLOSED: work / "closed.lua"}
        scripts[CLOSED].write_text(_WRK_LUA.format(body=BODY.decode()))
        for rate in args.rates:
            scripts[str(rate)] = work / f"paced-{rate}.lua"
            scripts[str(rate)].write_text(_PACED_LUA.format(body=BODY.decode(), rate=rate))
        targets = [*TARGETS] if args.no_control else [*TARGETS, CONTROL]
        targets += list(also)
        for n in range(args.rounds):
            for point in points:
                for target in round_order(targets, n):
                    run_dir = work / f"{target}-{point}-{n}"
                    python = (*from_source(also.get(target)), PY)
                    run = measure(
                        args,
                        target,
                        point,
                        run_dir,
                        fake,
                        scripts[point],
                        scripts[CLOSED],
                        python=python,
                    )
                    run["round"] = n
                    runs.append(run)
                    print(
                        f"  round {n + 1} {point:>6} {target:<11} {run['events']:>6,} events "
                        f"{run['us_per_event']:>7,.0f} µs/event "
                        f"({run['cpu_pct_of_core']:.1f}% of a core) "
                        f"{run['events_per_s']:>7,.0f} ev/s p50 {run['p50_ms']:.1f} "
                        f"p99 {run['p99_ms']:.1f} ms",
                        flush=True,
                    )
    summary = summarize(runs, points, list(also))
    for target, src in also.items():
        # The tree's last two parts (``before/src``), not the machine's whole path.
        summary["also"][target]["source"] = f"{src.parent.name}/{src.name}"
    m = machine()
    header = (
        f"Run {started} on {m['cpu']} ({m['cores']} cores, shared), Python {m['python']}, "
        f"SQLite {m['sqlite']}, load from {m['load_generator']}; command: `{command}`. "
        f"CPU µs per delivered event of the target process alone, median (and range) of "
        f"{args.rounds} interleaved round(s); paced with {args.paced_connections} keep-alive "
        f"connections, {args.seconds:g} s a window, "
        + (
            f"the floor's and the sidecar's each after a closed loop of {args.steady_s:g} s "
            "that they served and forwarded (processes that have run)"
            if args.steady_s > 0
            else "each in a fresh process"
        )
        + "; ratios are per round, each against the run of the same round."
    )
    md = markdown(summary, points, header)
    result = {
        "started": started,
        "command": command,
        "machine": m,
        "args": {k: _shown_arg(v) for k, v in vars(args).items()},
        "targets": dict(NAMES),
        "runs": runs,
        "summary": summary,
        "verdicts": verdicts(summary),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floor.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "floor.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
