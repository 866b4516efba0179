"""The event loop and the process's signals: chosen and installed in one place.

Every process of the sidecar (``run``, an ingest worker, ``fake-api``) runs one coroutine
on uvloop where it is installed (Linux) and on asyncio's own loop elsewhere, and reacts to
signals only by calling a callback on the loop (which sets an event or cancels a task):
never in a C signal handler, never with work of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

#: The signals that stop a process (a drain, for the sidecar and its workers).
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (an optional dependency, Linux only), else
    ``None``: asyncio's default."""
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional (Linux only)

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to its end on a new loop from ``loop_factory()``; its result."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


@contextlib.contextmanager
def signal_handlers(
    handlers: Mapping[signal.Signals, Callable[[], object]],
) -> Iterator[list[signal.Signals]]:
    """Call ``handlers[sig]()`` on the running loop when ``sig`` arrives, inside the
    block; the previous dispositions are back after it. Yields the signals installed: a
    platform without loop signal handlers installs none (a KeyboardInterrupt then)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        for sig, handler in handlers.items():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
        yield installed
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def cancel_on_signal(make: Callable[[], Coroutine[Any, Any, object]]) -> None:
    """Await ``make()``, cancelling it on SIGINT or SIGTERM: then return normally (the
    signal is the clean way out). Any other exception propagates."""
    task = asyncio.ensure_future(make())
    with signal_handlers(dict.fromkeys(STOP_SIGNALS, task.cancel)):
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # we were cancelled, not the task by a signal


def run_until_signalled(make: Callable[[], Coroutine[Any, Any, object]]) -> int:
    """Run ``make()`` until it ends or SIGINT/SIGTERM cancels it; 0 on either. Any other
    exception propagates."""
    with contextlib.suppress(KeyboardInterrupt):  # a platform without loop signal handlers
        run(cancel_on_signal(make))
    return 0


__all__ = [
    "STOP_SIGNALS",
    "cancel_on_signal",
    "loop_factory",
    "run",
    "run_until_signalled",
    "signal_handlers",
]
