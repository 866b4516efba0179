"""Shared fixtures: a real fake Valmi API on loopback, real sidecars, waiting with deadlines.

Module-specific fixtures live in their own test files.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import structlog

from valmi_sidecar.config import Secret, Settings

if TYPE_CHECKING:
    from aiohttp import web

    from valmi_sidecar.fake_api import FakeValmi
    from valmi_sidecar.service import Sidecar

#: The fake API's default key (valmi_sidecar.fake_api.DEFAULT_KEY).
DEFAULT_KEY = "sk_test_fake"
#: The benchmarks' scripts: not a package, so their helpers are loaded by path to be tested.
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_bench(name: str) -> ModuleType:
    """A module of ``benchmarks/``, loaded once under the name ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ACTION: dict[str, Any] = {
    "agent_key": "agent_abc123xyz",
    "action_type": "llm_call",
    "metadata": {"model": "gpt-4", "input_tokens": 1000, "output_tokens": 500},
}
OUTCOME: dict[str, Any] = {
    "agent_key": "agent_abc123xyz",
    "outcome_type": "successful_hire",
    "value": 1,
    "metadata": {"candidate_id": "cand_123"},
}


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll ``predicate`` until it is true; fail the test when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def occupied_port() -> Iterator[int]:
    """A loopback port another socket listens on, for as long as the block runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(app: web.Application, settings: Settings) -> AsyncIterator[str]:
    """``app`` served by the sidecar's own runner (``receiver.make_runner``) on a loopback
    port of its own, for as long as the block runs: its URL."""
    from aiohttp import web  # noqa: PLC0415 - as the fixtures below, imported when used

    from valmi_sidecar.receiver import make_runner  # noqa: PLC0415
    from valmi_sidecar.workers import listen_sockets  # noqa: PLC0415

    runner = make_runner(app, settings)
    await runner.setup()
    (listener,) = listen_sockets("127.0.0.1", 0)
    try:
        await web.SockSite(runner, listener).start()
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        await runner.cleanup()
        listener.close()


@pytest.fixture
def reset_logging() -> Iterator[None]:
    """Undo configure_logging so that other tests see structlog's defaults."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
async def fake() -> AsyncIterator[FakeValmi]:
    """A fake Valmi API, a real server on 127.0.0.1 with a free port."""
    from valmi_sidecar.fake_api import FakeValmi  # noqa: PLC0415

    api = FakeValmi()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


def fast_settings(data_dir: Path, api_url: str | None, **overrides: Any) -> Settings:
    """Settings for tests: loopback port 0, quick backoff, short drains."""
    base = Settings(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        api_url=api_url or "http://127.0.0.1:9",
        api_key=Secret(DEFAULT_KEY) if api_url else None,
        rate_limit_per_min=600_000,
        backoff_base_s=0.01,
        backoff_cap_s=0.2,
        upstream_timeout_s=2.0,
        final_flush_s=2.0,
        shutdown_grace_s=2.0,
    )
    return dataclasses.replace(base, **overrides)


SidecarFactory = Callable[..., Awaitable[tuple["Sidecar", str]]]


@pytest.fixture
async def sidecar_factory(tmp_path: Path) -> AsyncIterator[SidecarFactory]:
    """Start real sidecars in this event loop; each is stopped (drained) at the end."""
    from valmi_sidecar.service import Sidecar  # noqa: PLC0415

    started: list[Sidecar] = []

    async def start(api_url: str | None = None, **overrides: Any) -> tuple[Sidecar, str]:
        data_dir = overrides.pop("data_dir", tmp_path / "data")
        sidecar = Sidecar(fast_settings(data_dir, api_url, **overrides))
        await sidecar.start()
        started.append(sidecar)
        assert sidecar.address is not None
        host, port = sidecar.address
        return sidecar, f"http://{host}:{port}"

    try:
        yield start
    finally:
        for sidecar in reversed(started):
            await sidecar.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as c:
        yield c


# --- the sidecar as a real subprocess ------------------------------------------------


def json_log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a file, skipping any other output."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class SidecarProcess:
    """``valmi-sidecar run`` as a child process, with its JSON log lines on stderr.
    ``prefix`` runs it through another command (``setpriv …`` to change its user)."""

    def __init__(
        self,
        data_dir: Path,
        api_url: str | None,
        env: dict[str, str],
        prefix: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"sidecar-{time.monotonic_ns()}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
        full_env.update(
            {
                "VALMI_SIDECAR_DATA_DIR": str(data_dir),
                "VALMI_SIDECAR_LISTEN": "127.0.0.1:0",
                "VALMI_SIDECAR_LOG_FORMAT": "json",
                "VALMI_SIDECAR_RATE_LIMIT_PER_MIN": "600000",
                "VALMI_SIDECAR_BACKOFF_BASE_S": "0.01",
                "VALMI_SIDECAR_BACKOFF_CAP_S": "0.2",
                "VALMI_SIDECAR_UPSTREAM_TIMEOUT_S": "2",
                "VALMI_SIDECAR_FINAL_FLUSH_S": "3",
            }
        )
        if api_url is not None:
            full_env["VALMI_API_URL"] = api_url
            full_env["VALMI_API_KEY"] = DEFAULT_KEY
        full_env.update(env)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "valmi_sidecar", "run"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        self.url = ""

    def log_events(self) -> list[dict[str, Any]]:
        return json_log_lines(self.log_path)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 20.0) -> str:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"sidecar exited with {self.proc.returncode}:\n{self.log_text()}")
            for ev in self.log_events():
                if ev.get("event") == "sidecar_ready":
                    self.url = "http://" + ev["listen"]
                    return True
            return False

        await wait_until(ready, timeout, "sidecar_ready")
        return self.url

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout, "sidecar exit")
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


SidecarProcessFactory = Callable[..., SidecarProcess]


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[SidecarProcessFactory]:
    """Start ``valmi-sidecar run`` subprocesses; any still running are killed at the end."""
    procs: list[SidecarProcess] = []

    def start(
        api_url: str | None = None,
        data_dir: Path | None = None,
        prefix: Sequence[str] = (),
        **env: str,
    ) -> SidecarProcess:
        p = SidecarProcess(data_dir or tmp_path / "data", api_url, env, prefix)
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            p.kill()
