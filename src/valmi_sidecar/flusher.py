"""The forwarding loop: lease, rate limit, send, settle, back off.

INTERFACE STUB: the signatures below are the contract other modules code against.
"""

from __future__ import annotations

from typing import Literal

from .config import Settings
from .store import Store
from .upstream import Upstream

UpstreamState = Literal["ok", "backing_off", "rate_limited", "paused", "disabled"]


class Flusher:
    def __init__(self, store: Store, upstream: Upstream | None, settings: Settings) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        raise NotImplementedError

    async def drain(self, timeout_s: float) -> None:
        raise NotImplementedError

    @property
    def state(self) -> UpstreamState:
        raise NotImplementedError

    @property
    def last_error(self) -> str | None:
        raise NotImplementedError

    @property
    def in_flight(self) -> int:
        raise NotImplementedError
