"""Fixtures and helpers shared by the store's tests: real database files in ``tmp_path``,
a settable clock, and events made the way the receiver makes them."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from valmi_sidecar.events import NewEvent, parse_one
from valmi_sidecar.store import DeadLetter, Store

T0 = 1_700_000_000.0
DAY = 24 * 3600.0


class Clock:
    """A settable clock for the store (seconds since the epoch)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def open_store(tmp_path: Path, clock: Clock) -> AsyncIterator[OpenStore]:
    """Open stores on ``tmp_path / "data"`` (by default) and close them all afterwards."""
    opened: list[Store] = []

    async def _open(data_dir: Path | None = None, **kwargs: Any) -> Store:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("prune_interval_s", None)
        store = await Store.open(data_dir or tmp_path / "data", **kwargs)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        await store.close()


def action(
    clock: Clock | None = None,
    key: str | None = None,
    agent: str = "agent-1",
    kind: str = "llm_call",
) -> NewEvent:
    """An action event received at ``clock()``, or now when no clock is given."""
    body = f'{{"agent_key": "{agent}", "action_type": "{kind}"}}'.encode()
    return parse_one("action", body, idem_key=key, now=time.time() if clock is None else clock())


def outcome(clock: Clock, value: float, key: str | None = None) -> NewEvent:
    body = f'{{"agent_key": "agent-1", "outcome_type": "resolved", "value": {value}}}'.encode()
    return parse_one("outcome", body, idem_key=key, now=clock())


async def dead_letter(store: Store, n: int) -> list[str]:
    """Submit ``n`` events and dead-letter them; their ids."""
    await store.submit([action() for _ in range(n)])
    leased = await store.lease(n, frozenset())
    await store.settle([DeadLetter(e.seq, "rejected", 400, "HTTP 400") for e in leased])
    return [e.id for e in leased]


def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Read committed data through an independent connection."""
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()
