"""One operator path: the ``Operations`` interface (status, ledger, dead letters, salvage
imports) with two implementations, ``HttpOperations`` (a running sidecar's API) and
``LocalOperations`` (its database), and the JSON forms both answer with.

The command line picks one implementation when a command starts (``choose``); the admin
API serves ``LocalOperations`` over the live store.
"""

from __future__ import annotations

from .forms import (
    DEAD_LETTER_REASONS,
    counts_json,
    dead_letter_json,
    disk_json,
    ledger_json,
    ledger_row_json,
    ledger_totals,
    moved_aside_json,
    salvage_record,
)
from .http import EventTooBigError, HttpOperations, NotAnsweringError
from .interface import (
    DeadLetterPage,
    DeadLetterQuery,
    ImportCounts,
    OperationError,
    Operations,
)
from .local import LocalOperations, offline_status
from .target import Target, choose, recorded_url, sidecar_holds, status_url, target_for

__all__ = [
    "DEAD_LETTER_REASONS",
    "DeadLetterPage",
    "DeadLetterQuery",
    "EventTooBigError",
    "HttpOperations",
    "ImportCounts",
    "LocalOperations",
    "NotAnsweringError",
    "OperationError",
    "Operations",
    "Target",
    "choose",
    "counts_json",
    "dead_letter_json",
    "disk_json",
    "ledger_json",
    "ledger_row_json",
    "ledger_totals",
    "moved_aside_json",
    "offline_status",
    "recorded_url",
    "salvage_record",
    "sidecar_holds",
    "status_url",
    "target_for",
]
