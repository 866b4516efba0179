"""The store writer's CPU for the usual group at a low rate: one new event and the
delivery of the one before, against the floor's for the same group.

    .venv/bin/python benchmarks/writer_cost.py [--groups 2000] [--rounds 3] [--dir PATH]

- ``store``: ``Store.submit_soon`` of one event with ``Store.settle_soon`` of the previous
  one's delivery, both in one loop iteration, so one transaction (``durability="full"``),
  as the flusher records most deliveries. The writer thread's CPU (its
  ``/proc/self/task/<tid>/schedstat`` nanoseconds) and the event loop's
  (``time.thread_time``) per group.
- ``floor``: ``benchmarks/floor.py``'s own writer, driven the same way: the event handed
  to its thread with a future, the previous one's delivery recorded, both in the same
  commit. Its writer thread's CPU and the event loop's per group.
- ``floor SQL``: what that writer runs for it, on its own table, in this thread: one
  ``INSERT``, one ``DELETE`` and the ``COMMIT`` (``synchronous=FULL``), without a thread
  or a loop to answer.

The loop is the service's (uvloop when installed, ``runtime.loop_factory``): a hop
between threads costs each side a wake-up, and on a VM that is much of a small group's
CPU. Every group checks a fresh body (``parse_one``), the same on both sides. All write a
real file under ``--dir`` (default: a temporary directory beside this script, so not a
tmpfs ``/tmp``). The rounds alternate the order; medians with the range.
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
from typing import Any

import structlog

from valmi_sidecar import runtime
from valmi_sidecar.events import parse_one
from valmi_sidecar.store import Delivered, Store

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import floor  # noqa: E402 - beside this script
from tools import BODY  # noqa: E402 - beside this script


def _thread_ns(native_id: int) -> int:
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0])


def _writer_thread() -> int:
    for t in threading.enumerate():
        if t.name == "store-writer" and t.native_id is not None:
            return t.native_id
    raise SystemExit("no thread named store-writer: has the store changed its threads?")


def _run(main: Any) -> tuple[float, float]:
    result: tuple[float, float] = runtime.run(main)
    return result


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
            settled = store.settle_soon([Delivered(seq)])
            await store.submit_soon([parse_one("action", BODY)])
            await settled
            seq += 1
        w1, l1 = _thread_ns(writer), time.thread_time_ns()
        if store.commits - commits != groups:
            raise SystemExit(f"{store.commits - commits} commits for {groups} groups")
        return (w1 - w0) / groups / 1000, (l1 - l0) / groups / 1000
    finally:
        await store.close()


async def floor_writer_groups(data_dir: Path, groups: int) -> tuple[float, float]:
    """The floor's writer thread and event loop µs per group."""
    loop = asyncio.get_running_loop()

    def committed(
        group: list[tuple[floor.Event, asyncio.Future[None]]], error: BaseException | None
    ) -> None:
        for _, future in group:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    writer = await asyncio.to_thread(floor.Writer, data_dir / "floor.db", loop, committed)
    thread = threading.Thread(target=writer.run, name="floor-writer")
    thread.start()
    try:
        previous: floor.Event | None = None

        async def group() -> floor.Event:
            checked = parse_one("action", BODY)
            event = floor.Event(checked.kind, checked.idem_key, checked.body)
            future = loop.create_future()
            writer.submit(event, future)
            if previous is not None:
                writer.delivered(previous.seq)  # rides on this commit, as in the floor
            await future
            return event

        previous = await group()
        native_id = thread.native_id
        assert native_id is not None
        w0, l0 = _thread_ns(native_id), time.thread_time_ns()
        for _ in range(groups):
            previous = await group()
        return (_thread_ns(native_id) - w0) / groups / 1000, (
            time.thread_time_ns() - l0
        ) / groups / 1000
    finally:
        writer.stop()
        await asyncio.to_thread(thread.join)


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
    figures: dict[str, list[float]] = {
        name: [] for name in ("store, writer thread", "store, event loop")
    }
    figures |= {name: [] for name in ("floor, writer thread", "floor, event loop", "floor SQL")}
    order = ["store", "floor", "floor SQL"]
    for _ in range(args.rounds):
        for which in order:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                if which == "floor SQL":
                    figures[which].append(floor_groups(Path(tmp), args.groups))
                    continue
                run = store_groups if which == "store" else floor_writer_groups
                w, lp = _run(run(Path(tmp), args.groups))
                figures[f"{which}, writer thread"].append(w)
                figures[f"{which}, event loop"].append(lp)
        order.reverse()
    print(
        f"CPU µs per group (one new event, one delivery), {args.rounds} rounds, pid {os.getpid()}"
    )
    for name, values in figures.items():
        print(f"  {name + ':':22s}{_median(values)}")


if __name__ == "__main__":
    main()
