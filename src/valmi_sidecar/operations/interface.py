"""What an operator can ask of a sidecar, whether it runs (its API) or not (its database)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..events import NewEvent
from ..store import DeadLetterFilter


class OperationError(Exception):
    """An operation failed for a reason the operator can act on; the message says what to do."""


@dataclass(frozen=True, slots=True)
class DeadLetterQuery:
    """Which dead letters an operation applies to, ages in seconds before now; every field
    set narrows it. The admin API takes it as query parameters or a JSON body."""

    reason: str | None = None
    agent_key: str | None = None
    older_than_s: float | None = None
    newer_than_s: float | None = None
    ids: tuple[str, ...] | None = None

    def filter(self, now: float, after_seq: int = 0) -> DeadLetterFilter:
        """The store's filter, ages turned into times before ``now``."""
        return DeadLetterFilter(
            reason=self.reason,
            agent_key=self.agent_key,
            dead_before=None if self.older_than_s is None else now - self.older_than_s,
            dead_after=None if self.newer_than_s is None else now - self.newer_than_s,
            ids=self.ids,
            after_seq=after_seq,
        )

    def body(self) -> dict[str, Any]:
        """The filter fields of a ``POST /v1/dead-letters/{retry,purge}`` body."""
        return {
            "reason": self.reason,
            "agent_key": self.agent_key,
            "older_than_s": self.older_than_s,
            "newer_than_s": self.newer_than_s,
            "ids": None if self.ids is None else list(self.ids),
        }

    def params(self) -> dict[str, Any]:
        """The query parameters of ``GET /v1/dead-letters[/count]`` (unset ones left out)."""
        fields = self.body()
        if self.ids is not None:
            fields["ids"] = ",".join(self.ids)
        return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """Dead letters in their JSON form, oldest first, and the cursor of the next page
    (``None``: this was the last)."""

    items: list[dict[str, Any]]
    next_after_seq: int | None


@dataclass(frozen=True, slots=True)
class ImportCounts:
    """What ``import_events`` did: queued, already queued, skipped for a reused key."""

    imported: int = 0
    duplicates: int = 0
    conflicts: int = 0

    def __add__(self, other: ImportCounts) -> ImportCounts:
        return ImportCounts(
            self.imported + other.imported,
            self.duplicates + other.duplicates,
            self.conflicts + other.conflicts,
        )


class Operations(Protocol):
    """The operator's actions on one sidecar's data. ``HttpOperations`` asks a running
    sidecar; ``LocalOperations`` acts on the database (inside the sidecar, or from the
    command line when none runs). Answers are the admin API's JSON forms, whichever
    implementation gives them."""

    #: Whose answers these are, for the operator: an address or a database file.
    source: str

    async def status(self) -> dict[str, Any]:
        """The ``/v1/status`` answer."""
        ...

    async def ledger(
        self, agent_key: str | None = None, since: str | None = None, until: str | None = None
    ) -> dict[str, Any]:
        """The ledger lines and their totals (``GET /v1/ledger``)."""
        ...

    async def dead_letters(
        self, query: DeadLetterQuery, *, limit: int, after_seq: int = 0
    ) -> DeadLetterPage:
        """One page of matching dead letters after the cursor ``after_seq``."""
        ...

    async def dead_letter_summary(self) -> dict[str, Any]:
        """Stored dead letters by reason (``GET /v1/dead-letters/summary``)."""
        ...

    async def count_dead_letters(self, query: DeadLetterQuery) -> int:
        """How many stored dead letters match."""
        ...

    async def requeue_dead_letters(self, query: DeadLetterQuery, limit: int) -> int:
        """Queue up to ``limit`` matching dead letters again, with their original keys."""
        ...

    async def purge_dead_letters(self, query: DeadLetterQuery, limit: int) -> int:
        """Delete up to ``limit`` matching dead letters (their counts stay)."""
        ...

    async def import_events(self, events: Sequence[NewEvent]) -> ImportCounts:
        """Queue salvaged events with their ids and keys."""
        ...

    async def aclose(self) -> None:
        """Release what the operations hold (a connection, the data directory's lock)."""
        ...
