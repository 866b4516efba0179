"""The committed state in memory: the counts, the dead letters stored, the rates.

Loaded from the database when the store opens, then updated from each transaction's plan
after its ``COMMIT`` (event loop only), so reading it costs no I/O.
``received == queued + delivered + dead_lettered`` holds at all times (duplicates are
counted apart).
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from typing import Final, TypeVar

import structlog

from ..disk import DEAD_LETTER_OVERHEAD_BYTES
from .plan import Plan, Snapshot
from .records import DEAD_LETTER_WARN_SHARE, Counts, StoreStats
from .sql import COUNTS, OLDEST

log = structlog.get_logger("valmi_sidecar.store")

#: ``rates()``: one sample of the counts a second at most, over about a minute.
RATE_SAMPLE_S: Final = 1.0
RATE_WINDOW_S: Final = 60.0

_K = TypeVar("_K")


class Mirror:
    """The committed counts of one database."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self.received = 0
        self.delivered = 0
        self.dead_lettered = 0
        self.duplicates = 0
        self.queued = 0
        self.queued_bytes = 0
        #: The first queued event: its seq and the start of its age.
        self.oldest: tuple[int, float] | None = None
        self.next_seq = 1
        #: The events table's ``sqlite_sequence`` value (``writes.SEQ_RESERVE``).
        self.seq_reserved = 0
        #: Dead letters stored now, and their body bytes.
        self.dead_stored = 0
        self.dead_bytes = 0
        #: What the store did since it opened, for ``/metrics``.
        self.stats = StoreStats()
        self._samples: deque[tuple[float, int, int, int]] = deque()

    def load(self, db: sqlite3.Connection, clean: tuple[int, int] | None) -> None:
        """Read the committed state (any thread). ``clean``: the queue's size from the
        clean-shutdown record, when it matched (then the events are not counted)."""
        values = {str(name): int(value) for name, value in db.execute(COUNTS)}
        if clean is not None:
            self.queued, self.queued_bytes = clean
        else:
            sql = "SELECT count(*), coalesce(sum(size), 0) FROM events"
            self.queued, self.queued_bytes = map(int, db.execute(sql).fetchone())
        # The ledger table counts an event's receipt once it is settled (schema version 5).
        self.received = values["received"] + self.queued
        self.delivered = values["delivered"]
        self.dead_lettered = values["dead_lettered"]
        self.duplicates = values["duplicates"]
        for seq, age_from in db.execute(OLDEST):
            self.oldest = (int(seq), float(age_from))
        sql = "SELECT count(*), coalesce(sum(length(body)), 0) FROM dead_letters"
        self.dead_stored, self.dead_bytes = map(int, db.execute(sql).fetchone())
        for (seq,) in db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'"):
            # Past a block reserved and not used up before a restart: seqs are never
            # reused, so a restart may leave a gap (``writes.SEQ_RESERVE`` at most).
            self.seq_reserved = int(seq)
            self.next_seq = self.seq_reserved + 1
        if self.received != self.queued + self.delivered + self.dead_lettered:
            log.warning(
                "counts_do_not_reconcile",
                received=self.received,
                queued=self.queued,
                delivered=self.delivered,
                dead_lettered=self.dead_lettered,
            )

    def counts(self) -> Counts:
        return Counts(
            received=self.received,
            queued=self.queued,
            queued_bytes=self.queued_bytes,
            delivered=self.delivered,
            dead_lettered=self.dead_lettered,
            duplicates=self.duplicates,
            oldest_queued_at=None if self.oldest is None else self.oldest[1],
        )

    def snapshot(self, now: float) -> Snapshot:
        return Snapshot(
            self.next_seq, self.oldest, self.queued, self.queued_bytes, now, self.seq_reserved
        )

    def dead_letter_disk_bytes(self) -> int:
        """What the stored dead letters take on disk: bodies plus rows, estimated."""
        return self.dead_bytes + self.dead_stored * DEAD_LETTER_OVERHEAD_BYTES

    def apply(self, plan: Plan) -> None:
        """The effect of a committed transaction."""
        stats = self.stats
        # Each asked first: a commit of one event fills one of them, or two.
        if plan.received_kinds:
            _add(stats.received, plan.received_kinds)
        if plan.delivered_kinds:
            _add(stats.delivered, plan.delivered_kinds)
        if plan.duplicate_kinds:
            _add(stats.duplicates, plan.duplicate_kinds)
        if plan.dead_by:
            _add(stats.dead_lettered, plan.dead_by)
        self.received += plan.received
        self.queued += plan.received - plan.removed + plan.requeued
        self.queued_bytes += plan.queued_bytes - plan.removed_bytes
        self.delivered += plan.delivered
        self.dead_lettered += plan.dead_lettered - plan.requeued
        self.duplicates += plan.duplicates
        if plan.next_seq:
            self.next_seq = plan.next_seq
            # SQLite itself moves ``sqlite_sequence`` up to the highest seq written past it.
            self.seq_reserved = max(self.seq_reserved, plan.seq_reserved, plan.next_seq - 1)
        if plan.oldest_changed:
            self.oldest = plan.oldest
        if plan.dead_lettered:
            self._add_dead_letters(plan.dead_lettered, plan.dead_bytes)
        if plan.requeued or plan.purged:
            self.dead_stored -= plan.requeued + plan.purged
            self.dead_bytes -= plan.dead_removed_bytes
            stats.requeued += plan.requeued
            stats.purged += plan.purged
            if plan.requeued:
                self.queued_bytes += plan.dead_removed_bytes

    def _add_dead_letters(self, n: int, body_bytes: int) -> None:
        before = self.dead_letter_disk_bytes()
        self.dead_stored += n
        self.dead_bytes += body_bytes
        after = self.dead_letter_disk_bytes()
        warn_at = self._max_bytes * DEAD_LETTER_WARN_SHARE
        if before < warn_at <= after:
            log.warning(
                "dead_letters_fill_the_disk",
                dead_letters=self.dead_stored,
                dead_letter_bytes=after,
                max_queue_bytes=self._max_bytes,
                action="fix the cause, then 'valmi-sidecar dead-letters retry', or export "
                "and purge them: they keep their room until then",
            )

    def rates(self) -> dict[str, float | None]:
        """Events a second over about the last minute (received, delivered, dead-lettered);
        ``None`` until two samples a second apart exist."""
        self.sample()
        if len(self._samples) < 2:
            return dict.fromkeys(("received", "delivered", "dead_lettered"), None)
        t0, r0, d0, x0 = self._samples[0]
        t1, r1, d1, x1 = self._samples[-1]
        span = t1 - t0
        return {
            "received": round((r1 - r0) / span, 3),
            "delivered": round((d1 - d0) / span, 3),
            "dead_lettered": round((x1 - x0) / span, 3),
        }

    def sample(self) -> None:
        now = time.monotonic()
        samples = self._samples
        if samples and now - samples[-1][0] < RATE_SAMPLE_S:
            return
        dead_total = sum(self.stats.dead_lettered.values())
        samples.append((now, self.received, self.delivered, dead_total))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()


def _add(into: dict[_K, int], counts: dict[_K, int]) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n
