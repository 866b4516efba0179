"""The processes ``benchmarks/run.py`` starts, one subcommand each (never run in the tests).

    python benchmarks/tools.py bare --port-file F          # bare aiohttp ingest ceiling
    python benchmarks/tools.py minimal --port-file F --db D  # minimal group-commit prototype
    python benchmarks/tools.py load --url U -c 64 -d 5     # Python load generator (JSON out)
    python benchmarks/tools.py httpx-loop --url U -n 20000 # plain httpx loop to the fake API
    python benchmarks/tools.py aiohttp-loop --url U -n 20000 # the same with aiohttp's client
    python benchmarks/tools.py prefill --data-dir D -n N   # queue N events through the store
    python benchmarks/tools.py peer -n 5000                # store vs persist-queue

Each prints one JSON object on stdout. Everything listens on and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import msgspec
import structlog
import uvloop
from aiohttp import web

from valmi_sidecar.events import parse_one
from valmi_sidecar.store import Delivered, Store

#: A realistic action body of about 275 bytes.
BODY: bytes = (
    b'{"agent_key":"agent-support-7f3c9a2b","action_type":"llm_call",'
    b'"metadata":{"model":"gpt-4o-mini","provider":"openai","input_tokens":1234,'
    b'"output_tokens":567,"latency_ms":842,"workflow":"support-triage",'
    b'"step":"classify-intent","customer_id":"cus_8H2kLm9QxT","region":"eu-west-1"}}'
)
API_KEY = "sk_test_bench"


def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


# -- bare aiohttp app ---------------------------------------------------------------------


_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode
Post = Callable[[web.Request], Awaitable[web.Response]]


def _answer(event_id: str, created_at: str) -> web.Response:
    """A 202 with a body of the shape the sidecar answers."""
    body = {"id": event_id, "status": "queued", "created_at": created_at}
    return web.Response(status=202, body=_encode(body), content_type="application/json")


def _accepted(obj: Any) -> web.Response:
    return _answer(uuid.uuid4().hex, str(obj["agent_key"]))


async def _runner(post: Post) -> web.AppRunner:
    """An app with ``post`` on ``/v1/actions``, set up and ready for a site."""
    app = web.Application()
    app.router.add_post("/v1/actions", post)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


async def _serve(post: Post, port_file: str) -> None:
    """``post`` on ``/v1/actions`` at a free loopback port (written to ``port_file``)."""
    runner = await _runner(post)
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)  # as the sidecar's
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    Path(port_file).write_text(str(port))  # noqa: ASYNC240 - once, at start
    await asyncio.Event().wait()


def bare(args: argparse.Namespace) -> None:
    """Read and parse the same JSON body, answer 202 with a body of the same shape."""

    async def post(request: web.Request) -> web.Response:
        return _accepted(_decode(await request.read()))

    uvloop.run(_serve(post, args.port_file))


def minimal(args: argparse.Namespace) -> None:
    """The issue's "minimal group-commit prototype": the bare app, plus each body appended
    to one SQLite table (WAL, ``synchronous=FULL``) by a writer thread that commits every
    body waiting as one transaction, and the 202 after that commit. No validation, keys,
    ledger or forwarding: what durability alone costs, beside what the sidecar does."""

    db = sqlite3.connect(args.db, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE IF NOT EXISTS q (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    waiting: list[tuple[bytes, asyncio.Future[None]]] = []
    ready = threading.Condition()

    def writer(loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with ready:
                while not waiting:
                    ready.wait()
                group = waiting[:]
                waiting.clear()
            db.execute("BEGIN")
            db.executemany("INSERT INTO q (body) VALUES (?)", [(body,) for body, _ in group])
            db.execute("COMMIT")
            loop.call_soon_threadsafe(committed, group)

    def committed(group: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        for _, future in group:
            if not future.done():
                future.set_result(None)

    async def post(request: web.Request) -> web.Response:
        raw = await request.read()
        obj = _decode(raw)
        future = asyncio.get_running_loop().create_future()
        with ready:
            waiting.append((raw, future))
            ready.notify()
        await future
        return _accepted(obj)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=writer, args=(loop,), daemon=True).start()
        await _serve(post, args.port_file)

    uvloop.run(main())


# -- load generator -----------------------------------------------------------------------


def load(args: argparse.Namespace) -> None:
    """``-c`` keep-alive connections, each posting BODY back to back for ``-d`` seconds."""

    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        errors = 0
        statuses: dict[int, int] = {}
        connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
        headers = {"Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=connector) as session:
            warm_end = time.perf_counter() + args.warmup
            end = warm_end + args.duration

            async def worker() -> None:
                nonlocal errors
                while (now := time.perf_counter()) < end:
                    try:
                        async with session.post(args.url, data=BODY, headers=headers) as r:
                            await r.read()
                            status = r.status
                    except aiohttp.ClientError:
                        errors += 1
                        continue
                    done = time.perf_counter()
                    if now >= warm_end:
                        statuses[status] = statuses.get(status, 0) + 1
                        latencies.append(done - now)

            await asyncio.gather(*(worker() for _ in range(args.connections)))
        latencies.sort()
        ok = statuses.get(202, 0)
        return {
            "tool": "python-aiohttp",
            "requests": len(latencies),
            "accepted": ok,
            "non_202": len(latencies) - ok,
            "errors": errors,
            "events_per_s": ok / args.duration,
            "p50_ms": _percentile(latencies, 0.5) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000,
        }

    print(json.dumps(uvloop.run(main())))


# -- plain httpx loop ---------------------------------------------------------------------


def httpx_loop(args: argparse.Namespace) -> None:
    """The client ceiling: the same requests the flusher sends (body, bearer key,
    idempotency key, same connection limit), from ``--concurrency`` tasks, no store."""

    async def main() -> dict[str, Any]:
        limits = httpx.Limits(
            max_connections=args.concurrency, max_keepalive_connections=args.concurrency
        )
        statuses: dict[int, int] = {}
        remaining = args.n
        async with httpx.AsyncClient(
            base_url=args.url,
            headers={"Authorization": f"Bearer {API_KEY}"},
            limits=limits,
            timeout=10.0,
        ) as client:

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    r = await client.post(
                        "/v1/actions",
                        content=BODY,
                        headers={
                            "Content-Type": "application/json",
                            "Idempotency-Key": uuid.uuid4().hex,
                        },
                    )
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            elapsed = time.perf_counter() - started
        return {"events_per_s": args.n / elapsed, "elapsed_s": elapsed, "statuses": statuses}

    print(json.dumps(uvloop.run(main())))


# -- plain aiohttp-client loop -----------------------------------------------------------


def aiohttp_loop(args: argparse.Namespace) -> None:
    """The ceiling of the client the flusher uses: the same requests as ``httpx_loop``
    from aiohttp's client, same connection limit, no store."""

    async def main() -> dict[str, Any]:
        statuses: dict[int, int] = {}
        remaining = args.n
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {API_KEY}"},
            connector=aiohttp.TCPConnector(limit=args.concurrency),
            timeout=aiohttp.ClientTimeout(total=10.0),
        ) as session:

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    async with session.post(
                        args.url + "/v1/actions",
                        data=BODY,
                        headers={
                            "Content-Type": "application/json",
                            "Idempotency-Key": uuid.uuid4().hex,
                        },
                    ) as r:
                        await r.read()
                        statuses[r.status] = statuses.get(r.status, 0) + 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            elapsed = time.perf_counter() - started
        return {"events_per_s": args.n / elapsed, "elapsed_s": elapsed, "statuses": statuses}

    print(json.dumps(uvloop.run(main())))


# -- prefill ------------------------------------------------------------------------------


def prefill(args: argparse.Namespace) -> None:
    """Queue ``-n`` more events in a data directory through ``Store.submit`` in big batches
    (fast: this builds a backlog, it does not measure ingest)."""

    _quiet()

    async def main() -> dict[str, Any]:
        store = await Store.open(
            Path(args.data_dir), durability="normal", max_queue_events=50_000_000
        )
        try:
            started = time.perf_counter()
            left = args.n
            while left > 0:
                k = min(args.batch, left)
                await store.submit([parse_one("action", BODY) for _ in range(k)])
                left -= k
            return {
                "queued": store.counts().queued,
                "elapsed_s": time.perf_counter() - started,
            }
        finally:
            await store.close()

    print(json.dumps(asyncio.run(main())))


# -- peer queue ---------------------------------------------------------------------------


def peer(args: argparse.Namespace) -> None:
    """Put ``-n`` events one per call, durably, then take and acknowledge each: the store
    (as the receiver and flusher use it: concurrent single-event submits, leased in
    batches and settled) against persist-queue's ``SQLiteAckQueue`` (as its docs use it:
    ``put``; ``get`` + ``ack``, defaults: WAL, SQLite's default ``synchronous=FULL``,
    a commit per call)."""

    # Here, not at the top: the bench extra installs it, and CI's tests import this module
    # (``BODY``) without it.
    from persistqueue import SQLiteAckQueue  # noqa: PLC0415

    _quiet()
    obj = msgspec.json.decode(BODY)
    out: dict[str, Any] = {"n": args.n}
    with tempfile.TemporaryDirectory(prefix="peer-", dir=args.dir) as tmp:
        # persist-queue, from --threads producer threads (its queue is thread-safe).
        q = SQLiteAckQueue(os.path.join(tmp, "pq"), multithreading=True)
        per = args.n // args.threads
        started = time.perf_counter()

        def produce() -> None:
            for _ in range(per):
                q.put(obj)

        threads = [threading.Thread(target=produce) for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(per * args.threads):
            item = q.get(block=False)
            q.ack(item)
        ack_s = time.perf_counter() - started
        total = per * args.threads
        out["persist_queue"] = {
            "put_per_s": total / put_s,
            "ack_per_s": total / ack_s,
            "events_per_s": total / (put_s + ack_s),
        }

        async def ours() -> dict[str, float]:
            store = await Store.open(Path(tmp) / "store", durability="full")
            try:
                started = time.perf_counter()
                left = args.n

                async def submitter() -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        await store.submit([parse_one("action", BODY)])

                await asyncio.gather(*(submitter() for _ in range(args.submitters)))
                put_s = time.perf_counter() - started
                started = time.perf_counter()
                while True:
                    leased = await store.lease(256, ())
                    if not leased:
                        break
                    await store.settle([Delivered(e.seq) for e in leased])
                ack_s = time.perf_counter() - started
                return {
                    "put_per_s": args.n / put_s,
                    "ack_per_s": args.n / ack_s,
                    "events_per_s": args.n / (put_s + ack_s),
                }
            finally:
                await store.close()

        out["store"] = asyncio.run(ours())
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bare")
    p.add_argument("--port-file", required=True)
    p = sub.add_parser("minimal")
    p.add_argument("--port-file", required=True)
    p.add_argument("--db", required=True)
    p = sub.add_parser("load")
    p.add_argument("--url", required=True)
    p.add_argument("-c", "--connections", type=int, default=64)
    p.add_argument("-d", "--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p = sub.add_parser("httpx-loop")
    p.add_argument("--url", required=True)
    p.add_argument("-n", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=16)
    p = sub.add_parser("aiohttp-loop")
    p.add_argument("--url", required=True)
    p.add_argument("-n", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=16)
    p = sub.add_parser("prefill")
    p.add_argument("--data-dir", required=True)
    p.add_argument("-n", type=int, required=True)
    p.add_argument("--batch", type=int, default=2_000)
    p = sub.add_parser("peer")
    p.add_argument("-n", type=int, default=5_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--submitters", type=int, default=64)
    p.add_argument("--dir", default=str(Path(__file__).parent))
    args = parser.parse_args()
    commands = {
        "bare": bare,
        "minimal": minimal,
        "load": load,
        "httpx-loop": httpx_loop,
        "aiohttp-loop": aiohttp_loop,
        "prefill": prefill,
        "peer": peer,
    }
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
