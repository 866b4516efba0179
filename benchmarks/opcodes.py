"""Python bytecode instructions per delivered event, the sidecar against the lean floor,
by thread and by where the code lives: which of the sidecar's own functions execute the
most, where ``calls.py`` counts calls only and ``instructions.py`` (callgrind) cannot
see Python functions at all. A count, which this shared machine's noise does not move.

    .venv/bin/python benchmarks/opcodes.py                      # 100 events/s for 5 s
    cp -r src /tmp/before   # ...change the code, then, old against new:
    .venv/bin/python benchmarks/opcodes.py --also /tmp/before

Each target (``benchmarks/floor.py``, then ``valmi-sidecar run`` with ``durability=full``)
runs under ``benchmarks/traced.py`` and forwards to the fake API. After a warm-up whose
deliveries are waited for, counting is switched on (SIGUSR1), events are posted at
``--rate`` for ``--seconds`` (an httpx client on one keep-alive connection), and once the
fake API holds every one of them and its count has held still, switched off (SIGUSR2).
Tracing makes every instruction many times slower, so the events group differently
than at full speed (a commit for each event at any rate, and deliveries riding in
larger batches): a count per event compares code, not rates.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from calls import origin, signalled_window  # noqa: E402 - beside this script
from floor_compare import SETTLE_S, target_process  # noqa: E402
from run import PY, add_also, check_also, fake_api, from_source  # noqa: E402 - beside this script

ORIGINS = ("own code", "aiohttp", "asyncio", "other")
THREADS = ("loop", "others")


def count(rows: Sequence[Mapping[str, Any]], events: int) -> dict[str, Any]:
    """Instructions per event by thread and origin (builtins run no bytecode: their
    callers' count), and the own code's functions by thread."""
    by: dict[str, dict[str, float]] = {t: dict.fromkeys(ORIGINS, 0.0) for t in THREADS}
    own: dict[str, collections.Counter[str]] = {t: collections.Counter() for t in THREADS}
    for row in rows:
        thread = "loop" if row["main"] else "others"
        where = origin(row["file"])
        where = "other" if where == "builtins" else where
        by[thread][where] += row["opcodes"] / events
        if where == "own code":
            name = f"{Path(row['file']).name}:{row['line']}:{row['name']}"
            own[thread][name] += row["opcodes"] / events
    return {"by": by, "own": {t: dict(c) for t, c in own.items()}}


def measure(
    target: str,
    work: Path,
    fake: str,
    args: argparse.Namespace,
    *,
    src: Path | None = None,
    label: str = "",
) -> dict[str, Any]:
    """One target's counts in the window (``src``: another source tree's sidecar, kept
    apart by ``label``)."""
    label = label or target
    out = work / f"{label}.json"
    os.environ["BENCH_OPCODES_OUT"] = str(out)
    python = (*from_source(src), PY, str(HERE / "traced.py"))
    with target_process(
        target, work / label, fake, forwarding=True, concurrency=16, python=python
    ) as (url, pid):
        events = signalled_window(url, pid, fake, args, out, label)
    return count(json.loads(out.read_text()), events)


def markdown(results: Mapping[str, Mapping[str, Any]], top: int) -> str:
    cells = [f"{t}: {o}" for t in THREADS for o in ORIGINS]
    lines = [
        "| bytecode instructions per delivered event | all | " + " | ".join(cells) + " |",
        "| --- | ---: |" + " ---: |" * len(cells),
    ]
    for name, result in results.items():
        by = result["by"]
        values = [by[t][o] for t in THREADS for o in ORIGINS]
        row = " | ".join(f"{v:,.0f}" for v in values)
        lines.append(f"| {name} | {sum(values):,.0f} | {row} |")
    if top:
        for label, result in results.items():
            if label == "floor":
                continue
            for thread in THREADS:
                own = result["own"][thread]
                lines += [
                    "",
                    f"{label}, {thread}: its own functions that execute most (top {top}):",
                ]
                lines.append("")
                for fn, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
                    lines.append(f"- {n:,.1f} `{fn}`")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=100.0, help="events a second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--settle-s", type=float, default=SETTLE_S)
    ap.add_argument("--top", type=int, default=15, help="own functions listed, per thread")
    add_also(ap)
    args = ap.parse_args()
    check_also(args.also)
    with tempfile.TemporaryDirectory() as tmp, fake_api() as fake:
        results = {t: measure(t, Path(tmp), fake, args) for t in ("floor", "sidecar")}
        for i, src in enumerate(args.also):
            results[f"sidecar from {src}"] = measure(
                "sidecar", Path(tmp), fake, args, src=src.resolve(), label=f"also-{i}"
            )
    print(f"{args.rate:g} events/s for {args.seconds:g} s, forwarding to the fake API:\n")
    print(markdown(results, args.top))


if __name__ == "__main__":
    main()
