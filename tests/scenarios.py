"""The scenario harness for the hostile-conditions tests: traffic, the ledger, the checks.

Every scenario posts events that carry a marker (``metadata.scenario``, ``metadata.seq``),
keeps the id of each ``202``, and at the end reads what the fake Valmi API stored. From
those two it computes one ledger:

- ``sent``: events posted; ``acknowledged``: answered ``202``;
- ``delivered``: acknowledged events the upstream stored;
- ``unacked_delivered``: events the upstream stored whose ``202`` the client never saw
  (committed, then the connection or the process died before the answer): not lost,
  not double;
- ``dead_lettered``: from the sidecar's ``/v1/status``;
- ``lost``: acknowledged, neither delivered nor dead-lettered (must be 0);
- ``double``: one posted event stored twice upstream under different keys, the sidecar's
  own doing (must be 0);
- ``resent_same_key``: repeats of a key the upstream de-duplicated (allowed: retries after
  timeouts, resets and crashes carry the event's one key).

Each ledger is printed as one ``ledger {...}`` line and, when ``VALMI_RELIABILITY_OUT``
names a file, appended to it as a JSON line (docs/RELIABILITY.md is built from those).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import httpx

from valmi_sidecar.fake_api import FakeValmi

#: The API key of every hostile scenario: distinctive, so a leak is found by grep.
SECRET_KEY: Final = "sk_live_HOSTILE-7f3a9c2e5b1d4e8f"
#: Its start, for grepping partial leaks (an excerpt cut in the middle of the key).
SECRET_PREFIX: Final = SECRET_KEY[:16]


@contextlib.asynccontextmanager
async def hostile_fake() -> AsyncIterator[FakeValmi]:
    """A fake Valmi API that accepts only ``SECRET_KEY``; seeded, so faults repeat."""
    api = FakeValmi(api_keys=(SECRET_KEY,), seed=6)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


def sidecar_env(**extra: str) -> dict[str, str]:
    """Environment for a scenario's sidecar process: the secret key, short timeouts."""
    env = {
        "VALMI_API_KEY": SECRET_KEY,
        "VALMI_SIDECAR_UPSTREAM_TIMEOUT_S": "1",
        "VALMI_SIDECAR_BACKOFF_BASE_S": "0.01",
        "VALMI_SIDECAR_BACKOFF_CAP_S": "0.2",
    }
    env.update(extra)
    return env


@dataclasses.dataclass
class Ledger:
    scenario: str
    sent: int
    acknowledged: int
    delivered: int
    unacked_delivered: int
    dead_lettered: int
    lost: int
    double: int
    resent_same_key: int
    seconds: float
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def report(self) -> None:
        line = json.dumps(dataclasses.asdict(self), sort_keys=True)
        print(f"ledger {line}")  # noqa: T201 - the figures for docs/RELIABILITY.md
        out = os.environ.get("VALMI_RELIABILITY_OUT")
        if out:
            with open(out, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def check(self) -> None:
        """Report, then fail unless nothing was lost and nothing was delivered twice."""
        self.report()
        assert 0 == self.lost, f"acknowledged events lost: {self}"
        assert 0 == self.double, f"events delivered twice: {self}"
        assert self.acknowledged == self.delivered + self.dead_lettered, str(self)


class Traffic:
    """Events posted by one scenario, each with a marker; what was answered ``202``."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.started = time.monotonic()
        self.sent = 0
        #: seq → event id, for every 202.
        self.acked: dict[int, str] = {}
        #: Answers other than 202, and transport failures, by kind.
        self.refused: Counter[str] = Counter()

    def body(self, seq: int) -> tuple[str, dict[str, Any]]:
        meta = {"scenario": self.scenario, "seq": seq}
        if seq % 2:
            return "/v1/actions", {
                "agent_key": "agent_h",
                "action_type": "llm_call",
                "metadata": meta,
            }
        return "/v1/outcomes", {
            "agent_key": "agent_h",
            "outcome_type": "resolved",
            "value": seq,
            "metadata": meta,
        }

    async def post(self, client: httpx.AsyncClient, url: str, seq: int) -> bool:
        """Post event ``seq`` once; ``True`` when it was acknowledged."""
        path, body = self.body(seq)
        self.sent += 1
        try:
            resp = await client.post(url + path, json=body)
        except httpx.HTTPError as exc:
            self.refused[type(exc).__name__] += 1
            return False
        if resp.status_code != 202:
            self.refused[str(resp.status_code)] += 1
            return False
        self.acked[seq] = resp.json()["id"]
        return True

    async def run_agents(
        self,
        client: httpx.AsyncClient,
        url: Callable[[], str],
        *,
        agents: int,
        until: Callable[[], bool],
        max_events: int,
        first_seq: int = 0,
        stop_on_error: bool = False,
    ) -> None:
        """``agents`` concurrent posters until ``until()`` or ``max_events`` in all."""
        counter = iter(range(first_seq, first_seq + max_events))

        async def agent() -> None:
            for seq in counter:
                if until():
                    return
                ok = await self.post(client, url(), seq)
                if not ok and stop_on_error:
                    return

        await asyncio.gather(*(agent() for _ in range(agents)))

    # -- the ledger ------------------------------------------------------------------

    def _stored(self, fake: FakeValmi) -> tuple[Counter[int], int]:
        """How often each seq of this scenario was stored upstream; same-key repeats."""
        stored: Counter[int] = Counter()
        resent = 0
        for r in fake.received.values():
            meta = r.body.get("metadata")
            if isinstance(meta, dict) and meta.get("scenario") == self.scenario:
                stored[int(meta["seq"])] += 1
                resent += r.attempts - 1
        return stored, resent

    def all_delivered(self, fake: FakeValmi) -> bool:
        stored, _ = self._stored(fake)
        return all(seq in stored for seq in self.acked)

    async def settle(self, fake: FakeValmi, timeout: float) -> bool:
        """Wait (bounded) until every acknowledged event is stored upstream."""
        deadline = time.monotonic() + timeout
        while not self.all_delivered(fake):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def ledger(self, fake: FakeValmi, *, dead_lettered: int = 0, **notes: Any) -> Ledger:
        stored, resent = self._stored(fake)
        delivered = sum(1 for seq in self.acked if seq in stored)
        return Ledger(
            scenario=self.scenario,
            sent=self.sent,
            acknowledged=len(self.acked),
            delivered=delivered,
            unacked_delivered=sum(1 for seq in stored if seq not in self.acked),
            dead_lettered=dead_lettered,
            lost=len(self.acked) - delivered - dead_lettered,
            double=sum(n - 1 for n in stored.values()),
            resent_same_key=resent,
            seconds=round(time.monotonic() - self.started, 2),
            notes={**notes, "refused": dict(self.refused)} if self.refused else notes,
        )


async def status(client: httpx.AsyncClient, url: str, **headers: str) -> dict[str, Any]:
    resp = await client.get(url + "/v1/status", headers=headers)
    assert 200 == resp.status_code, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def secret_leaks(client: httpx.AsyncClient, url: str, *texts: str) -> list[str]:
    """Where the API key shows up: in ``texts`` (logs), ``/v1/status`` or ``/metrics``."""
    places = [f"text {i}" for i, t in enumerate(texts) if SECRET_PREFIX in t]
    for path in ("/v1/status", "/metrics", "/readyz", "/openapi.json"):
        try:
            resp = await client.get(url + path)
        except httpx.HTTPError:
            continue
        if SECRET_PREFIX in resp.text:
            places.append(path)
    return places
