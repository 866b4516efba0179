"""``make bench``: the sidecar against its ceilings and a peer, side by side in one run.

    .venv/bin/python benchmarks/run.py                      # everything (about 30 minutes)
    .venv/bin/python benchmarks/run.py --quick              # short runs, 100k backlog

Writes ``benchmarks/results/bench.{md,json,png}`` and prints the Markdown table.

1. Ingest: a bare aiohttp app (``tools.py bare``: reads and parses the body, answers 202;
   uvloop like the sidecar) and a minimal group-commit prototype (``tools.py minimal``:
   the same, plus one durable SQLite table) against ``valmi-sidecar run`` with
   ``durability=full`` and ``normal``, at 16, 64 and 256 connections, driven by wrk
   (Debian's package) when installed, else by ``tools.py load`` (aiohttp client), each in
   its own process. Every (concurrency, target) gets a fresh process and data directory;
   ``--rounds`` rounds run every target one after the other, and each share of bare is
   taken against the bare run of the same round (the machine drifts). The sidecar
   forwards to a fake API with the default 10,000/min budget while it ingests, as it
   would in production ("not forwarding": nothing listens upstream).
   Beside them, the sidecar with ``ingest_processes = 2`` (two ingest worker processes
   for HTTP and validation, the main one for the store and forwarding); each row gives
   the whole machine's CPU time per event too (``--targets`` picks).
   Then latency below saturation: 64 connections paced (wrk's Lua ``delay``) to 12.5,
   25, 37.5, 50 and 75% of bare's events/s.
2. Peer queue: ``tools.py peer`` (the store against persist-queue's SQLiteAckQueue).
3. Forwarding: 20,000 queued events drained to the fake API without a rate limit, against
   ``tools.py httpx-loop`` (the same requests from a plain httpx loop); then a fake API
   limited to 10,000/min for ``--limited-s`` seconds: the rate kept, and the sidecar's
   CPU per delivered event while it catches up at that rate.
4. Backlog: ``--backlog`` events queued (a tenth first, then all): time to ready (after
   a clean stop, and after a SIGKILL, when start-up checks the whole file), resident
   memory, ingest at 64 connections and drain rate, against the same two rates on an
   empty queue measured just before each point (ingest into an empty queue; drain of
   twice ``--forward-events``). Ingest is measured in ``--rounds`` rounds, the backlog's
   window and an empty queue's in alternating order, and judged by the median of the
   rounds' shares (one window each swings by more than the 10% the target allows).
5. Footprint: idle CPU and resident memory; resident memory under the ingest load; CPU
   per event at steady low rates (``--steady-rates``, paced, until all is delivered).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from floor_stats import Spread  # noqa: E402 - beside this script
from tools import API_KEY, BODY  # noqa: E402 - beside this script

PY = sys.executable
TOOLS = [PY, str(HERE / "tools.py")]
UNLIMITED_PER_MIN = 100_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mib(pid: int) -> float:
    """Resident memory of a process and of its child processes (the sidecar's ingest
    workers; pages they share count in each, so this is an upper bound)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                total += rss_mib(int(child))
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (every core; /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class RssSampler(threading.Thread):
    """The largest resident size of a process, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.max_mib = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            with contextlib.suppress(OSError):
                self.max_mib = max(self.max_mib, rss_mib(self.pid))

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self.join()


@contextlib.contextmanager
def fake_api(rate_limit_per_min: int | None = None) -> Iterator[str]:
    port = free_port()
    cmd = [PY, "-m", "valmi_sidecar", "fake-api", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--api-key", API_KEY, "--log-level", "warning"]
    if rate_limit_per_min is not None:
        cmd += ["--rate-limit-per-min", str(rate_limit_per_min)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/_fake/faults", timeout=1.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("fake API did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        stop(proc)


def fake_counts(url: str) -> dict[str, Any]:
    snap = httpx.get(url + "/_fake/received", timeout=30.0).json()
    return {"stored": len(snap["events"]), "status_counts": snap["status_counts"]}


class Sidecar:
    """``valmi-sidecar run`` as a subprocess on a free loopback port."""

    def __init__(
        self,
        data_dir: Path,
        api_url: str,
        *,
        durability: str = "full",
        rate_limit_per_min: int = 10_000,
        ingest_processes: int = 1,
        upstream_concurrency: int | None = None,
        api_key: str | None = API_KEY,
        python: Sequence[str] = (PY,),
    ) -> None:
        """``api_key=None``: no key, so the sidecar does not forward (ingest only);
        ``python``: the interpreter's command (``calls.py`` runs it under a profiler)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
        env |= {
            "VALMI_SIDECAR_DATA_DIR": str(data_dir),
            "VALMI_SIDECAR_LISTEN": "127.0.0.1:0",
            "VALMI_SIDECAR_LOG_FORMAT": "json",
            "VALMI_SIDECAR_DURABILITY": durability,
            "VALMI_SIDECAR_RATE_LIMIT_PER_MIN": str(rate_limit_per_min),
            "VALMI_SIDECAR_INGEST_PROCESSES": str(ingest_processes),
            "VALMI_API_URL": api_url,
        }
        if upstream_concurrency is not None:
            env["VALMI_SIDECAR_UPSTREAM_CONCURRENCY"] = str(upstream_concurrency)
        if api_key is not None:
            env["VALMI_API_KEY"] = api_key
        self.log_path = data_dir.parent / f"{data_dir.name}-{time.monotonic_ns()}.log"
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*python, "-m", "valmi_sidecar", "run"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.url = self._wait_ready()
        self.ready_s = time.monotonic() - started

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"sidecar exited: {self.log_path.read_text()[-2000:]}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if '"sidecar_ready"' in line:
                    return "http://" + str(json.loads(line)["listen"])
            time.sleep(0.01)
        raise SystemExit("sidecar not ready in 60 s")

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/v1/status", timeout=10.0).json())

    def stop(self) -> None:
        stop(self.proc)


# -- load -----------------------------------------------------------------------------


_WRK_LUA = """wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
"""


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if m is None:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[m.group(2)]
    return float(m.group(1)) * scale


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script)]
    busy = machine_busy_s()
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    busy = machine_busy_s() - busy
    pct = dict(re.findall(r"^\s*(\d+)%\s+(\S+)\s*$", out, re.M))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m is None:
        raise SystemExit(f"unreadable wrk output:\n{out}")
    requests, elapsed = int(m.group(1)), _ms(m.group(2) + m.group(3)) / 1000
    non2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    bad = int(non2.group(1)) if non2 else 0
    return {
        "tool": "wrk",
        "requests": requests,
        "non_2xx": bad,
        "socket_errors": errors.group(1) if errors else "",
        "events_per_s": (requests - bad) / elapsed,
        # The whole machine's CPU time per answer: the target's, wrk's and anything else
        # running (nothing else should be). On 2 cores this bounds any design's rate.
        "machine_cpu_us_per_event": busy * 1e6 / max(requests, 1),
        "p50_ms": _ms(pct.get("50", "")),
        "p99_ms": _ms(pct.get("99", "")),
        "wrk_percentiles": pct,  # as printed, for a figure that does not parse (nan)
        "wrk_output": out,  # whole, for a line the patterns above miss
    }


def load(url: str, connections: int, seconds: float, script: Path) -> dict[str, Any]:
    """One warm-up second, then ``seconds`` measured."""
    if shutil.which("wrk"):
        wrk(url, connections, 1, script)
        return wrk(url, connections, seconds, script)
    cmd = [*TOOLS, "load", "--url", url, "-c", str(connections), "-d", str(seconds)]
    busy = machine_busy_s()
    out = dict(json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout))
    # Over the warm-up second too (at about the same rate), and the load generator's start.
    busy = machine_busy_s() - busy
    out["machine_cpu_us_per_event"] = busy * 1e6 / max(out["events_per_s"] * (seconds + 1), 1)
    return out


def tool(*args: str) -> dict[str, Any]:
    out = subprocess.run([*TOOLS, *args], capture_output=True, check=True).stdout
    return dict(json.loads(out))


# -- the steps ------------------------------------------------------------------------


TARGETS = ("bare", "minimal", "full", "full-2", "normal", "full-idle")


@contextlib.contextmanager
def ingest_target(target: str, run_dir: Path, fake: str) -> Iterator[tuple[str, int]]:
    """A fresh process and data directory for one ingest target: ``(url, pid)``."""
    if target in ("bare", "minimal"):
        port_file = run_dir.with_suffix(".port")
        cmd = [*TOOLS, target, "--port-file", str(port_file)]
        if target == "minimal":
            run_dir.mkdir(parents=True)
            cmd += ["--db", str(run_dir / "q.db")]
        proc = subprocess.Popen(cmd)
        try:
            while not port_file.exists() or not port_file.read_text():
                if proc.poll() is not None:
                    raise SystemExit(f"the {target} app exited")
                time.sleep(0.02)
            yield f"http://127.0.0.1:{port_file.read_text()}/v1/actions", proc.pid
        finally:
            stop(proc)
        return
    # full-idle: nothing listens on the upstream port, so the flusher only backs off:
    # the ingest path alone, without the cost of forwarding.
    upstream = f"http://127.0.0.1:{free_port()}" if target == "full-idle" else fake
    # full-N: N ingest worker processes (ingest_processes = N) beside the main one.
    durability, _, suffix = target.partition("-")
    side = Sidecar(
        run_dir,
        upstream,
        durability=durability,
        ingest_processes=int(suffix) if suffix.isdigit() else 1,
    )
    try:
        yield side.url + "/v1/actions", side.proc.pid
    finally:
        side.stop()


def _median_row(runs: list[dict[str, Any]], ratios: list[float]) -> dict[str, Any]:
    """One table row from the rounds of a (target, connections): medians, and the share
    of bare as the median of the per-round shares (each against the bare run beside it)."""
    row = dict(runs[statistics.median_low(range(len(runs)))])  # for the tool's own fields
    for key in ("events_per_s", "p50_ms", "p99_ms", "rss_max_mib", "machine_cpu_us_per_event"):
        row[key] = statistics.median(x[key] for x in runs)
    row |= {
        "vs_bare": statistics.median(ratios),
        "vs_bare_min": min(ratios),
        "vs_bare_max": max(ratios),
        "rounds": runs,
    }
    return row


def ingest(args: argparse.Namespace, work: Path, fake: str, script: Path) -> dict[str, Any]:
    """Each round runs every target one after the other (in a rotated order), so that
    every sidecar run has a bare run beside it: the machine drifts between rounds."""
    rows: list[dict[str, Any]] = []
    idle: dict[str, float] = {}
    targets = tuple(args.targets)
    for c in args.connections:
        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
        for n in range(args.rounds):
            order = targets[n % len(targets) :] + targets[: n % len(targets)]
            for target in order:
                run_dir = work / f"ingest-{target}-{c}-{n}"
                with ingest_target(target, run_dir, fake) as (url, pid):
                    if target == "full" and not idle:
                        time.sleep(2)
                        cpu0, t0 = cpu_s(pid), time.monotonic()
                        time.sleep(args.idle_s)
                        idle = {
                            "cpu_pct_of_core": 100 * (cpu_s(pid) - cpu0) / (time.monotonic() - t0),
                            "rss_mib": rss_mib(pid),
                            "seconds": args.idle_s,
                        }
                    with RssSampler(pid) as rss:
                        result = load(url, c, args.seconds, script)
                result |= {"target": target, "connections": c, "rss_max_mib": rss.max_mib}
                runs[target].append(result)
                print(
                    f"  ingest {target:<9} c={c:<3} round {n + 1}: "
                    f"{result['events_per_s']:>8,.0f} ev/s "
                    f"p50 {result['p50_ms']:.1f} ms p99 {result['p99_ms']:.1f} ms",
                    flush=True,
                )
        bare = [x["events_per_s"] for x in runs["bare"]]
        for target in targets:
            ratios = [x["events_per_s"] / b for x, b in zip(runs[target], bare, strict=True)]
            rows.append(_median_row(runs[target], ratios))
    return {"rows": rows, "idle": idle}


#: A wrk script that sends at a fixed total rate (``wrk -t1``: one Lua state for all
#: connections): each request is due ``1000 / RATE`` ms after the one before, and waits
#: (``delay``) until it is due. A connection still waiting for its answer sends later, so
#: past the target's capacity the rate falls short: the table shows the achieved rate.
_PACED_LUA = """wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval_ms = 1000 / {rate}
local due_ms = nil
function delay()
  local t = now_ms()
  if due_ms == nil or due_ms < t - 1000 then due_ms = t end
  local d = due_ms - t
  due_ms = due_ms + interval_ms
  if d < 1 then return 0 end
  return math.floor(d)
end
"""


def paced(args: argparse.Namespace, work: Path, fake: str, bare_per_s: float) -> dict[str, Any]:
    """Latency at fixed offered rates (shares of bare's rate at 64 connections), below
    saturation: a closed loop at saturation only measures the queue (Little's law: mean
    latency = connections / throughput), whatever the server does per request."""
    points: list[dict[str, Any]] = []
    rates = [round(share * bare_per_s) for share in args.paced_shares]
    scripts = {}
    for rate in rates:
        scripts[rate] = work / f"paced-{rate}.lua"
        scripts[rate].write_text(_PACED_LUA.format(body=BODY.decode(), rate=rate))
    for target in ("bare", "full", "full-2", "full-idle"):
        if target not in args.targets:
            continue
        with ingest_target(target, work / f"paced-{target}", fake) as (url, _pid):
            for share, rate in zip(args.paced_shares, rates, strict=True):
                wrk(url, 64, 1, scripts[rate])
                result = wrk(url, 64, args.seconds, scripts[rate])
                result |= {"target": target, "share_of_bare": share, "offered_per_s": rate}
                points.append(result)
                print(
                    f"  paced {target:<9} {rate:>6,} ev/s offered: "
                    f"{result['events_per_s']:>6,.0f} achieved, "
                    f"p50 {result['p50_ms']:.1f} ms p99 {result['p99_ms']:.1f} ms",
                    flush=True,
                )
    return {"connections": 64, "points": points}


def steady(args: argparse.Namespace, work: Path, fake: str) -> dict[str, Any]:
    """CPU of the sidecar's process per event at steady low rates (16 connections paced,
    forwarding at the default budget), from start of load until every event is delivered:
    what most sidecars see, and what a CPU request is sized on. At these rates nothing
    batches: each event has its own commit, lease and upstream request."""
    points: list[dict[str, Any]] = []
    for rate in args.steady_rates:
        script = work / f"steady-{rate}.lua"
        script.write_text(_PACED_LUA.format(body=BODY.decode(), rate=rate))
        with ingest_target("full", work / f"steady-{rate}", fake) as (url, pid):
            status_url = url.replace("/v1/actions", "/v1/status")
            cpu0 = cpu_s(pid)
            result = wrk(url, 16, args.steady_s, script)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                events = httpx.get(status_url, timeout=10.0).json()["events"]
                if events["delivered"] >= events["received"]:
                    break
                time.sleep(0.05)
            cpu = cpu_s(pid) - cpu0
            n = events["received"]
        point = {
            "rate_per_s": rate,
            "events": n,
            "delivered": events["delivered"],
            "cpu_s": cpu,
            "cpu_ms_per_event": 1000 * cpu / max(n, 1),
            "cpu_pct_of_core": 100 * cpu / args.steady_s,
            "p99_ms": result["p99_ms"],
        }
        points.append(point)
        print(
            f"  steady {rate:>5} ev/s: {n:,} events, {point['cpu_ms_per_event']:.2f} ms CPU "
            f"per event ({point['cpu_pct_of_core']:.0f}% of a core)",
            flush=True,
        )
    return {"connections": 16, "seconds": args.steady_s, "points": points}


def drain(side: Sidecar, timeout_s: float) -> dict[str, Any]:
    """Delivered events/s from now until the queue is empty (or ``timeout_s`` passed)."""
    events = side.status()["events"]
    start, t0 = events["delivered"], time.monotonic()
    while time.monotonic() - t0 < timeout_s and events["queued"] > 0:
        time.sleep(0.1)
        events = side.status()["events"]
    elapsed = time.monotonic() - t0
    n = events["delivered"] - start
    return {"delivered": n, "elapsed_s": elapsed, "events_per_s": n / elapsed}


def forwarding(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = args.forward_events
    data = work / "forward"
    tool("prefill", "--data-dir", str(data), "-n", str(n))
    with fake_api() as fake:
        out["httpx_loop"] = tool("httpx-loop", "--url", fake, "-n", str(n))
        httpx.post(fake + "/_fake/reset", timeout=10.0)
        out["aiohttp_loop"] = tool("aiohttp-loop", "--url", fake, "-n", str(n))
        httpx.post(fake + "/_fake/reset", timeout=10.0)
        side = Sidecar(data, fake, rate_limit_per_min=UNLIMITED_PER_MIN)
        try:
            with RssSampler(side.proc.pid) as rss:
                out["sidecar"] = drain(side, args.drain_timeout_s)
            out["sidecar"]["rss_max_mib"] = rss.max_mib
            out["sidecar"]["upstream"] = fake_counts(fake)["status_counts"]
        finally:
            side.stop()
    print(
        f"  forward sidecar {out['sidecar']['events_per_s']:,.0f} ev/s, "
        f"httpx loop {out['httpx_loop']['events_per_s']:,.0f} ev/s, "
        f"aiohttp loop {out['aiohttp_loop']['events_per_s']:,.0f} ev/s",
        flush=True,
    )
    limit = 10_000
    data = work / "limited"
    tool("prefill", "--data-dir", str(data), "-n", str(int(args.limited_s * limit / 60) + 3_000))
    with fake_api(limit) as fake:
        side = Sidecar(data, fake, rate_limit_per_min=limit)
        try:
            d0, t0 = side.status()["events"]["delivered"], time.monotonic()
            first = min(60.0, args.limited_s / 2)
            time.sleep(first)
            d1, t1, c1 = side.status()["events"]["delivered"], time.monotonic(), fake_counts(fake)
            cpu1 = cpu_s(side.proc.pid)
            time.sleep(max(0.0, args.limited_s - first))
            d2, t2, c2 = side.status()["events"]["delivered"], time.monotonic(), fake_counts(fake)
            cpu2 = cpu_s(side.proc.pid)
        finally:
            side.stop()
    after = c2["status_counts"].get("429", 0) - c1["status_counts"].get("429", 0)
    out["limited"] = {
        "limit_per_min": limit,
        "seconds": args.limited_s,
        "first_window_s": first,
        "rate_per_min_overall": 60 * (d2 - d0) / (t2 - t0),
        "rate_per_min_after_first_window": 60 * (d2 - d1) / (t2 - t1),
        "status_counts": c2["status_counts"],
        "http_429_after_first_window": after,
        # What a sidecar catching up on a backlog pays per event at the key's rate.
        "cpu_us_per_event_after_first_window": 1e6 * (cpu2 - cpu1) / max(d2 - d1, 1),
    }
    print(f"  limited {out['limited']}", flush=True)
    return out


def empty_ingest(args: argparse.Namespace, run: Path, script: Path, fake: str) -> dict[str, Any]:
    """Ingest at 64 connections into a fresh sidecar's empty queue under ``run``."""
    side = Sidecar(run, fake)
    try:
        return load(side.url + "/v1/actions", 64, args.seconds, script)
    finally:
        side.stop()
        httpx.post(fake + "/_fake/reset", timeout=10.0)


def empty_queue(args: argparse.Namespace, work: Path, script: Path, fake: str) -> dict[str, Any]:
    """The empty-queue rates, measured beside each backlog point (the machine drifts):
    ingest at 64 connections into an empty queue, and the drain of a small queue."""
    run = work / f"empty-{time.monotonic_ns()}"
    run.mkdir()
    ingest = empty_ingest(args, run / "ingest", script, fake)
    tool("prefill", "--data-dir", str(run / "drain"), "-n", str(2 * args.forward_events))
    side = Sidecar(run / "drain", fake, rate_limit_per_min=UNLIMITED_PER_MIN)
    try:
        out = {
            "ready_s": side.ready_s,
            "ingest": ingest,
            "drain": drain(side, args.backlog_drain_s),
        }
    finally:
        side.stop()
    httpx.post(fake + "/_fake/reset", timeout=10.0)
    shutil.rmtree(run, ignore_errors=True)
    return out


def backlog_ingest(
    args: argparse.Namespace, data: Path, script: Path, fake: str, point: dict[str, Any]
) -> dict[str, Any]:
    """Ingest at 64 connections on top of the backlog in ``data``, a sidecar started for
    it: its start-up (the first time) and its resident memory's peak go in ``point``."""
    side = Sidecar(data, fake)
    try:
        point.setdefault("ready_s", side.ready_s)
        point.setdefault("rss_ready_mib", rss_mib(side.proc.pid))
        with RssSampler(side.proc.pid) as rss:
            result = load(side.url + "/v1/actions", 64, args.seconds, script)
        point["rss_ingest_max_mib"] = max(point.get("rss_ingest_max_mib", 0.0), rss.max_mib)
        return result
    finally:
        side.stop()
        httpx.post(fake + "/_fake/reset", timeout=10.0)


def ingest_rounds_measured(
    args: argparse.Namespace, work: Path, script: Path, fake: str, data: Path, point: dict[str, Any]
) -> list[dict[str, float]]:
    """A backlog point's ingest in ``--rounds`` rounds, the backlog's window and a fresh
    empty queue's in alternating order, the first round's empty queue the one ``point``
    holds; each round's share is the backlog's events/s against its own round's empty
    queue (one window each swings by more than the 10% the target allows on a shared
    machine). The first backlog window is ``point["ingest"]``."""
    rounds = []
    for r in range(args.rounds):
        rates: dict[str, float] = {}
        for which in ("backlog", "empty") if r % 2 else ("empty", "backlog"):
            if which == "backlog":
                result = backlog_ingest(args, data, script, fake, point)
                point.setdefault("ingest", result)
            elif r == 0:
                result = point["empty"]["ingest"]
            else:
                run = work / f"empty-{time.monotonic_ns()}"
                result = empty_ingest(args, run, script, fake)
                shutil.rmtree(run, ignore_errors=True)
            rates[which] = result["events_per_s"]
        rounds.append({**rates, "share": rates["backlog"] / rates["empty"]})
    return rounds


def backlog(args: argparse.Namespace, work: Path, script: Path) -> dict[str, Any]:
    data = work / "backlog"
    points = []
    queued = 0
    with fake_api() as fake:
        for target in (args.backlog // 10, args.backlog):
            empty = empty_queue(args, work, script, fake)
            built = tool("prefill", "--data-dir", str(data), "-n", str(target - queued))
            queued = int(built["queued"])
            point: dict[str, Any] = {
                "backlog": queued,
                "prefill_s": built["elapsed_s"],
                "empty": empty,
            }
            point["ingest_rounds"] = ingest_rounds_measured(args, work, script, fake, data, point)
            side = Sidecar(data, fake, rate_limit_per_min=UNLIMITED_PER_MIN)
            try:
                with RssSampler(side.proc.pid) as rss:
                    point["drain"] = drain(side, args.backlog_drain_s)
                point["rss_drain_max_mib"] = rss.max_mib
                point["ready_drain_s"] = side.ready_s
            finally:
                side.stop()
            # After a crash the start checks the whole file (PRAGMA quick_check) first.
            side = Sidecar(data, fake)
            side.proc.kill()
            side.proc.wait()
            side = Sidecar(data, fake)
            point["ready_after_kill_s"] = side.ready_s
            side.stop()
            queued = int(
                sqlite3.connect(data / "queue.db")
                .execute("SELECT count(*) FROM events")
                .fetchone()[0]
            )
            httpx.post(fake + "/_fake/reset", timeout=10.0)
            points.append(point)
            print(
                f"  backlog {point['backlog']:,}: ready {point['ready_s']:.2f} s, "
                f"RSS {point['rss_ready_mib']:.0f}/{point['rss_ingest_max_mib']:.0f} MiB, "
                f"ingest {point['ingest']['events_per_s']:,.0f} ev/s, "
                f"drain {point['drain']['events_per_s']:,.0f} ev/s "
                f"(empty queue beside it: ingest {empty['ingest']['events_per_s']:,.0f}, "
                f"drain {empty['drain']['events_per_s']:,.0f} ev/s); ingest share of empty by "
                f"round: {', '.join(format(x['share'], '.0%') for x in point['ingest_rounds'])}",
                flush=True,
            )
    return {"points": points}


# -- report ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "load_generator": "wrk" if shutil.which("wrk") else "python-aiohttp",
    }


def _paced_verdict(r: dict[str, Any], target: str, name: str) -> list[tuple[str, str, bool]]:
    """At what share of bare's rate ``target`` still keeps up (97% of the offered rate)
    with p99 under 10 ms, without the closed loop's queueing."""
    paced = [x for x in r.get("paced", {}).get("points", []) if x["target"] == target]
    if not paced:
        return []
    kept = [x for x in paced if x["p99_ms"] < 10 and x["events_per_s"] >= 0.97 * x["offered_per_s"]]
    best = max(kept, key=lambda x: x["share_of_bare"], default=None)
    return [
        (
            f"{name}: p99 < 10 ms kept up to ≥ 75% of bare's rate)",
            "at no paced rate"
            if best is None
            else f"up to {best['offered_per_s']:,} ev/s ({best['share_of_bare']:.0%}): "
            f"p99 {best['p99_ms']:.1f} ms",
            best is not None and best["share_of_bare"] >= 0.75,
        )
    ]


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows = {(x["target"], x["connections"]): x for x in r["ingest"]["rows"]}
    out: list[tuple[str, str, bool]] = []
    if ("full", 64) in rows:
        full = rows[("full", 64)]
        share = full["vs_bare"]
        out.append(("full ingest @64 ≥ 75% of bare aiohttp", _share(full), share >= 0.75))
        if ("minimal", 64) in rows:
            floor = rows[("minimal", 64)]
            out.append(
                (
                    "(same, ≥ the minimal group-commit prototype's share)",
                    f"{share:.0%} vs {floor['vs_bare']:.0%}",
                    share >= floor["vs_bare"],
                )
            )
        if ("full-idle", 64) in rows:
            idle_row = rows[("full-idle", 64)]
            out.append(
                ("(same, not forwarding meanwhile)", _share(idle_row), idle_row["vs_bare"] >= 0.75)
            )
        if ("full-2", 64) in rows:
            two = rows[("full-2", 64)]
            out.append(("(same, with ingest_processes = 2)", _share(two), two["vs_bare"] >= 0.75))
        out.append(("full ingest @64 p99 < 10 ms", f"{full['p99_ms']:.1f} ms", full["p99_ms"] < 10))
    for target, name in (("full", "(same, paced"), ("full-2", "(with ingest_processes = 2, paced")):
        out += _paced_verdict(r, target, name)
    if "peer" in r:
        x = r["peer"]["store"]["events_per_s"] / r["peer"]["persist_queue"]["events_per_s"]
        out.append(("≥ 5 x persist-queue durable events/s", f"{x:.1f} x", x >= 5))
    if "forwarding" in r:
        f = r["forwarding"]
        share = f["sidecar"]["events_per_s"] / f["httpx_loop"]["events_per_s"]
        out.append(("forwarding ≥ 80% of plain httpx loop", f"{share:.0%}", share >= 0.8))
        share = f["sidecar"]["events_per_s"] / f["aiohttp_loop"]["events_per_s"]
        out.append(("(same, of a plain loop of the client it uses)", f"{share:.0%}", share >= 0.8))
        lim = f["limited"]
        share = lim["rate_per_min_after_first_window"] / lim["limit_per_min"]
        out.append(("≥ 97% of 10,000/min sustained", f"{share:.1%}", share >= 0.97))
        n429 = lim["http_429_after_first_window"]
        out.append(("no 429 after the first minute", str(n429), n429 == 0))
    if "backlog" in r and ("full", 64) in rows:
        big = r["backlog"]["points"][-1]
        base_out = big["empty"]["drain"]["events_per_s"]
        s_in = ingest_share(big)
        out.append(
            (
                f"backlog {big['backlog']:,}: ingest ≥ 90% of empty (median of rounds)",
                percent(s_in),
                s_in.median >= 0.9,
            )
        )
        if base_out:
            s_out = big["drain"]["events_per_s"] / base_out
            out.append(
                (f"backlog {big['backlog']:,}: drain ≥ 90% of empty", f"{s_out:.0%}", s_out >= 0.9)
            )
        out.append(
            (
                f"backlog {big['backlog']:,}: ready < 2 s",
                f"{big['ready_s']:.2f} s",
                big["ready_s"] < 2,
            )
        )
        rss = max(big["rss_ready_mib"], big["rss_ingest_max_mib"], big["rss_drain_max_mib"])
        out.append(
            (f"backlog {big['backlog']:,}: RSS < 100 MB", f"{rss:.0f} MiB", rss * 1.048576 < 100)
        )
    idle = r["ingest"]["idle"]
    if idle:
        out.append(
            (
                "idle CPU < 1% of a core",
                f"{idle['cpu_pct_of_core']:.2f}%",
                idle["cpu_pct_of_core"] < 1,
            )
        )
        out.append(
            ("idle RSS < 60 MB", f"{idle['rss_mib']:.0f} MiB", idle["rss_mib"] * 1.048576 < 60)
        )
    return out


def ingest_rounds(point: dict[str, Any]) -> list[dict[str, float]]:
    """A backlog point's ingest rounds: each the backlog's and an empty queue's events/s
    and the share (a result written before rounds were measured holds one)."""
    if "ingest_rounds" in point:
        return list(point["ingest_rounds"])
    empty, backlog = point["empty"]["ingest"]["events_per_s"], point["ingest"]["events_per_s"]
    return [{"empty": empty, "backlog": backlog, "share": backlog / empty}]


def ingest_share(point: dict[str, Any]) -> Spread:
    """A backlog point's ingest as a share of an empty queue's: the median of its rounds
    and their range."""
    return Spread.of(x["share"] for x in ingest_rounds(point))


def percent(s: Spread) -> str:
    """``95%`` for one round (or equal ones), else ``95% (88-103%)``."""
    text = f"{s.median:.0%}"
    if f"{s.low:.0%}" != f"{s.high:.0%}":
        text += f" ({s.low * 100:.0f}-{s.high:.0%})"
    return text


NAMES = {
    "bare": "bare aiohttp",
    "minimal": "minimal group commit",
    "full": "sidecar, full",
    "normal": "sidecar, normal",
    "full-idle": "sidecar, full, not forwarding",
    "full-2": "sidecar, full, ingest_processes = 2",
}


def _share(row: dict[str, Any]) -> str:
    if row["vs_bare_min"] == row["vs_bare_max"]:
        return f"{row['vs_bare']:.0%}"
    return f"{row['vs_bare']:.0%} ({row['vs_bare_min']:.0%}-{row['vs_bare_max']:.0%})"


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"Run {r['started']} on {m['cpu']} ({m['cores']} cores, shared), Python {m['python']}, "
        f"SQLite {m['sqlite']}, load from {m['load_generator']}; command: `{r['command']}`.",
        "",
        f"Ingest: medians of {r['args']['rounds']} rounds; each round runs every target once, "
        "one after the other, and *vs bare* is the median (and range) of each round's "
        "share of the bare run beside it. p50/p99 are wrk's, in a closed loop: at "
        "saturation, mean latency = connections / throughput (Little's law).",
        "",
        "| ingest | connections | events/s | vs bare (range) | p50 ms | p99 ms | RSS max MiB "
        "| machine CPU µs/event |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for x in r["ingest"]["rows"]:
        name = NAMES[x["target"]]
        lines.append(
            f"| {name} | {x['connections']} | {x['events_per_s']:,.0f} | {_share(x)} | "
            f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['rss_max_mib']:.0f} | "
            f"{x['machine_cpu_us_per_event']:.0f} |"
        )
    if "paced" in r:
        lines += [
            "",
            "Latency below saturation: 64 connections paced to a fixed total rate (a share "
            "of bare's events/s above).",
            "",
            "| ingest, paced | offered events/s | achieved | p50 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for x in r["paced"]["points"]:
            lines.append(
                f"| {NAMES[x['target']]} | {x['offered_per_s']:,} ({x['share_of_bare']:.0%}) | "
                f"{x['events_per_s']:,.0f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} |"
            )
    lines += ["", "| measure | figure |", "| --- | ---: |"]
    if "peer" in r:
        p = r["peer"]
        lines.append(
            f"| store, put + ack, events/s ({p['n']:,}, 64 submitters) | {p['store']['events_per_s']:,.0f} |"
        )
        lines.append(
            f"| persist-queue SQLiteAckQueue, put + ack, events/s | {p['persist_queue']['events_per_s']:,.0f} |"
        )
    if "forwarding" in r:
        f = r["forwarding"]
        lines.append(
            f"| forwarding, no limit, events/s ({r['args']['forward_events']:,} queued) | {f['sidecar']['events_per_s']:,.0f} |"
        )
        lines.append(
            f"| plain httpx loop, same requests, events/s | {f['httpx_loop']['events_per_s']:,.0f} |"
        )
        lines.append(
            f"| plain aiohttp-client loop (the flusher's client), events/s | {f['aiohttp_loop']['events_per_s']:,.0f} |"
        )
        lim = f["limited"]
        lines.append(
            f"| 10,000/min limit: sustained after {lim['first_window_s']:.0f} s, per min | {lim['rate_per_min_after_first_window']:,.0f} |"
        )
        lines.append(
            f"| 10,000/min limit: 429s (all / after {lim['first_window_s']:.0f} s) | {lim['status_counts'].get('429', 0)} / {lim['http_429_after_first_window']} |"
        )
        if "cpu_us_per_event_after_first_window" in lim:
            lines.append(
                f"| 10,000/min limit: sidecar CPU per delivered event after {lim['first_window_s']:.0f} s, µs | {lim['cpu_us_per_event_after_first_window']:,.0f} |"
            )
    if "backlog" in r:
        for b in r["backlog"]["points"]:
            lines.append(
                f"| backlog {b['backlog']:,}: ready s / RSS MiB (ready, ingest, drain) | "
                f"{b['ready_s']:.2f} / {b['rss_ready_mib']:.0f}, {b['rss_ingest_max_mib']:.0f}, {b['rss_drain_max_mib']:.0f} |"
            )
            rounds = ingest_rounds(b)
            backlog_in = statistics.median(x["backlog"] for x in rounds)
            empty_in = statistics.median(x["empty"] for x in rounds)
            lines.append(
                f"| backlog {b['backlog']:,}: ingest @64 (median of {len(rounds)} rounds) /"
                f" drain, events/s | {backlog_in:,.0f} / {b['drain']['events_per_s']:,.0f} |"
            )
            lines.append(
                f"| backlog {b['backlog']:,}: ingest as a share of an empty queue's, by round"
                f" | {', '.join(format(x['share'], '.0%') for x in rounds)} |"
            )
            lines.append(
                f"| backlog {b['backlog']:,}: ready after SIGKILL (full check), s | "
                f"{b['ready_after_kill_s']:.2f} |"
            )
            e = b["empty"]
            lines.append(
                "| (empty queue, beside it): ingest @64 (median of rounds) / drain, events/s | "
                f"{empty_in:,.0f} / {e['drain']['events_per_s']:,.0f} |"
            )
    for x in r.get("steady", {}).get("points", []):
        lines.append(
            f"| steady {x['rate_per_s']:,} events/s (16 connections, forwarding): sidecar CPU "
            f"per event / % of a core | {x['cpu_ms_per_event']:.2f} ms / {x['cpu_pct_of_core']:.1f}% |"
        )
    idle = r["ingest"]["idle"]
    if idle:
        lines.append(
            f"| idle ({idle['seconds']:g} s): CPU % of a core / RSS MiB | {idle['cpu_pct_of_core']:.2f} / {idle['rss_mib']:.0f} |"
        )
    lines += ["", "| target | measured | holds |", "| --- | ---: | :---: |"]
    for name, value, ok in r["verdicts"]:
        lines.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n"


def chart(r: dict[str, Any], path: Path) -> None:
    # Imported here: the scripts that borrow this one's helpers (floor_compare.py,
    # calls.py, their tests in CI) do not need the bench extra's matplotlib.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for target, label in (
        ("bare", "bare aiohttp"),
        ("minimal", "minimal group commit"),
        ("full", "sidecar full"),
        ("full-2", "sidecar full, 2 ingest workers"),
        ("normal", "sidecar normal"),
    ):
        xs = [x for x in r["ingest"]["rows"] if x["target"] == target]
        conns = [x["connections"] for x in xs]
        ax1.plot(conns, [x["events_per_s"] for x in xs], marker="o", label=label)
        ax2.plot(conns, [x["p99_ms"] for x in xs], marker="o", label=label)
    for ax, title in ((ax1, "ingest events/s"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("connections")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def from_source(src: Path | None) -> tuple[str, ...]:
    """What a target's command starts with to import the package from ``src`` (none: the
    installed one)."""
    return () if src is None else ("env", f"PYTHONPATH={src}")


def add_also(ap: argparse.ArgumentParser) -> None:
    """``--also SRC``, repeatable: old against new in one run."""
    ap.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        metavar="SRC",
        help="also a sidecar whose package is imported from SRC (a directory holding "
        "valmi_sidecar, e.g. a copy of src/ before a change): old against new",
    )


def check_also(sources: Iterable[Path]) -> None:
    for src in sources:
        if not (src / "valmi_sidecar").is_dir():
            raise SystemExit(f"--also {src}: no valmi_sidecar package there (give a copy of src/)")


def shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when inside it (the
    machine's own directories stay out of committed results)."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return path.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs and a 100k backlog")
    parser.add_argument("--seconds", type=float, default=5.0, help="each ingest measurement")
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=3, help="ingest rounds, interleaved")
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=list(TARGETS),
        help="ingest targets (bare is always run: every share is of it)",
    )
    parser.add_argument(
        "--paced-shares",
        type=float,
        nargs="+",
        default=[0.125, 0.25, 0.375, 0.5, 0.75],
        help="paced ingest rates, as shares of bare's events/s at 64 connections",
    )
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--forward-events", type=int, default=20_000)
    parser.add_argument("--drain-timeout-s", type=float, default=180.0)
    parser.add_argument("--limited-s", type=float, default=75.0)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--backlog-drain-s", type=float, default=10.0)
    parser.add_argument("--peer-events", type=int, default=5_000)
    parser.add_argument(
        "--steps",
        nargs="+",
        default=["ingest", "paced", "steady", "peer", "forwarding", "backlog"],
    )
    parser.add_argument("--steady-rates", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--dir", type=Path, default=HERE, help="where the temporary data goes")
    args = parser.parse_args()
    if "bare" not in args.targets:
        args.targets.insert(0, "bare")
    if args.quick:
        args.seconds, args.idle_s, args.limited_s, args.rounds = 3.0, 5.0, 20.0, 2
        args.forward_events, args.backlog, args.backlog_drain_s = 5_000, 100_000, 5.0
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["benchmarks/run.py", *sys.argv[1:]]),
        "machine": machine(),
        "args": {k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        script = work / "post.lua"
        script.write_text(_WRK_LUA.format(body=BODY.decode()))
        with fake_api() as fake:
            print("ingest", flush=True)
            result["ingest"] = ingest(args, work, fake, script)
            bare64 = [
                x
                for x in result["ingest"]["rows"]
                if (x["target"], x["connections"]) == ("bare", 64)
            ]
            if "paced" in args.steps and bare64 and shutil.which("wrk"):
                print("paced", flush=True)
                result["paced"] = paced(args, work, fake, bare64[0]["events_per_s"])
        if "steady" in args.steps and shutil.which("wrk"):
            print("steady", flush=True)
            result["steady"] = steady(args, work, fake)
        if "peer" in args.steps:
            print("peer queue", flush=True)
            result["peer"] = tool("peer", "-n", str(args.peer_events), "--dir", str(work))
        if "forwarding" in args.steps:
            print("forwarding", flush=True)
            result["forwarding"] = forwarding(args, work)
        if "backlog" in args.steps:
            print("backlog", flush=True)
            result["backlog"] = backlog(args, work, script)
    result["verdicts"] = verdicts(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "bench.md").write_text(md)
    chart(result, args.out / "bench.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
