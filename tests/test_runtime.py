"""The event loop and signal set-up shared by every process: real signals, real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

from valmi_sidecar import runtime

SERVE_UNTIL_SIGNALLED = textwrap.dedent(
    """
    import asyncio, sys
    from valmi_sidecar import runtime

    async def serve() -> None:
        print(type(asyncio.get_running_loop()).__module__, flush=True)
        await asyncio.sleep(3600)

    code = runtime.run_until_signalled(serve)
    print("exited", code, flush=True)
    """
)


async def test_a_signal_handler_runs_on_the_loop_and_is_removed_after_the_block() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    got = asyncio.Event()
    with runtime.signal_handlers({signal.SIGUSR1: got.set}) as installed:
        assert [signal.SIGUSR1] == installed
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(got.wait(), 5)
    assert before == signal.getsignal(signal.SIGUSR1)


async def test_cancel_on_signal_lets_a_sigterm_end_the_coroutine_cleanly() -> None:
    started = asyncio.Event()

    async def serve() -> None:
        started.set()
        await asyncio.sleep(3600)

    waiting = asyncio.create_task(runtime.cancel_on_signal(serve))
    await asyncio.wait_for(started.wait(), 5)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(waiting, 5)  # returns: the signal is the clean way out
    assert waiting.done()
    assert not waiting.cancelled()


async def test_a_process_run_until_signalled_exits_0_on_sigterm_on_uvloop() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVE_UNTIL_SIGNALLED,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        loop_module = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        expected = "asyncio.unix_events" if runtime.loop_factory() is None else "uvloop"
        assert expected == loop_module
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert 0 == proc.returncode, err.decode()
        assert "exited 0" == out.decode().strip()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
