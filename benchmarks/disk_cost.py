"""Bytes on disk per queued event, per dead letter and per remembered key.

    .venv/bin/python benchmarks/disk_cost.py                  # 20,000 actions, 1 KB metadata
    .venv/bin/python benchmarks/disk_cost.py --metadata-bytes 0 --events 50000

Each figure comes from its own data directory: ``--events`` actions queued through a
real ``Store``; then left queued, all delivered, or all dead-lettered; then the store is
closed and the database's used pages (file size less free pages, which the sidecar
reuses) are divided by the events, less what an empty database takes. A dead letter's
figure excludes its key row (counted in the key's). A few seconds; one core.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import structlog

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from valmi_sidecar.events import parse_one  # noqa: E402
from valmi_sidecar.store import DB_NAME, DeadLetter, Delivered, Store  # noqa: E402

Fate = Literal["none", "queued", "delivered", "dead"]


def used_bytes(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        page_size, pages, free = (
            int(conn.execute(f"PRAGMA {p}").fetchone()[0])
            for p in ("page_size", "page_count", "freelist_count")
        )
    return (pages - free) * page_size


async def run(fate: Fate, n: int, raw: bytes) -> tuple[int, int]:
    """The used bytes of the database after ``n`` events met ``fate``, and a body's length."""
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        store = await Store.open(data_dir, prune_interval_s=None, max_queue_bytes=64 * 1024**3)
        body_len = 0
        try:
            for start in range(0, n if fate != "none" else 0, 500):
                events = [
                    parse_one("action", raw, now=time.time()) for _ in range(min(500, n - start))
                ]
                body_len = len(events[0].body)
                await store.submit(events)
            while fate in ("delivered", "dead"):
                leased = await store.lease(500, ())
                if not leased:
                    break
                if fate == "delivered":
                    await store.settle([Delivered(e.seq) for e in leased])
                else:
                    await store.settle([DeadLetter(e.seq, "rejected", 400, "no") for e in leased])
        finally:
            await store.close()
        return used_bytes(data_dir / DB_NAME), body_len


async def measure(n: int, metadata_bytes: int) -> dict[str, int]:
    meta = '{"pad": "' + "x" * metadata_bytes + '"}' if metadata_bytes else "{}"
    raw = f'{{"agent_key": "agent_abc123xyz", "action_type": "llm_call", "metadata": {meta}}}'
    empty, _ = await run("none", n, raw.encode())
    queued, body_len = await run("queued", n, raw.encode())
    delivered, _ = await run("delivered", n, raw.encode())
    dead, _ = await run("dead", n, raw.encode())
    return {
        "body_bytes": body_len,
        "queued_event": round((queued - empty) / n),
        "remembered_key": round((delivered - empty) / n),
        "dead_letter": round((dead - delivered) / n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--metadata-bytes", type=int, default=1_000)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = asyncio.run(measure(args.events, args.metadata_bytes))
    for name, value in result.items():
        print(f"{name:>16}: {value}")


if __name__ == "__main__":
    main()
