"""What one new event's commit costs in SQL, part by part, on the store's own schema: the
event row alone (what the floor writes), then with its key row (what the sidecar writes:
de-duplication needs it), its ledger row, or both (what the sidecar wrote before schema
version 5, which counts a queued event's receipt in the ledger table only once it is
settled).

    .venv/bin/python benchmarks/commit_parts.py [--commits 3000] [--rounds 3] [--dir PATH]

Each round makes a fresh database with ``Store.open`` (so the real schema, WAL,
``auto_vacuum``), closes it, and runs the store's own statements (``store.sql``: the
one-row ``INSERT_KEY``, ``INSERT_EVENT`` and ``UPSERT_LEDGER``) with ``synchronous=FULL``,
one commit per event, on one thread with nothing else running. It prints this thread's
CPU per commit (``time.thread_time_ns``, validation of the body included, the same for
every variant; SQLite's automatic checkpoints included, at the store's interval), then
the WAL frames each of ``FRAME_COMMITS`` more commits appends (checkpoints off). The variants alternate within a
round; medians with the range over rounds.

Not the whole story under load: there the same statements cost about twice as much
(docs/PERFORMANCE.md, "What the key row and the ledger cost").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import operator
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import structlog

from valmi_sidecar.events import parse_one
from valmi_sidecar.store import Store
from valmi_sidecar.store.records import utc_day
from valmi_sidecar.store.schema import WAL_AUTOCHECKPOINT_PAGES
from valmi_sidecar.store.sql import (
    EVENT_FIELDS,
    EVENT_ROW_VALUES,
    INSERT_EVENT,
    INSERT_KEY,
    KEY_ROW_VALUES,
    UPSERT_LEDGER,
    with_rows,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from floor_stats import Spread  # noqa: E402 - beside this script
from tools import BODY  # noqa: E402 - beside this script

VARIANTS = ("event row", "+ key row (the store)", "+ ledger row", "+ both (before v5)")
_INSERT_KEY = with_rows(INSERT_KEY, KEY_ROW_VALUES, 1)
_INSERT_EVENT = with_rows(INSERT_EVENT, EVENT_ROW_VALUES, 1)
_event_values = operator.attrgetter(*EVENT_FIELDS)
#: The WAL file's header, and each frame's before its page.
_WAL_HEADER = 32
_FRAME_HEADER = 24
WARM_UP = 200
#: Commits whose WAL frames are counted, after the timed ones.
FRAME_COMMITS = 100


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level="DEFERRED")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    return db


def run(data_dir: Path, variant: str, commits: int) -> tuple[float, float]:
    """CPU µs per commit and WAL frames per commit."""

    async def make() -> None:
        await (await Store.open(data_dir, prune_interval_s=None)).close()

    asyncio.run(make())
    key = variant in ("+ key row (the store)", "+ both (before v5)")
    ledger = variant in ("+ ledger row", "+ both (before v5)")
    path = data_dir / "queue.db"
    db = _connect(path)
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    wal = Path(f"{path}-wal")
    try:

        def commit(seq: int) -> None:
            e = parse_one("action", BODY)
            if key:
                db.execute(
                    _INSERT_KEY, (e.idem_key, e.id, e.fingerprint, e.created_at, e.received_at)
                )
            db.execute(_INSERT_EVENT, (seq, len(e.body), *_event_values(e)))
            if ledger:
                day = utc_day(e.received_at)
                db.execute(
                    UPSERT_LEDGER, (e.agent_key, e.kind, e.event_type, day, 1, 0, 0, 0, 0, 0)
                )
            db.commit()

        for seq in range(1, WARM_UP + 1):
            commit(seq)
        t0 = time.thread_time_ns()
        seq = WARM_UP + 1
        for seq in range(WARM_UP + 1, WARM_UP + commits + 1):
            commit(seq)
        cpu_us = (time.thread_time_ns() - t0) / commits / 1000
        # The frames, apart: a WAL emptied first and not checkpointed meanwhile only grows.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        db.execute("PRAGMA wal_autocheckpoint = 0")
        for n in range(1, FRAME_COMMITS + 1):
            commit(seq + n)
        frames = (wal.stat().st_size - _WAL_HEADER) / (page_size + _FRAME_HEADER) / FRAME_COMMITS
    finally:
        db.close()
    return cpu_us, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--commits", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=HERE)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    frames: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for n in range(args.rounds):
        for variant in VARIANTS if n % 2 == 0 else VARIANTS[::-1]:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                c, f = run(Path(tmp), variant, args.commits)
            cpu[variant].append(c)
            frames[variant].append(f)
    print(f"One new event a commit, synchronous=FULL, {args.rounds} rounds of {args.commits}")
    print("| SQL of the commit | CPU µs a commit | WAL frames a commit |")
    print("| --- | ---: | ---: |")
    for v in VARIANTS:
        print(f"| {v} | {Spread.of(cpu[v]).show(1)} | {statistics.median(frames[v]):.1f} |")


if __name__ == "__main__":
    main()
