"""What the kernel does per delivered event, the sidecar against the lean floor: bytes
handed to the disk, write calls and context switches, counted by the kernel itself
(``/proc/<pid>/task/<tid>/io`` and ``status``). Counts, like ``calls.py``'s, stay put on a
shared machine where CPU times move by a tenth between runs, and they need no tracer.

    .venv/bin/python benchmarks/kernel_counts.py                    # 10 events/s for 20 s
    .venv/bin/python benchmarks/kernel_counts.py --rate 100 --seconds 10
    .venv/bin/python benchmarks/kernel_counts.py --rate 1000 --seconds 10 --connections 16

Each target (``benchmarks/floor.py``, then ``valmi-sidecar run`` with ``durability=full``)
forwards to the fake API. After a warm-up whose deliveries are waited for, the counters
of every thread are read, events are posted at ``--rate`` for ``--seconds`` (an httpx
client on one keep-alive connection), and once the fake API holds every one of them and
its count has held still, read again. With ``--connections`` above 1 the load is wrk's,
paced as in ``floor_compare.py`` (that many keep-alive connections, so events share
commits as they do there). Per delivered event:

- ``disk bytes``: what the process handed to the storage layer (``write_bytes``: the WAL's
  frames, and the database's pages at a checkpoint), by all its threads;
- ``writes``: write calls (``syscw``: ``write``, ``pwrite64``, ``writev``; two for each WAL
  frame, and the sockets' and the loop's wake-ups), on the event loop's thread and on the
  others together;
- ``switches``: context switches, voluntary (the thread waited: for the disk, a lock, the
  GIL, the next request) and involuntary (it was preempted), on each side.

The data directories go under ``--dir`` (default: beside this script, so on the disk the
benchmarks use, not a memory file system where nothing is handed to a disk).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from calls import TARGETS, post_paced  # noqa: E402 - beside this script
from floor_compare import (  # noqa: E402 - beside this script
    SETTLE_S,
    acknowledged,
    target_process,
    wait_delivered,
)
from run import _PACED_LUA, fake_api, wrk  # noqa: E402 - beside this script
from tools import BODY  # noqa: E402 - beside this script

#: The figures of one thread: ``/proc/.../io`` fields and ``status`` fields.
_IO_FIELDS = ("syscw", "write_bytes")
_STATUS_FIELDS = ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")


@dataclass(frozen=True)
class Counts:
    """One thread's counters, or their sum."""

    writes: int = 0
    disk_bytes: int = 0
    voluntary: int = 0
    involuntary: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.writes + other.writes,
            self.disk_bytes + other.disk_bytes,
            self.voluntary + other.voluntary,
            self.involuntary + other.involuntary,
        )

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.writes - other.writes,
            self.disk_bytes - other.disk_bytes,
            self.voluntary - other.voluntary,
            self.involuntary - other.involuntary,
        )


def parse_fields(text: str, names: tuple[str, ...]) -> dict[str, int]:
    """``name: value`` lines of a ``/proc`` file, those named."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in names:
            found[name.strip()] = int(value.split()[0])
    missing = set(names) - set(found)
    if missing:
        raise SystemExit(f"no {', '.join(sorted(missing))} in a /proc file: {text[:200]!r}")
    return found


def thread_counts(task: Path) -> Counts:
    io = parse_fields((task / "io").read_text(), _IO_FIELDS)
    status = parse_fields((task / "status").read_text(), _STATUS_FIELDS)
    return Counts(
        io["syscw"],
        io["write_bytes"],
        status["voluntary_ctxt_switches"],
        status["nonvoluntary_ctxt_switches"],
    )


def sample(pid: int) -> dict[int, Counts]:
    """Every thread's counters, by thread id (a thread that ended meanwhile is left out)."""
    out: dict[int, Counts] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = thread_counts(task)
        except OSError:
            continue
    return out


def spent(pid: int, before: Mapping[int, Counts], after: Mapping[int, Counts]) -> dict[str, Counts]:
    """What the event loop's thread (the process's first) and the others did in between.
    A thread that started in between counts from zero."""
    loop = after[pid] - before.get(pid, Counts())
    others = Counts()
    for tid, counts in after.items():
        if tid != pid:
            others += counts - before.get(tid, Counts())
    return {"loop": loop, "others": others}


def load(url: str, args: argparse.Namespace, seconds: float) -> int:
    """Events posted at ``args.rate`` for ``seconds``: how many were acknowledged."""
    if args.connections == 1:
        return post_paced(url, args.rate, seconds)
    script = args.dir / f"paced-{args.rate:g}.lua"
    script.write_text(_PACED_LUA.format(body=BODY.decode(), rate=args.rate))
    try:
        return acknowledged(wrk(url, args.connections, seconds, script))
    finally:
        script.unlink()


def measure(target: str, work: Path, fake: str, args: argparse.Namespace) -> dict[str, object]:
    with target_process(target, work / target, fake, forwarding=True, concurrency=16) as (
        url,
        pid,
    ):
        warm = load(url, args, 1.0)
        wait_delivered(fake, warm, args.settle_s, 60.0)
        httpx.post(fake + "/_fake/reset", timeout=30.0)
        before = sample(pid)
        acked = load(url, args, args.seconds)
        events = wait_delivered(fake, acked, args.settle_s, 60.0)
        after = sample(pid)
    return {"events": events, **spent(pid, before, after)}


def markdown(results: Mapping[str, Mapping[str, object]]) -> str:
    lines = [
        "| per delivered event | disk bytes | writes, loop / others"
        " | voluntary switches, loop / others | involuntary switches, loop / others |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for target in TARGETS:
        r = results[target]
        n = r["events"]
        loop, others = r["loop"], r["others"]
        assert isinstance(n, int)
        assert isinstance(loop, Counts)
        assert isinstance(others, Counts)
        disk = (loop.disk_bytes + others.disk_bytes) / n
        lines.append(
            f"| {target} | {disk:,.0f} | {loop.writes / n:.2f} / {others.writes / n:.2f}"
            f" | {loop.voluntary / n:.2f} / {others.voluntary / n:.2f}"
            f" | {loop.involuntary / n:.2f} / {others.involuntary / n:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=10.0, help="events a second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle-s", type=float, default=SETTLE_S)
    ap.add_argument(
        "--connections",
        type=int,
        default=1,
        help="1: one httpx client; more: wrk's paced load with that many connections",
    )
    ap.add_argument("--dir", type=Path, default=HERE, help="where the data directories go")
    args = ap.parse_args()
    if args.connections > 1 and shutil.which("wrk") is None:
        raise SystemExit("--connections above 1 needs wrk (apt-get install wrk)")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, fake_api() as fake:
        results = {t: measure(t, Path(tmp), fake, args) for t in TARGETS}
    clients = "one client" if args.connections == 1 else f"wrk, {args.connections} connections"
    print(
        f"{args.rate:g} events/s for {args.seconds:g} s ({clients}), forwarding to the fake API:\n"
    )
    print(markdown(results))


if __name__ == "__main__":
    main()
