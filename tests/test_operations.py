"""The operator layer's pure pieces: the JSON forms of the store's records, the typed
status the CLI prints, and each setting's help living on the setting."""

from __future__ import annotations

import msgspec
import pytest

from valmi_sidecar.cli import StatusView, format_status
from valmi_sidecar.config import PLAIN_FIELDS, field_help, field_metavar
from valmi_sidecar.operations import (
    counts_json,
    dead_letter_json,
    disk_json,
    ledger_json,
    ledger_row_json,
)
from valmi_sidecar.store import Counts, DeadLetterRecord, DiskUsage, LedgerRow


def test_counts_json_is_the_events_and_queue_parts_of_the_status() -> None:
    c = Counts(
        received=5,
        queued=2,
        queued_bytes=100,
        delivered=1,
        dead_lettered=2,
        duplicates=3,
        oldest_queued_at=1.5,
    )
    assert {
        "events": {
            "received": 5,
            "queued": 2,
            "in_flight": 1,
            "delivered": 1,
            "dead_lettered": 2,
            "duplicates": 3,
        },
        "queue": {"events": 2, "bytes": 100, "max_events": 9, "max_bytes": 10},
    } == counts_json(c, in_flight=1, max_events=9, max_bytes=10)


@pytest.mark.parametrize(
    ("usage", "warned"),
    [(DiskUsage(10, 100, False, 1, 5), False), (DiskUsage(90, 100, True, 3, 40), True)],
)
def test_disk_json_warns_when_dead_letters_take_a_quarter_of_the_budget(
    usage: DiskUsage, warned: bool
) -> None:
    answer = disk_json(usage)
    assert round(usage.dead_letter_share, 4) == answer["dead_letter_share"]
    assert warned == (answer["dead_letters_warning"] is not None)
    assert usage.full == answer["full"]


@pytest.mark.parametrize(
    ("body", "shown"), [(b'{"a": 1}', {"a": 1}), (b"not json \xff", "not json \ufffd")]
)
def test_a_dead_letter_shows_its_body_as_json_else_as_text(body: bytes, shown: object) -> None:
    record = DeadLetterRecord(
        1, "evt_1", "key_1", "action", body, 1.0, 2.0, "rejected", 422, "{}", 3, "agent", "t"
    )
    answer = dead_letter_json(record)
    assert shown == answer["body"]
    assert ("evt_1", "key_1", 422, 3) == (
        answer["id"],
        answer["idempotency_key"],
        answer["status"],
        answer["attempts"],
    )


def test_ledger_lines_sum_values_for_outcomes_only() -> None:
    outcome = LedgerRow("agent", "outcome", "sale", "2026-01-01", 5, 2, 1, 0.1 + 0.2, 0.1, 0.3)
    action = LedgerRow("agent", "action", "call", "2026-01-01", 4, 4, 0, 0.0, 0.0, 0.0)
    assert {"received": 0.3, "queued": -0.1, "delivered": 0.1, "dead_lettered": 0.3} == (
        ledger_row_json(outcome)["value"]
    )
    assert ledger_row_json(action)["value"] is None
    answer = ledger_json([outcome, action])
    assert 2 == len(answer["rows"])
    assert {"received": 9, "queued": 2, "delivered": 6, "dead_lettered": 1} == {
        k: answer["totals"][k] for k in ("received", "queued", "delivered", "dead_lettered")
    }
    assert msgspec.json.encode(answer)  # it is JSON as it stands


def test_a_status_answer_becomes_a_typed_view_and_unknown_fields_are_ignored() -> None:
    view = StatusView.of(
        {"events": {"received": 3}, "upstream": {"state": "ok"}, "from_a_newer_version": 1}
    )
    assert 3 == view.events.received
    assert view.upstream is not None
    assert "ok" == view.upstream.state
    assert format_status(view) == format_status(
        {"events": {"received": 3}, "upstream": {"state": "ok"}}
    )


def test_every_setting_carries_its_help() -> None:
    for name in PLAIN_FIELDS:
        assert field_help(name), name
    assert "HOST:PORT" == field_metavar("listen")
    assert field_metavar("max_queue_bytes") is None
