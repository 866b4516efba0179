"""The httpx client for the Valmi API, and the classification of its answers.

INTERFACE STUB: the signatures below are the contract other modules code against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import Secret
from .store import QueuedEvent

Verdict = Literal["delivered", "retry", "dead_letter", "pause"]


@dataclass(frozen=True, slots=True)
class Answer:
    """What one upstream attempt means for the event and for the flusher."""

    verdict: Verdict
    status: int | None
    error: str
    retry_after_s: float | None = None
    rate_limit_remaining: int | None = None
    rate_limit_reset_s: float | None = None


class Upstream:
    def __init__(
        self, api_url: str, api_key: Secret, *, timeout_s: float, max_connections: int
    ) -> None:
        raise NotImplementedError

    async def send(self, event: QueuedEvent) -> Answer:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError
