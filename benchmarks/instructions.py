"""User-space instructions per delivered event, the sidecar against the lean floor, counted
by valgrind's callgrind: a count that a shared machine's neighbours do not move (two runs
of the same code read within a few percent), where CPU times move by a tenth and more.

    .venv/bin/python benchmarks/instructions.py                  # 10 events/s for 20 s
    .venv/bin/python benchmarks/instructions.py --rate 5 --seconds 30
    cp -r src /tmp/before   # ...change the code, then, old against new:
    .venv/bin/python benchmarks/instructions.py --also /tmp/before
    .venv/bin/python benchmarks/instructions.py --closed 20      # a closed loop, 20 s

Needs valgrind (``apt-get install valgrind``); not in CI. Each target
(``benchmarks/floor.py``, then ``valmi-sidecar run`` with ``durability=full``) runs under
``valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no`` and forwards to the
fake API. Callgrind runs the process on its own CPU emulation, tens of times slower, so the
rate is low (``--rate``, 10 by default): every event is received, committed and sent alone,
its delivery recorded in the next event's commit, one commit an event, as at 10 and 100
events/s natively. The last column says so (``fdatasync`` calls per event): at 5 events/s
the gap between events is longer than either target waits for a delivery to ride, and
both commit twice an event. After a warm-up whose deliveries are
waited for, counting is switched on (``callgrind_control -i on``), events are posted at
``--rate`` for ``--seconds`` (an httpx client on one keep-alive connection), and once the
fake API holds every one of them and its count has held still, the counts are dumped
(``callgrind_control -d``): one file per thread.

``--closed SECONDS`` counts a closed loop instead, ingest only, as ``make floor``'s last
point: both targets start without an API key (neither forwards), wrk keeps 64
connections busy for that long (about 300 requests a second under callgrind, so the
writer commits groups of 20 to 40 events, as natively), and the counts are per
acknowledged request. There the sidecar writes large groups through its one-call path,
and what its writer's thread does with the GIL held is what the event loop waits for.

Per delivered event: the instructions executed by the event loop's thread (the main
thread) and by the other threads (SQLite's), and all of them by shared object (the
interpreter, SQLite, libc, the rest). What the kernel does for the process (its system
calls, the disk's writes) is not counted here: see ``kernel_counts.py``. Instructions are
not time (a cold cache makes each dearer at a low rate), but what the sidecar executes
beyond the floor is counted exactly.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from calls import TARGETS, post_paced  # noqa: E402 - beside this script
from floor_compare import (  # noqa: E402 - beside this script
    CLOSED_CONNECTIONS,
    SETTLE_S,
    acknowledged,
    target_process,
    wait_delivered,
)
from run import _WRK_LUA, PY, add_also, check_also, fake_api, from_source, wrk  # noqa: E402 - beside this script
from tools import BODY  # noqa: E402 - beside this script

#: How long the fake API may wait for a window's deliveries: under callgrind a process runs
#: tens of times slower than natively.
DELIVERY_TIMEOUT_S = 300.0
#: The shared objects named in the table; the rest are summed as one.
OBJECTS = {"libpython": "the interpreter", "libsqlite3": "SQLite", "libc.": "libc"}


@dataclass
class ThreadCost:
    """One thread's instructions (``Ir``) in a callgrind dump: its total and its own
    cost by shared object (a callee's cost counted where it is spent, not at its caller)."""

    thread: int
    total: int = 0
    by_object: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Calls to ``fdatasync`` and ``fsync``: the commits that reached the disk.
    syncs: int = 0


_NAMED = re.compile(r"\((\d+)\)(?: (.*))?")
_SYNCS = frozenset({"fdatasync", "fsync"})


def parse_dump(lines: Iterable[str], names: dict[str, str] | None = None) -> ThreadCost:
    """Read one callgrind output file (format version 1, with ``--separate-threads=yes``
    one thread's): its ``thread:`` and ``totals:`` lines, and the self cost of each cost
    line under the ``ob=`` (object) it belongs to. The line after ``calls=`` is the call's
    inclusive cost, charged to the callee's own lines: it is skipped. Names may be
    compressed: ``ob=(3) /lib/x.so`` (or ``cob=``) defines id 3, a later ``ob=(3)`` refers
    to it, in this file or in a later thread's of the same dump (``names``, shared)."""
    cost = ThreadCost(thread=0)
    names = {} if names is None else names
    obj = "???"
    callee = ""
    after_call = False
    for raw in lines:
        line = raw.rstrip("\n")
        if not line:
            continue
        if after_call:
            after_call = False
            continue
        head = line[0]
        if head.isdigit() or head in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                cost.by_object[obj] += int(parts[1])
            continue
        key, _, value = line.partition("=")
        if key == "ob":
            obj = _name("ob", value, names)
        elif key == "cob":
            _name("ob", value, names)  # a callee's object: named here, charged at its own lines
        elif key in ("fn", "cfn"):
            name = _name("fn", value, names)
            if key == "cfn":
                callee = name
        elif key == "calls":
            after_call = True
            if callee in _SYNCS:
                cost.syncs += int(value.split()[0])
        elif line.startswith("thread:"):
            cost.thread = int(line.split(":", 1)[1])
        elif line.startswith("totals:"):
            cost.total = int(line.split(":", 1)[1].split()[0])
    return cost


def _name(kind: str, value: str, names: dict[str, str]) -> str:
    """The name ``value`` gives or refers to; objects and functions number apart."""
    m = _NAMED.fullmatch(value)
    if m is None:
        return value
    ref, name = m.groups()
    if name is not None:
        names[kind + ref] = name
    return names.get(kind + ref, value)


def object_group(path: str) -> str:
    """The row of the table that a shared object's instructions go to."""
    base = path.rsplit("/", 1)[-1]
    for prefix, label in OBJECTS.items():
        if base.startswith(prefix):
            return label
    return "the rest"


def read_dumps(paths: Iterable[Path]) -> dict[str, int]:
    """Instructions of one process's threads, from their dump files: ``loop`` (thread 1,
    the main thread), ``others``, ``all``, and ``all`` by ``object_group``; and ``syncs``,
    its calls to ``fdatasync`` and ``fsync``."""
    out: collections.Counter[str] = collections.Counter()
    names: dict[str, str] = {}
    # In thread order: a name is spelled out once, in the first file that needs it.
    for path in sorted(paths, key=lambda p: int(p.name.rsplit("-", 1)[1])):
        with path.open() as f:
            t = parse_dump(f, names)
        out["loop" if t.thread == 1 else "others"] += t.total
        out["all"] += t.total
        out["syncs"] += t.syncs
        for obj, n in t.by_object.items():
            out[object_group(obj)] += n
    return dict(out)


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def command(out: Path, src: Path | None = None) -> tuple[str, ...]:
    """The interpreter's command under callgrind, its dumps named ``out.<pid>...``; with
    ``src``, the package imported from there (``PYTHONPATH``). ``env`` goes first: valgrind
    does not follow an ``exec``, so it must start the interpreter itself."""
    valgrind = ("valgrind", "--tool=callgrind", "--separate-threads=yes", "--instr-atstart=no")
    return (*from_source(src), *valgrind, f"--callgrind-out-file={out}.%p", PY)


def measure(
    target: str,
    work: Path,
    fake: str,
    args: argparse.Namespace,
    *,
    src: Path | None = None,
    label: str = "",
) -> dict[str, int]:
    """One target's instructions in the window (``src``, ``label``: another source tree's
    sidecar, and the name of its files under ``work``)."""
    label = label or target
    out = work / f"{label}.callgrind"
    closed = args.closed is not None
    with target_process(
        target, work / label, fake, forwarding=not closed, concurrency=16, python=command(out, src)
    ) as (url, pid):
        if closed:
            script = work / "closed.lua"
            script.write_text(_WRK_LUA.format(body=BODY.decode()))  # floor_compare's closed loop
            wrk(url, CLOSED_CONNECTIONS, args.warmup_s, script)
            _control("-i", "on", str(pid))
            events = acknowledged(wrk(url, CLOSED_CONNECTIONS, args.closed, script))
        else:
            warm = post_paced(url, args.rate, args.warmup_s)
            wait_delivered(fake, warm, args.settle_s, DELIVERY_TIMEOUT_S)
            httpx.post(fake + "/_fake/reset", timeout=30.0)
            _control("-i", "on", str(pid))
            acked = post_paced(url, args.rate, args.seconds)
            events = wait_delivered(fake, acked, args.settle_s, DELIVERY_TIMEOUT_S)
        _control("-d", str(pid))  # part 1: the window, one file per thread
        _control("-i", "off", str(pid))
        dumps = sorted(work.glob(f"{out.name}.{pid}.1-*"))
    if not dumps:
        raise SystemExit(f"{target}: callgrind wrote no dump of the window under {work}")
    return {"events": events, **read_dumps(dumps)}


def markdown(results: Mapping[str, Mapping[str, int]], per: str = "delivered event") -> str:
    groups = [*OBJECTS.values(), "the rest"]
    lines = [
        f"| instructions per {per} | all | event loop's thread | other threads | "
        + " | ".join(groups)
        + " | syncs (commits) |",
        "| --- |" + " ---: |" * (4 + len(groups)),
    ]
    keys = ("all", "loop", "others", *groups)
    for name, r in results.items():
        n = r["events"]
        cells = [r.get(k, 0) / n for k in keys]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{c:,.0f}" for c in cells)
            + f" | {r.get('syncs', 0) / n:.2f} |"
        )

    def ratio(num: str, den: str) -> str:
        a, b = results[num], results[den]
        q = [a.get(k, 0) / a["events"] / max(b.get(k, 0) / b["events"], 1e-9) for k in keys]
        return f"| {num} / {den} | " + " | ".join(f"{x:.2f}" for x in q) + " |"

    for name in results:
        if name != "floor":
            lines.append(ratio(name, "floor"))
    lines += [ratio(name, "sidecar") for name in results if name not in TARGETS]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=10.0, help="events a second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup-s", type=float, default=5.0)
    # Longer than natively (``floor_compare.SETTLE_S``): callgrind slows the last commit.
    ap.add_argument("--settle-s", type=float, default=SETTLE_S + 0.7)
    ap.add_argument(
        "--closed",
        type=float,
        metavar="SECONDS",
        help="count a closed loop of 64 connections for SECONDS instead, ingest only "
        "(needs wrk): per acknowledged request",
    )
    ap.add_argument("--dir", type=Path, default=HERE, help="where the data directories go")
    add_also(ap)
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind and callgrind_control (apt-get install valgrind)")
    if args.closed is not None and shutil.which("wrk") is None:
        raise SystemExit("--closed needs wrk (apt-get install wrk)")
    check_also(args.also)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, fake_api() as fake:
        results = {t: measure(t, Path(tmp), fake, args) for t in TARGETS}
        for i, src in enumerate(args.also):
            results[f"sidecar from {src}"] = measure(
                "sidecar", Path(tmp), fake, args, src=src.resolve(), label=f"also-{i}"
            )
    if args.closed is not None:
        print(
            f"A closed loop of {CLOSED_CONNECTIONS} connections for {args.closed:g} s, ingest"
            " only, under callgrind:\n"
        )
        print(markdown(results, "acknowledged request"))
        return
    print(f"{args.rate:g} events/s for {args.seconds:g} s (one client), under callgrind:\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
