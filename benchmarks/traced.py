"""Run a Python program with its bytecode counted, switched on by SIGUSR1 and off by
SIGUSR2, for ``opcodes.py``: a window of a running server, without its start-up.

    python benchmarks/traced.py -m valmi_sidecar run
    python benchmarks/traced.py benchmarks/floor.py --listen 127.0.0.1:0 ...

Every thread is traced from its start (``sys.settrace`` and ``threading.settrace``), but
counts only while switched on: each bytecode instruction executed, and each entry into
a function (a call, or a coroutine or generator resumed), by code object, apart for the
main thread (the event loop's) and the others. At SIGUSR2 the counts are written to
``$BENCH_OPCODES_OUT`` as JSON (to a temporary name, then renamed). Tracing makes the
program many times slower: the counts are the figures, not its times.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
from types import CodeType, FrameType
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profiled import run_program

_MAIN = threading.get_ident()
#: Per thread kind (the main thread or not): instructions and entries, by code object.
_counts: dict[bool, collections.Counter[CodeType]] = {
    True: collections.Counter(),
    False: collections.Counter(),
}
_entries: dict[bool, collections.Counter[CodeType]] = {
    True: collections.Counter(),
    False: collections.Counter(),
}
_on = False

Tracer = Any  # what sys.settrace takes: a function of (frame, event, arg)


def _local(main: bool) -> Tracer:
    counts = _counts[main]

    def trace(frame: FrameType, event: str, arg: object) -> Tracer:
        if event == "opcode":
            counts[frame.f_code] += 1
        return trace

    return trace


_LOCAL = {True: _local(True), False: _local(False)}


def _trace(frame: FrameType, event: str, arg: object) -> Tracer:
    if not _on:
        return None
    main = threading.get_ident() == _MAIN
    frame.f_trace_opcodes = True
    _entries[main][frame.f_code] += 1
    return _LOCAL[main]


def _start(signum: int, frame: FrameType | None) -> None:
    global _on  # noqa: PLW0603 - the switch the tracer reads
    _on = True


def _stop(signum: int, frame: FrameType | None) -> None:
    global _on  # noqa: PLW0603
    _on = False
    rows = [
        {
            "main": main,
            "file": code.co_filename,
            "line": code.co_firstlineno,
            "name": code.co_qualname,
            "opcodes": n,
            "entries": _entries[main][code],
        }
        for main in (True, False)
        for code, n in list(_counts[main].items())
    ]
    out = os.environ["BENCH_OPCODES_OUT"]
    with open(out + ".part", "w", encoding="utf-8") as f:
        json.dump(rows, f)
    os.replace(out + ".part", out)


def main() -> None:
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    sys.settrace(_trace)
    threading.settrace(_trace)
    run_program(sys.argv[1:])


if __name__ == "__main__":
    main()
