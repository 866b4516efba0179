"""A Valmi API emulator with fault injection, for local development, demos and tests.

INTERFACE STUB: the signatures below are the contract other modules code against.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

DEFAULT_KEY = "sk_test_fake"


@dataclass
class Faults:
    """What the fake does wrong; every field off by default. Changed live by tests."""

    error_rate: float = 0.0  # share of requests answered with error_status
    error_status: int = 503
    latency_s: float = 0.0  # added before answering
    hang: bool = False  # never answer (until switched off)
    unauthorized: bool = False  # every request gets 401
    rate_limited: bool = False  # every request gets 429 with Retry-After
    retry_after_s: float = 1.0
    reset_after_store: bool = False  # store the event, then drop the connection unanswered


@dataclass
class Received:
    """One event the fake stored (the first attempt with a given idempotency key)."""

    idem_key: str | None
    kind: str
    body: dict[str, Any]
    id: str
    attempts: int = 1


class FakeValmi:
    def __init__(
        self,
        *,
        api_keys: Collection[str] = (DEFAULT_KEY,),
        rate_limit_per_min: int | None = None,
    ) -> None:
        self.faults = Faults()
        self.received: dict[str, Received] = {}
        self.requests = 0
        self.status_counts: dict[int, int] = field(default_factory=dict)  # type: ignore[assignment]
        raise NotImplementedError

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; return the base URL (``http://127.0.0.1:PORT``)."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def go_down(self) -> None:
        """Stop listening (connections refused) but keep state and the port for go_up()."""
        raise NotImplementedError

    async def go_up(self) -> None:
        raise NotImplementedError
