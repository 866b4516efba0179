"""The store writer's CPU for the usual group at a low rate: one new event and the
delivery of the one before, against the floor's SQL for the same group.

    .venv/bin/python benchmarks/writer_cost.py [--groups 2000] [--rounds 3] [--dir PATH]

- ``store``: ``Store.submit`` of one event with ``Store.settle`` of the previous one's
  delivery, both in one loop iteration, so one transaction (``durability="full"``). The
  writer thread's CPU (its ``/proc/self/task/<tid>/schedstat`` nanoseconds) and the event
  loop's (``time.thread_time``) per group.
- ``floor SQL``: what ``benchmarks/floor.py``'s writer runs for it, on its own table: one
  ``INSERT``, one ``DELETE`` and the ``COMMIT`` (``synchronous=FULL``), CPU of this thread.

Both write a real file under ``--dir`` (default: a temporary directory beside this
script, so not a tmpfs ``/tmp``). The rounds alternate the two; medians with the range.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog

from valmi_sidecar.events import parse_one
from valmi_sidecar.store import Delivered, Store

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tools import BODY  # noqa: E402 - beside this script


def _thread_ns(native_id: int) -> int:
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0])


def _writer_thread() -> int:
    for t in threading.enumerate():
        if t.name == "store-writer" and t.native_id is not None:
            return t.native_id
    raise SystemExit("no thread named store-writer: has the store changed its threads?")


async def store_groups(data_dir: Path, groups: int) -> tuple[float, float]:
    """Writer thread and event loop µs per group."""
    store = await Store.open(data_dir, durability="full", prune_interval_s=None)
    try:
        await store.submit([parse_one("action", BODY)])
        (first,) = await store.lease(1, frozenset())
        seq = first.seq
        writer = _writer_thread()
        commits = store.commits
        w0, l0 = _thread_ns(writer), time.thread_time_ns()
        for _ in range(groups):
            settled = asyncio.ensure_future(store.settle([Delivered(seq)]))
            await store.submit([parse_one("action", BODY)])
            await settled
            seq += 1
        w1, l1 = _thread_ns(writer), time.thread_time_ns()
        if store.commits - commits != groups:
            raise SystemExit(f"{store.commits - commits} commits for {groups} groups")
        return (w1 - w0) / groups / 1000, (l1 - l0) / groups / 1000
    finally:
        await store.close()


def floor_groups(data_dir: Path, groups: int) -> float:
    """This thread's µs per group."""
    db = sqlite3.connect(data_dir / "floor.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL,"
            " idem_key TEXT NOT NULL, body BLOB NOT NULL)"
        )
        db.execute("INSERT INTO events VALUES (1, 'action', 'k', ?)", (BODY,))
        t0 = time.thread_time_ns()
        for seq in range(2, groups + 2):
            event = parse_one("action", BODY)
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO events VALUES (?, ?, ?, ?)",
                [(seq, event.kind, event.idem_key, event.body)],
            )
            db.executemany("DELETE FROM events WHERE seq = ?", [(seq - 1,)])
            db.execute("COMMIT")
        return (time.thread_time_ns() - t0) / groups / 1000
    finally:
        db.close()


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=HERE)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    writer: list[float] = []
    loop: list[float] = []
    floor: list[float] = []
    for n in range(args.rounds):
        for which in ("store", "floor") if n % 2 == 0 else ("floor", "store"):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                if which == "store":
                    w, lp = asyncio.run(store_groups(Path(tmp), args.groups))
                    writer.append(w)
                    loop.append(lp)
                else:
                    floor.append(floor_groups(Path(tmp), args.groups))
    print(
        f"CPU µs per group (one new event, one delivery), {args.rounds} rounds, pid {os.getpid()}"
    )
    print(f"  store, writer thread: {_median(writer)}")
    print(f"  store, event loop:    {_median(loop)}")
    print(f"  floor SQL:            {_median(floor)}")


if __name__ == "__main__":
    main()
