"""Microbenchmarks of the ingest glue and of a delivery's classification: this tree against
a base revision, side by side in one process (issue 19, items 3 and 6).

    .venv/bin/python benchmarks/micro.py --base main          # about three minutes
    .venv/bin/python benchmarks/micro.py --base main --rounds 3   # a quick look

``events.py``, ``guard.py``, ``upstream.py`` and ``receiver.py`` of ``--base`` are read
from git and loaded as a second copy of those modules (``valmi_sidecar._base_*``, wired to
each other), so the two versions run the same code paths in the same process. Every
sample of one version is taken right beside the same sample of the other, in alternating
order, ``--rounds`` times; medians with the range, and the median of the paired
differences (what the change saves).

- ``parse_one``: ``timeit`` of ``events.parse_one`` on the 275-byte action of
  ``tools.py``, without and with an ``Idempotency-Key``.
- ``ingest request``: the receiver's application (``ingest_app`` and its routes; events
  go to a submitter that accepts at once, so that only the glue differs) on a real server
  on 127.0.0.1, port 0, one per version; ``--connections`` raw keep-alive connections each
  send pipelined batches of ``POST /v1/actions``. CPU of this process per request (server
  and client: the client's share is the same for both versions).
- ``classify 2xx``: ``timeit`` of ``upstream.classify`` for a 200 as ``Upstream.send``
  gets it (case-insensitive headers from a real response), without and with
  ``X-RateLimit-*`` headers.
- ``send 2xx``: ``Upstream.send`` of one version against a real aiohttp server on
  127.0.0.1 answering 200, 8 sends at a time; CPU of this process per send.

Prints one table; only the differences within one run mean much on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from valmi_sidecar import events, receiver, upstream
from valmi_sidecar.config import Secret, Settings
from valmi_sidecar.store import Accepted, QueuedEvent

#: The realistic 275-byte action of ``tools.py`` (not imported: it needs the bench extras).
BODY: bytes = (
    b'{"agent_key":"agent-support-7f3c9a2b","action_type":"llm_call",'
    b'"metadata":{"model":"gpt-4o-mini","provider":"openai","input_tokens":1234,'
    b'"output_tokens":567,"latency_ms":842,"workflow":"support-triage",'
    b'"step":"classify-intent","customer_id":"cus_8H2kLm9QxT","region":"eu-west-1"}}'
)
ROOT = Path(__file__).resolve().parent.parent
#: The modules loaded from the base revision, in import order, and the imports of each
#: other that are pointed at the base copies.
BASE_MODULES = ("events", "guard", "upstream", "receiver")
REWRITES = {
    "from . import events, openapi\n": "from . import _base_events as events\nfrom . import openapi\n",
    "from .events import": "from ._base_events import",
    "from .guard import": "from ._base_guard import",
}


def load_base(rev: str) -> dict[str, ModuleType]:
    """``events``, ``guard``, ``upstream`` and ``receiver`` as they are at ``rev``."""
    loaded: dict[str, ModuleType] = {}
    for name in BASE_MODULES:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:src/valmi_sidecar/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for old, new in REWRITES.items():
            source = source.replace(old, new)
        full = f"valmi_sidecar._base_{name}"
        spec = importlib.util.spec_from_loader(full, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "valmi_sidecar"
        sys.modules[full] = module
        exec(compile(source, f"{rev}:src/valmi_sidecar/{name}.py", "exec"), module.__dict__)
        loaded[name] = module
    return loaded


def per_call_us(fn: Callable[[], object], number: int) -> float:
    """The fastest of 5 timeit repeats, in µs per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


class Accepting:
    """A submitter that accepts every event at once: the store is not what is measured."""

    async def submit(self, new: Sequence[Any]) -> list[Accepted]:
        return [Accepted(e.id, e.created_at, duplicate=False) for e in new]


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def ingest_app(mod: ModuleType) -> web.Application:
    settings = Settings()
    app: web.Application = mod.ingest_app(settings, mod.Lifecycle(ready=True))
    mod.add_ingest_routes(app)
    app[mod.INGEST] = Accepting()
    return app


def request_bytes(port: int, *, key: str | None) -> bytes:
    lines = [
        "POST /v1/actions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(BODY)}",
        "User-Agent: python-httpx/0.28.1",
        "Accept: */*",
    ]
    if key is not None:
        lines.append(f"Idempotency-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + BODY


async def pipelined(port: int, total: int, connections: int, batch: int) -> None:
    """``total`` requests over ``connections`` connections, ``batch`` in flight on each;
    raises unless every answer is a 202."""
    one = request_bytes(port, key=None)

    async def connection(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while n > 0:
                k = min(batch, n)
                writer.write(one * k)
                got = b""
                while got.count(b"HTTP/1.1 ") < k or not got.endswith(b"}"):
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionError("the server closed the connection")
                    got += chunk
                if got.count(b"HTTP/1.1 202 ") != k:
                    raise RuntimeError(f"not every answer is a 202: {got[:300]!r}")
                n -= k
        finally:
            writer.close()
            await writer.wait_closed()

    share = total // connections
    await asyncio.gather(*(connection(share) for _ in range(connections)))


async def ingest_round(port: int, total: int, connections: int) -> float:
    await pipelined(port, min(total, 500), connections, 25)  # warm up
    started = time.process_time()
    await pipelined(port, total, connections, 25)
    return (time.process_time() - started) / total * 1e6


def delivered_app() -> web.Application:
    async def processed(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "action_1", "status": "processed"})

    app = web.Application()
    app.router.add_post("/v1/actions", processed)
    return app


async def send_round(mod: ModuleType, url: str, total: int) -> float:
    client = mod.Upstream(url, Secret("sk_test_bench"), timeout_s=10.0, max_connections=8)
    event = QueuedEvent(
        seq=1, id="evt_1", idem_key="evt_1", kind="action", body=BODY, received_at=0.0, attempts=0
    )
    try:

        async def sender(n: int) -> None:
            for _ in range(n):
                answer = await client.send(event)
                if answer.verdict != "delivered":
                    raise RuntimeError(f"not delivered: {answer}")

        await asyncio.gather(*(sender(50) for _ in range(8)))  # warm up, connections open
        started = time.process_time()
        await asyncio.gather(*(sender(total // 8) for _ in range(8)))
        return (time.process_time() - started) / total * 1e6
    finally:
        await client.aclose()


Row = tuple[str, list[float], list[float]]
Measure = Callable[[str], Awaitable[float]]


async def measure(base: dict[str, ModuleType], args: argparse.Namespace) -> list[Row]:
    versions = {"base": base, "new": {"events": events, "receiver": receiver, "upstream": upstream}}
    rows: dict[str, tuple[list[float], list[float]]] = {}

    def record(name: str, version: str, value: float) -> None:
        pair = rows.setdefault(name, ([], []))
        pair[0 if version == "base" else 1].append(value)

    runners: list[web.AppRunner] = []
    ports: dict[str, int] = {}
    try:
        for version, mods in versions.items():
            runner, ports[version] = await serve(ingest_app(mods["receiver"]))
            runners.append(runner)
        runner, api_port = await serve(delivered_app())
        runners.append(runner)
        api_url = f"http://127.0.0.1:{api_port}"
        plain = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
        limited = CIMultiDictProxy(
            CIMultiDict(
                {
                    "Content-Type": "application/json",
                    "X-RateLimit-Limit": "10000",
                    "X-RateLimit-Remaining": "9876",
                    "X-RateLimit-Reset": str(int(time.time()) + 30),
                }
            )
        )
        names = list(versions)

        def timed(fn: Callable[[dict[str, ModuleType]], object]) -> Measure:
            async def measure_one(version: str) -> float:
                mods = versions[version]
                return per_call_us(lambda: fn(mods), args.number)

            return measure_one

        measures: dict[str, Measure] = {
            "parse_one, no key": timed(lambda m: m["events"].parse_one("action", BODY)),
            "parse_one, with a key": timed(
                lambda m: m["events"].parse_one("action", BODY, idem_key="client-1")
            ),
            "classify 2xx, no rate-limit headers": timed(
                lambda m: m["upstream"].classify(200, plain, "")
            ),
            "classify 2xx, rate-limit headers": timed(
                lambda m: m["upstream"].classify(200, limited, "")
            ),
            "ingest request (CPU per request)": lambda version: ingest_round(
                ports[version], args.requests, args.connections
            ),
            "send 2xx (CPU per send)": lambda version: send_round(
                versions[version]["upstream"], api_url, args.sends
            ),
        }
        # Each sample of one version is taken right beside the same sample of the other,
        # in alternating order, so that the machine's drift falls on both alike. Round 0
        # warms both up and is not recorded.
        for i in range(args.rounds + 1):
            order = names if i % 2 else names[::-1]
            for name, measure_one in measures.items():
                for version in order:
                    value = await measure_one(version)
                    if i > 0:
                        record(name, version, value)
            print(f"round {i}/{args.rounds} done", file=sys.stderr)
    finally:
        for runner in runners:
            await runner.cleanup()
    return [(name, b, n) for name, (b, n) in rows.items()]


def table(rows: list[Row], rounds: int) -> str:
    out = [
        f"| µs, median of {rounds} samples (range) | base | new | saved: median of pairs |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, base, new in rows:
        b, n = statistics.median(base), statistics.median(new)
        saved = statistics.median(x - y for x, y in zip(base, new, strict=True))
        out.append(
            f"| {name} | {b:.2f} ({min(base):.2f}-{max(base):.2f}) "
            f"| {n:.2f} ({min(new):.2f}-{max(new):.2f}) | {saved:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=10_000, help="timeit calls per repeat")
    parser.add_argument("--requests", type=int, default=4_000, help="ingest requests per sample")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--sends", type=int, default=1_000, help="upstream sends per sample")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    base = load_base(args.base)
    rows = asyncio.run(measure(base, args))
    print(f"base {args.base}, {args.rounds} rounds, each sample of base beside one of new")
    print(table(rows, args.rounds))


if __name__ == "__main__":
    main()
