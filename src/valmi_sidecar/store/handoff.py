"""Committed events handed to the flusher in memory, so that it need not read back from
the database what it was just written.

Every event a group commit adds is put here after ``COMMIT``. The flusher takes them
instead of leasing from the database while it knows the database holds nothing else due
for it. What cannot be handed (the handoff is full, or a dead letter was re-queued) is
counted in ``missed``: the flusher then reads the database again. An event a lease
returns is dropped from here (``drop``), so no event reaches the flusher twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from typing import Final

from .records import QueuedEvent

#: At most this many events, and this many body bytes, wait here (the rest is read from
#: the database when the flusher gets to it).
MAX_EVENTS: Final = 4_096
MAX_BYTES: Final = 8 * 1024 * 1024


class Handoff:
    """Events committed and not yet taken, oldest first."""

    def __init__(self) -> None:
        self._events: deque[QueuedEvent] = deque()
        self._bytes = 0
        #: Events committed to the queue that were not handed (the flusher must read them).
        self.missed = 0

    def __len__(self) -> int:
        return len(self._events)

    def put(self, events: Sequence[QueuedEvent]) -> None:
        for i, event in enumerate(events):
            if len(self._events) >= MAX_EVENTS or self._bytes + len(event.body) > MAX_BYTES:
                self.missed += len(events) - i
                return
            self._events.append(event)
            self._bytes += len(event.body)

    def miss(self, n: int) -> None:
        self.missed += n

    def take(self, limit: int) -> list[QueuedEvent]:
        """Up to ``limit`` events, oldest first."""
        out: list[QueuedEvent] = []
        events = self._events
        while events and len(out) < limit:
            event = events.popleft()
            self._bytes -= len(event.body)
            out.append(event)
        return out

    def drop(self, seqs: Collection[int]) -> None:
        """Forget the events of ``seqs`` (a lease returned them)."""
        if not self._events or not seqs:
            return
        kept = [e for e in self._events if e.seq not in seqs]
        if len(kept) != len(self._events):
            self._events = deque(kept)
            self._bytes = sum(len(e.body) for e in kept)
