"""Committed events handed to the flusher in memory, so that it need not read back from
the database what it was just written.

Every event a group commit adds is put here after ``COMMIT``, once a consumer has asked
for events (before that, with forwarding off say, nothing is held). The flusher takes them
instead of leasing from the database while it knows the database holds nothing else due
for it. What cannot be handed (the handoff is full, nobody asked yet, or a dead letter was
re-queued) is counted in ``missed``: the flusher then reads the database again. An event a
lease returns is dropped from here (``drop``), so no event reaches the flusher twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

from ..events import NewEvent
from .records import QueuedEvent

#: At most this many events, and this many body bytes, wait here (the rest is read from
#: the database when the flusher gets to it).
MAX_EVENTS: Final = 4_096
MAX_BYTES: Final = 8 * 1024 * 1024


class Handoff:
    """Events committed and not yet taken, in seq order: ``(seq, event)``."""

    def __init__(self) -> None:
        self._events: deque[tuple[int, NewEvent]] = deque()
        self._bytes = 0
        self._wanted = False
        #: Events committed to the queue that were not handed (the flusher must read them).
        self.missed = 0

    def put(self, events: Sequence[tuple[int, NewEvent]]) -> None:
        if not self._wanted:
            self.missed += len(events)
            return
        for i, (seq, event) in enumerate(events):
            if len(self._events) >= MAX_EVENTS or self._bytes + len(event.body) > MAX_BYTES:
                self.missed += len(events) - i
                return
            self._events.append((seq, event))
            self._bytes += len(event.body)

    def __len__(self) -> int:
        return len(self._events)

    def miss(self, n: int) -> None:
        self.missed += n

    def take(self, limit: int) -> list[QueuedEvent]:
        """Up to ``limit`` events, oldest first, as the flusher sends them."""
        self._wanted = True
        out: list[QueuedEvent] = []
        events = self._events
        while events and len(out) < limit:
            seq, e = events.popleft()
            self._bytes -= len(e.body)
            out.append(QueuedEvent(seq, e.id, e.idem_key, e.kind, e.body, e.received_at, 0))
        return out

    def drop(self, leased: Sequence[QueuedEvent]) -> None:
        """Forget the events a lease returned. A lease returns due events in seq order and
        every event here is due and out of flight, so they are at the front."""
        events = self._events
        if not events or not leased:
            return
        seqs = {e.seq for e in leased}
        top = max(seqs)
        kept: list[tuple[int, NewEvent]] = []
        while events and events[0][0] <= top:
            seq, e = events.popleft()
            if seq in seqs:
                self._bytes -= len(e.body)
            else:
                kept.append((seq, e))  # skipped by that lease: keep it, in order
        events.extendleft(reversed(kept))
