"""Group-commit throughput of the store: single-event submits from N concurrent submitters.

    .venv/bin/python benchmarks/store_bench.py [--seconds 3] [--dir PATH]

Prints events/s, commits and mean events per commit for 1, 16 and 64 submitters, with
``durability="full"`` (fsync per commit) and ``"normal"``. ``--dir`` picks the file
system to measure (the default is a temporary directory beside this script, so not a
tmpfs ``/tmp``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Literal

import structlog

from valmi_sidecar.events import NewEvent, parse_one
from valmi_sidecar.store import Store

BODY = b'{"agent_key": "agent-7", "action_type": "llm_call", "metadata": {"model": "gpt-4o", "tokens": 1234}}'


async def run(
    base: Path,
    durability: Literal["full", "normal"],
    submitters: int,
    seconds: float,
    pool: list[NewEvent],
) -> tuple[float, int, int]:
    """Submit events from ``pool`` (stamped up front: this measures the store, not
    validation; each run has its own directory, so runs do not see each other's keys)."""
    store = await Store.open(base / f"{durability}-{submitters}", durability=durability)
    try:
        it = iter(pool)
        deadline = time.perf_counter() + seconds
        done = 0

        async def submitter() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await store.submit([next(it, None) or parse_one("action", BODY)])
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(submitters)))
        elapsed = time.perf_counter() - started
        return done / elapsed, done, store.commits
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dir", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    pool = [parse_one("action", BODY) for _ in range(100_000)]
    with tempfile.TemporaryDirectory(prefix="store-bench-", dir=args.dir) as tmp:
        print(
            f"{'durability':<10} {'submitters':>10} {'events/s':>10} {'commits':>8} {'ev/commit':>9}"
        )
        for durability in ("full", "normal"):
            for n in (1, 16, 64):
                rate, events, commits = await run(Path(tmp), durability, n, args.seconds, pool)
                print(
                    f"{durability:<10} {n:>10} {rate:>10,.0f} {commits:>8} "
                    f"{events / max(commits, 1):>9.1f}"
                )


if __name__ == "__main__":
    asyncio.run(main())
