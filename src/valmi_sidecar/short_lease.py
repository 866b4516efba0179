"""What the flusher knows of the queue without asking the database: after a lease came
back short, nothing else is due until something changes (new events the store could not
hand over, an event back out of flight, a retry recorded, the next due time reached)."""

from __future__ import annotations


class ShortLease:
    """What the last short lease saw: every due event out of flight was read, so until
    something can have made another one due, the lease loop needs no query (at low rates,
    most leases would find nothing). ``changes`` counts those things: new events, an event
    back out of flight, a retry recorded."""

    def __init__(self) -> None:
        self.changes = 0
        # ``changes`` when a lease last came back short (None: none since start), and the
        # next due time of the events out of flight once read (None: nothing queued).
        self._seen: int | None = None
        self._due_read = False
        self._due: float | None = None

    def changed(self) -> None:
        self.changes += 1

    def came_back_short(self, seen: int) -> None:
        self._seen, self._due_read, self._due = seen, False, None

    def forget(self) -> None:
        self._seen = None

    def _current(self) -> bool:
        return self._seen is not None and self._seen == self.changes

    def known_empty(self, now: float) -> bool:
        """Whether a lease now would come back empty, as far as is known without asking:
        nothing changed since a short lease, and its next due time (once read) has not
        come."""
        return self._current() and (not self._due_read or self._due is None or now < self._due)

    def known_due(self) -> tuple[bool, float | None]:
        """Whether the next due time is known, and that time."""
        return self._current() and self._due_read, self._due

    def note_due(self, seen: int, due: float | None) -> None:
        """The next due time read when ``changes`` was ``seen``."""
        if self._current() and seen == self.changes:
            self._due_read, self._due = True, due
