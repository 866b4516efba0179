"""The JSON the operator API answers with, made from the store's records.

The store knows rows; this module owns their HTTP form, so the admin API, the status
route and the command line (reading a stopped sidecar's database) answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from ..events import NewEvent
from ..store import DEAD_LETTER_WARN_SHARE, Counts, DeadLetterRecord, DiskUsage, LedgerRow

#: Why an event is a dead letter: refused by the upstream for good, or too old to send.
DEAD_LETTER_REASONS: Final = ("rejected", "expired")


def counts_json(
    c: Counts, *, in_flight: int, max_events: int, max_bytes: int
) -> dict[str, dict[str, int]]:
    """The ``events`` and ``queue`` parts of ``/v1/status``, whether the sidecar runs or
    the figures are read from a stopped sidecar's database."""
    return {
        "events": {
            "received": c.received,
            "queued": c.queued,
            "in_flight": in_flight,
            "delivered": c.delivered,
            "dead_lettered": c.dead_lettered,
            "duplicates": c.duplicates,
        },
        "queue": {
            "events": c.queued,
            "bytes": c.queued_bytes,
            "max_events": max_events,
            "max_bytes": max_bytes,
        },
    }


def disk_json(d: DiskUsage) -> dict[str, Any]:
    """The ``disk`` part of ``/v1/status``: the data directory against its budget."""
    return {
        "bytes": d.bytes,
        "max_bytes": d.max_bytes,
        "full": d.full,
        "dead_letters": d.dead_letters,
        "dead_letter_bytes": d.dead_letter_bytes,
        "dead_letter_share": round(d.dead_letter_share, 4),
        "dead_letters_warning": (
            "dead letters take a large share of max_queue_bytes: re-queue "
            "('valmi-sidecar dead-letters retry') or export and purge them"
            if d.dead_letter_share >= DEAD_LETTER_WARN_SHARE
            else None
        ),
    }


def dead_letter_json(r: DeadLetterRecord) -> dict[str, Any]:
    """A dead letter as the admin API and ``dead-letters export`` give it: the body as
    JSON (as text when it is not JSON)."""
    try:
        body: Any = msgspec.json.decode(r.body)
    except msgspec.DecodeError:
        body = r.body.decode("utf-8", "replace")
    return {
        "id": r.id,
        "idempotency_key": r.idem_key,
        "kind": r.kind,
        "agent_key": r.agent_key,
        "event_type": r.event_type,
        "value": r.value,
        "created_at": r.created_at,
        "received_at": r.received_at,
        "dead_at": r.dead_at,
        "reason": r.reason,
        "status": r.status,
        "detail": r.detail,
        "attempts": r.attempts,
        "body": body,
    }


def _round(value: float) -> float:
    """Sums of floats drift in the last bits; the ledger shows 9 significant decimals."""
    return round(value, 9) + 0.0


def ledger_row_json(r: LedgerRow) -> dict[str, Any]:
    """One ledger line; ``value`` (the summed values) for outcomes only."""
    return {
        "day": r.day,
        "agent_key": r.agent_key,
        "kind": r.kind,
        "event_type": r.event_type,
        "received": r.received,
        "queued": r.queued,
        "delivered": r.delivered,
        "dead_lettered": r.dead_lettered,
        "value": {
            "received": _round(r.received_value),
            "queued": _round(r.queued_value),
            "delivered": _round(r.delivered_value),
            "dead_lettered": _round(r.dead_lettered_value),
        }
        if r.kind == "outcome"
        else None,
    }


def ledger_totals(rows: Sequence[LedgerRow]) -> dict[str, Any]:
    """The sums of the ledger lines (what reconciles with the event counts)."""
    totals: dict[str, Any] = {"received": 0, "queued": 0, "delivered": 0, "dead_lettered": 0}
    value = {"received": 0.0, "queued": 0.0, "delivered": 0.0, "dead_lettered": 0.0}
    for r in rows:
        totals["received"] += r.received
        totals["queued"] += r.queued
        totals["delivered"] += r.delivered
        totals["dead_lettered"] += r.dead_lettered
        value["received"] += r.received_value
        value["queued"] += r.queued_value
        value["delivered"] += r.delivered_value
        value["dead_lettered"] += r.dead_lettered_value
    totals["outcome_value"] = {k: round(v, 9) + 0.0 for k, v in value.items()}
    return totals


def ledger_json(rows: Sequence[LedgerRow]) -> dict[str, Any]:
    """The answer of ``GET /v1/ledger``: the lines and their totals."""
    return {"rows": [ledger_row_json(r) for r in rows], "totals": ledger_totals(rows)}


def moved_aside_json(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The moved-aside databases still present, with their size and what to run on them
    (a couple of stat calls: they are few, and only a start-up adds one)."""
    out = []
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            continue  # deleted by the operator: no longer listed
        out.append({"path": str(path), "bytes": size, "salvage": f"valmi-sidecar salvage {path}"})
    return out


def salvage_record(event: NewEvent) -> dict[str, Any]:
    """The JSON form of a salvaged event, for ``POST /v1/salvage``."""
    return {
        "id": event.id,
        "idempotency_key": event.idem_key,
        "kind": event.kind,
        "body": event.body.decode("utf-8"),
        "fingerprint": event.fingerprint.hex(),
        "agent_key": event.agent_key,
        "event_type": event.event_type,
        "value": event.value,
        "received_at": event.received_at,
        "created_at": event.created_at,
    }


#: The fields of a ``salvage_record``.
SALVAGE_FIELDS: Final = frozenset(
    {
        "id",
        "idempotency_key",
        "kind",
        "body",
        "fingerprint",
        "agent_key",
        "event_type",
        "value",
        "received_at",
        "created_at",
    }
)
