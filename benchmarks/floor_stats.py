"""What ``benchmarks/floor_compare.py`` reads and computes: a process's CPU time, and the
medians, ranges, ratios and table of its runs. No load, no servers: tested in
``tests/test_bench_floor.py``.

CPU time of one process (the target only: its load generator and the fake API run in
processes of their own). Three readings are taken before and after each window:

- ``process_ns``, the figure reported: the process's CPU-time clock, what
  ``clock_getcpuclockid(3)`` gives for another process, read with ``clock_gettime``. It is
  the scheduler's run time (nanoseconds) of the whole thread group, threads that ended
  included, in one read.
- ``threads_ns``, a cross-check: the first field of ``/proc/<pid>/task/*/schedstat`` (the
  same nanoseconds, per thread), summed. A thread that ends takes its figure with it (an
  executor thread that exits inside the window would be missed), and
  ``/proc/<pid>/schedstat`` is the main thread's alone; so this equals ``process_ns``
  only while no thread ended, which the JSON lets one check.
- ``ticks``, a second cross-check: ``utime + stime`` of ``/proc/<pid>/stat``, the whole
  thread group, ended threads included, but in clock ticks (10 ms): too coarse at 10
  events/s, where a window holds a few hundred milliseconds of CPU.

And one split: ``main_ns``, the main thread's own ``schedstat`` figure. The floor and the
sidecar run their event loop there and their SQLite work on other threads, so it tells
which side of the process the CPU went to.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: ``CPUCLOCK_SCHED``: the clock that counts the scheduler's run time, in nanoseconds.
_CPUCLOCK_SCHED: Final = 2
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def process_clock_id(pid: int) -> int:
    """The CPU-time clock of process ``pid`` (Linux's encoding, as glibc's
    ``clock_getcpuclockid`` builds it: the complemented pid shifted left by 3, then the
    clock type)."""
    return (~pid << 3) | _CPUCLOCK_SCHED


@dataclass(frozen=True)
class CpuSample:
    """One process's CPU time at one moment, three ways (see the module's docstring)."""

    process_ns: int
    threads_ns: int
    ticks: int
    threads: int
    #: The main thread's alone (the event loop's, in every target here).
    main_ns: int = 0


def cpu_sample(pid: int) -> CpuSample:
    threads_ns = main_ns = 0
    threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns = int((task / "schedstat").read_text().split()[0])
        except OSError:
            continue  # ended meanwhile
        threads_ns += ns
        if task.name == str(pid):
            main_ns = ns
        threads += 1
    # After the threads: a process that runs meanwhile then still reads no less on its
    # own clock than on its threads' (the cross-check's invariant), not the other way.
    process_ns = time.clock_gettime_ns(process_clock_id(pid))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return CpuSample(process_ns, threads_ns, ticks, threads, main_ns)


def cpu_spent(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Seconds of CPU between two samples, by each reading."""
    return {
        "cpu_s": (after.process_ns - before.process_ns) / 1e9,
        "cpu_threads_s": (after.threads_ns - before.threads_ns) / 1e9,
        "cpu_ticks_s": (after.ticks - before.ticks) / CLK_TCK,
        "cpu_main_s": (after.main_ns - before.main_ns) / 1e9,
        "threads_before": before.threads,
        "threads_after": after.threads,
    }


# -- over rounds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """The median of some rounds' figures, and their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        xs = list(values)
        if not xs:
            raise ValueError("a spread needs at least one figure")
        return cls(statistics.median(xs), min(xs), max(xs))

    def show(self, digits: int = 0) -> str:
        """``1,058`` for one round (or equal ones), else ``1,058 (1,002-1,100)``."""
        one = f"{{:,.{digits}f}}"
        text = one.format(self.median)
        if one.format(self.low) != one.format(self.high):
            text += f" ({one.format(self.low)}-{one.format(self.high)})"
        return text

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "low": self.low, "high": self.high}


#: A run's CPU per event of its main thread alone (the event loop's).
LOOP: Final = "loop_us_per_event"
TARGETS: Final = ("floor", "sidecar", "bare")
#: The floor measured a second time in each round, a process of its own: what a ratio
#: reads when nothing differs but the moment and the process (an A/A control).
CONTROL: Final = "floor-again"
CLOSED: Final = "closed"
#: The issue's bound on the sidecar's CPU per event, as a multiple of the floor's.
CPU_BOUND: Final = 1.2
NAMES: Final[Mapping[str, str]] = {
    "floor": "the lean floor (`benchmarks/floor.py`)",
    "sidecar": "the sidecar, `durability=full`, forwarding",
    "bare": "bare aiohttp, receive only",
    CONTROL: "the lean floor again, a second process",
}


def _by(runs: Sequence[Mapping[str, Any]], target: str, point: str) -> list[Mapping[str, Any]]:
    """The runs of one target at one load point, in round order."""
    return sorted(
        (r for r in runs if r["target"] == target and r["point"] == point),
        key=lambda r: int(r["round"]),
    )


def _paired(
    runs: Sequence[Mapping[str, Any]], point: str, num: str, den: str, key: str
) -> Spread | None:
    """The spread of per-round ratios ``num / den`` of ``key``: each round's figure
    against the other target's run of the same round (the machine drifts)."""
    a = {r["round"]: r[key] for r in _by(runs, num, point)}
    b = {r["round"]: r[key] for r in _by(runs, den, point)}
    ratios = [a[n] / b[n] for n in a if b.get(n)]
    return Spread.of(ratios) if ratios else None


#: The sidecar from another source tree (``floor_compare.py --also``): ``also-1``, ...
ALSO_PREFIX: Final = "also-"


def also_target(n: int) -> str:
    """The name of the ``n``-th (from 1) ``--also`` sidecar's runs."""
    return f"{ALSO_PREFIX}{n}"


def summarize(
    runs: Sequence[Mapping[str, Any]], points: Sequence[str], also: Sequence[str] = ()
) -> dict[str, Any]:
    """Medians and ranges per (target, point), and the ratios the issue's targets name;
    for each of the ``also`` targets, its CPU and p99 against the sidecar's, per round."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for target in (*TARGETS, CONTROL, *also):
        for point in points:
            xs = _by(runs, target, point)
            if not xs:
                continue
            cell = {
                key: Spread.of(float(x[key]) for x in xs).as_dict()
                for key in ("us_per_event", "events_per_s", "p50_ms", "p99_ms", LOOP)
                if all(key in x for x in xs)  # LOOP: not in runs saved before it was read
            }
            cells.setdefault(target, {})[point] = cell
    paced = [p for p in points if p != CLOSED]
    top = max(paced, key=int) if paced else None
    ratios: dict[str, Any] = {"cpu_sidecar_over_floor": {}}
    for point in points:
        spread = _paired(runs, point, "sidecar", "floor", "us_per_event")
        if spread is not None:
            ratios["cpu_sidecar_over_floor"][point] = spread.as_dict()
        control = _paired(runs, point, CONTROL, "floor", "us_per_event")
        if control is not None:
            ratios.setdefault("cpu_floor_again_over_floor", {})[point] = control.as_dict()
    rate = _paired(runs, CLOSED, "sidecar", "bare", "events_per_s")
    if rate is not None:
        ratios["events_per_s_sidecar_over_bare"] = rate.as_dict()
    # The same for the floor: what the host lets a durable ingest reach at that hour.
    floor_rate = _paired(runs, CLOSED, "floor", "bare", "events_per_s")
    if floor_rate is not None:
        ratios["events_per_s_floor_over_bare"] = floor_rate.as_dict()
    rate_again = _paired(runs, CLOSED, CONTROL, "floor", "events_per_s")
    if rate_again is not None:
        ratios["events_per_s_floor_again_over_floor"] = rate_again.as_dict()
    if top is not None:
        p99 = _paired(runs, top, "sidecar", "floor", "p99_ms")
        if p99 is not None:
            ratios["p99_sidecar_over_floor"] = p99.as_dict()
        p99_again = _paired(runs, top, CONTROL, "floor", "p99_ms")
        if p99_again is not None:
            ratios["p99_floor_again_over_floor"] = p99_again.as_dict()
    against = _against_sidecar(runs, points, also, top)
    return {"cells": cells, "ratios": ratios, "latency_point": top, "also": against}


def pooled(results: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs of several saved results (``floor.json``) taken together, and the load
    points they hold in the table's order. Each result's rounds are numbered apart from
    the others', so that a ratio still pairs the runs of one round of one result. The
    ``--also`` trees are left out: ``also-1`` of one run need not be the tree of
    another's."""
    runs: list[dict[str, Any]] = []
    offset = 0
    for result in results:
        own = [r for r in result["runs"] if not str(r["target"]).startswith(ALSO_PREFIX)]
        runs += [{**r, "round": offset + int(r["round"])} for r in own]
        offset += max((int(r["round"]) for r in own), default=-1) + 1
    found = {str(r["point"]) for r in runs}
    paced = sorted((p for p in found if p != CLOSED), key=int)
    return runs, paced + ([CLOSED] if CLOSED in found else [])


def _against_sidecar(
    runs: Sequence[Mapping[str, Any]], points: Sequence[str], also: Sequence[str], top: str | None
) -> dict[str, dict[str, Any]]:
    """Each ``also`` target against the sidecar of the same round: CPU per event at
    every point, and the p99 at the highest paced rate."""
    out: dict[str, dict[str, Any]] = {}
    for target in also:
        cpu = {}
        for point in points:
            spread = _paired(runs, point, target, "sidecar", "us_per_event")
            if spread is not None:
                cpu[point] = spread.as_dict()
        found: dict[str, Any] = {"cpu": cpu}
        p99 = None if top is None else _paired(runs, top, target, "sidecar", "p99_ms")
        if p99 is not None:
            found["p99"] = p99.as_dict()
        out[target] = found
    return out


def _spread(d: Mapping[str, float]) -> Spread:
    return Spread(d["median"], d["low"], d["high"])


def verdicts(summary: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's targets, as (target, measured, holds)."""
    out: list[tuple[str, str, bool]] = []
    ratios = summary["ratios"]
    for point, d in ratios["cpu_sidecar_over_floor"].items():
        where = "closed loop, ingest only" if point == CLOSED else f"{int(point):,} ev/s"
        spread = _spread(d)
        out.append(
            (
                f"CPU per event ≤ 1.2 x the floor's ({where})",
                spread.show(2),
                spread.median <= CPU_BOUND,
            )
        )
    if "events_per_s_sidecar_over_bare" in ratios:
        spread = _spread(ratios["events_per_s_sidecar_over_bare"])
        out.append(
            (
                "durable ingest, closed loop ≥ 75% of bare aiohttp's events/s",
                spread.show(2),
                spread.median >= 0.75,
            )
        )
    if "p99_sidecar_over_floor" in ratios:
        spread = _spread(ratios["p99_sidecar_over_floor"])
        point = int(summary["latency_point"])
        out.append(
            (f"p99 at {point:,} ev/s paced ≤ 2 x the floor's", spread.show(2), spread.median <= 2)
        )
    return out


def markdown(summary: Mapping[str, Any], points: Sequence[str], header: str) -> str:
    """The issue's table: CPU per delivered event per target and load point, medians
    with the range over rounds; then latency, throughput and the targets."""
    cells = summary["cells"]
    titles = [
        "ingest only, 64 connections closed loop" if p == CLOSED else f"{int(p):,} ev/s"
        for p in points
    ]
    lines = [
        header,
        "",
        "| per delivered event (target process only) | " + " | ".join(titles) + " |",
        "| --- |" + " ---: |" * len(points),
    ]

    def row(target: str) -> str:
        out = []
        for point in points:
            cell = cells.get(target, {}).get(point)
            if cell is None:
                out.append("")
                continue
            text = f"{_spread(cell['us_per_event']).show()} µs"
            if point == CLOSED:
                text += f", {_spread(cell['events_per_s']).show()} ev/s"
            out.append(text)
        return f"| {NAMES[target]} | " + " | ".join(out) + " |"

    def ratio_row(title: str, by_point: Mapping[str, Any]) -> str:
        cells_ = [_spread(by_point[p]).show(2) if p in by_point else "" for p in points]
        return f"| {title} | " + " | ".join(cells_) + " |"

    lines += [
        row("floor"),
        row("sidecar"),
        ratio_row("ratio sidecar / floor", summary["ratios"]["cpu_sidecar_over_floor"]),
    ]
    again = summary["ratios"].get("cpu_floor_again_over_floor", {})
    if again:
        lines.append(
            ratio_row("ratio floor again / floor (nothing differs: the run's noise)", again)
        )
    loop_row = _loop_row(cells, points)
    if loop_row is not None:
        lines.append(loop_row)
    lines.append(row("bare"))
    top = summary["latency_point"]
    if top is not None:
        lat = []
        for target in TARGETS:
            cell = cells.get(target, {}).get(top)
            if cell is not None:
                p50, p99 = _spread(cell["p50_ms"]), _spread(cell["p99_ms"])
                lat.append(f"{target} {p50.show(1)}/{p99.show(1)} ms")
        lines += ["", f"p50/p99 at {int(top):,} ev/s paced: " + ", ".join(lat) + "."]
    if "events_per_s_sidecar_over_bare" in summary["ratios"]:
        share = _spread(summary["ratios"]["events_per_s_sidecar_over_bare"])
        text = f"Closed loop, sidecar events/s ÷ bare aiohttp's: {share.show(2)}"
        if "events_per_s_floor_over_bare" in summary["ratios"]:
            floor_share = _spread(summary["ratios"]["events_per_s_floor_over_bare"])
            text += f"; the floor's: {floor_share.show(2)}"
        lines += ["", text + "."]
    lines += ["", "| target | measured | holds |", "| --- | ---: | :---: |"]
    noise = _cpu_noise(summary)
    others = _other_noise(summary)
    # The CPU ratios' rows come first in ``verdicts``, in the order of their points, then
    # the closed loop's share of bare aiohttp's events/s and the p99, when measured.
    rows = list(summary["ratios"]["cpu_sidecar_over_floor"])
    rows += [key for key in _OTHER_TARGETS if key in summary["ratios"]]
    for (name, value, ok), row_key in zip(verdicts(summary), rows, strict=True):
        held = "yes" if ok else "**no**"
        found = noise.get(row_key) or others.get(row_key)
        if found is not None and not found[1]:
            held += ", within the noise"
        lines.append(f"| {name} | {value} | {held} |")
    lines += _also_lines(summary, points)
    if noise or others:
        parts = [f"{_where(p)} {text}" for p, (text, _) in noise.items()]
        parts += [f"{_OTHER_TARGETS[key][1]} {text}" for key, (text, _) in others.items()]
        lines += [
            "",
            "The floor against itself (a second floor process each round, measured as the "
            "first): "
            + "; ".join(parts)
            + ". A ratio is within the noise when it lies nearer its bound than the floor's "
            "farthest round from itself.",
        ]
    return "\n".join(lines) + "\n"


def _also_lines(summary: Mapping[str, Any], points: Sequence[str]) -> list[str]:
    """The ``--also`` sidecars beside the sidecar measured: a row each of CPU per event,
    then its ratio to the sidecar's, and the p99 of each at the highest paced rate."""
    also: Mapping[str, Any] = summary.get("also", {})
    if not also:
        return []
    cells, top = summary["cells"], summary["latency_point"]
    titles = [_where(p) for p in points]
    lines = [
        "",
        "Old against new: the sidecar from each `--also` source tree, in the same rounds "
        "(a ratio is its round's figure against the sidecar's of that round).",
        "",
        "| CPU µs per delivered event | " + " | ".join(titles) + " |",
        "| --- |" + " ---: |" * len(points),
    ]
    for target in ("sidecar", *also):
        shown = [
            _spread(cells[target][p]["us_per_event"]).show() if p in cells.get(target, {}) else ""
            for p in points
        ]
        source = also.get(target, {}).get("source")
        label = "sidecar (installed)" if source is None else f"{target} (`{source}`)"
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
        if target != "sidecar":
            cpu = also[target]["cpu"]
            ratio = [_spread(cpu[p]).show(2) if p in cpu else "" for p in points]
            lines.append(f"| ratio {target} / sidecar | " + " | ".join(ratio) + " |")
    if top is not None:
        lat = []
        for target in ("sidecar", *also):
            cell = cells.get(target, {}).get(top)
            if cell is not None:
                p50, p99 = _spread(cell["p50_ms"]), _spread(cell["p99_ms"])
                text = f"{target} {p50.show(1)}/{p99.show(1)} ms"
                if "p99" in also.get(target, {}):
                    text += f" (p99 {_spread(also[target]['p99']).show(2)} of the sidecar's)"
                lat.append(text)
        lines += ["", f"p50/p99 at {int(top):,} ev/s paced: " + ", ".join(lat) + "."]
    return lines


#: The targets beside the CPU's, by the ratio ``verdicts`` reads: the ratio of the
#: floor against itself that tells their noise, what the footnote calls that ratio, and
#: the target's bound.
_OTHER_TARGETS: Final[Mapping[str, tuple[str, str, float]]] = {
    "events_per_s_sidecar_over_bare": (
        "events_per_s_floor_again_over_floor",
        "its events/s in the closed loop",
        0.75,
    ),
    "p99_sidecar_over_floor": ("p99_floor_again_over_floor", "its p99", 2.0),
}


def _noise(again: Mapping[str, float], measured: float, bound: float) -> tuple[float, bool]:
    """How far the floor read from itself (the largest per-round ``|again / floor - 1|``),
    and whether ``measured`` lies farther than that from ``bound`` (``|measured / bound -
    1|``): a verdict apart from the noise."""
    noise = max(abs(again["high"] - 1), abs(again["low"] - 1))
    return noise, abs(measured / bound - 1) > noise


def other_noise(summary: Mapping[str, Any], ratio: str) -> tuple[float, bool] | None:
    """``cpu_noise`` for the closed loop's share of bare aiohttp's events/s
    (``events_per_s_sidecar_over_bare``) or the p99 (``p99_sidecar_over_floor``): the
    floor's events/s, or its p99, against its second process of the same round."""
    again_key, _, bound = _OTHER_TARGETS[ratio]
    again = summary["ratios"].get(again_key)
    measured = summary["ratios"].get(ratio)
    if again is None or measured is None:
        return None
    return _noise(again, measured["median"], bound)


def _other_noise(summary: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    out: dict[str, tuple[str, bool]] = {}
    for ratio, (again_key, _, _) in _OTHER_TARGETS.items():
        found = other_noise(summary, ratio)
        if found is not None:
            again = _spread(summary["ratios"][again_key])
            out[ratio] = (f"{again.show(2)} (±{found[0]:.0%})", found[1])
    return out


def _where(point: str) -> str:
    return "closed loop" if point == CLOSED else f"{int(point):,} ev/s"


def cpu_noise(summary: Mapping[str, Any], point: str) -> tuple[float, bool] | None:
    """At ``point``: how far the floor's runs read from each other (the largest per-round
    ``|floor again / floor - 1|``), and whether the sidecar's CPU ratio lies farther than
    that from the 1.2 bound (``|ratio / 1.2 - 1|``), so that its verdict is apart from the
    noise; ``None`` without a control."""
    again = summary["ratios"].get("cpu_floor_again_over_floor", {}).get(point)
    ratio = summary["ratios"]["cpu_sidecar_over_floor"].get(point)
    if again is None or ratio is None:
        return None
    return _noise(again, ratio["median"], CPU_BOUND)


def _cpu_noise(summary: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    out: dict[str, tuple[str, bool]] = {}
    for point in summary["ratios"]["cpu_sidecar_over_floor"]:
        found = cpu_noise(summary, point)
        if found is not None:
            again = _spread(summary["ratios"]["cpu_floor_again_over_floor"][point])
            out[point] = (f"{again.show(2)} (±{found[0]:.0%})", found[1])
    return out


def _loop_row(cells: Mapping[str, Any], points: Sequence[str]) -> str | None:
    """Of each figure above, the event loop's thread alone: floor / sidecar."""
    out = []
    for point in points:
        pair = [cells.get(t, {}).get(point, {}).get(LOOP) for t in ("floor", "sidecar")]
        out.append("" if None in pair else " / ".join(f"{_spread(d).show()} µs" for d in pair if d))
    if not any(out):
        return None
    return "| of which the event loop's thread, floor / sidecar | " + " | ".join(out) + " |"
