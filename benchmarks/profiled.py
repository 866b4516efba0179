"""Run a Python program with ``cProfile`` switched on by SIGUSR1 and off by SIGUSR2, for
``calls.py``: a window of a running server, without its start-up.

    python benchmarks/profiled.py -m valmi_sidecar run
    python benchmarks/profiled.py benchmarks/floor.py --listen 127.0.0.1:0 ...

At SIGUSR2 the profile of the main thread is written to ``$BENCH_PROFILE_OUT`` (written
to a temporary name and renamed, so that a reader never sees half a file).
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys
from types import FrameType

_profile = cProfile.Profile()


def _start(signum: int, frame: FrameType | None) -> None:
    _profile.enable()


def _stop(signum: int, frame: FrameType | None) -> None:
    _profile.disable()
    out = os.environ["BENCH_PROFILE_OUT"]
    _profile.dump_stats(out + ".part")
    os.replace(out + ".part", out)


def main() -> None:
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    run_program(sys.argv[1:])


def run_program(args: list[str]) -> None:
    """Run ``-m MODULE ARGS...`` or ``SCRIPT ARGS...`` as ``python`` would, as ``__main__``."""
    if args[:1] == ["-m"]:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
