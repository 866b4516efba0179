"""The operator's HTTP API on the listen address: the ledger, the dead letters, salvage.

Protected like ``/v1/*`` ingest: with an ingest token set, ``Authorization: Bearer <token>``
is required. Errors have the receiver's one shape. ``valmi-sidecar ledger``,
``dead-letters …`` and ``salvage`` use these routes while a sidecar runs.

``GET  /v1/ledger?agent_key=&since=&until=``        ledger lines and their totals
``GET  /v1/dead-letters?reason=&agent_key=&older_than_s=&newer_than_s=&after_seq=&limit=``
``GET  /v1/dead-letters/summary``                   stored dead letters by reason
``GET  /v1/dead-letters/count?filter…``             how many match
``GET  /v1/dead-letters/{id}``                      one dead letter
``POST /v1/dead-letters/retry``  ``{filter…, "limit"}``  re-queue (original key): ``{"requeued": n}``
``POST /v1/dead-letters/purge``  ``{filter…, "limit"}``  delete: ``{"purged": n}``
``POST /v1/salvage``             ``{"events": [...]}``   queue salvaged events with their keys
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, cast

import msgspec
from aiohttp import web

from . import events
from .events import Kind, NewEvent, ValidationError
from .receiver import STORE, ApiError, _check_token
from .store import DeadLetterFilter, LedgerRow, QueueFullError, StoreError, salvage_problem

_encode: Final = msgspec.json.Encoder().encode
_JSON: Final = "application/json"
#: Dead letters listed per request at most, and moved per retry/purge request at most.
MAX_PAGE: Final = 1_000
MAX_CHANGE: Final = 10_000
_DAY: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
#: Why an event is a dead letter: refused by the upstream for good, or too old to send.
DEAD_LETTER_REASONS: Final = ("rejected", "expired")
_FILTER_FIELDS: Final = frozenset({"reason", "agent_key", "older_than_s", "newer_than_s", "ids"})


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encode(body), content_type=_JSON)


def _bad(field: str, message: str) -> ApiError:
    return ApiError(
        400, "invalid_request", f"{field}: {message}", [{"field": field, "message": message}]
    )


_LEDGER_QUERY: Final = frozenset({"agent_key", "since", "until"})
_LIST_QUERY: Final = _FILTER_FIELDS | {"after_seq", "limit"}


def _query(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query parameters, each named once and known (as strict as a body: a repeated or
    misspelt filter must not widen what a retry or an export matches)."""
    q = request.query
    for name in q:
        if name not in allowed:
            raise _bad(name, f"unknown parameter; allowed: {', '.join(sorted(allowed))}")
        if len(q.getall(name)) > 1:
            raise _bad(name, "is given more than once; give it once")
    return dict(q)


def _day(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name)
    if value is None:
        return None
    if not _DAY.fullmatch(value):
        raise _bad(name, "must be a UTC day, YYYY-MM-DD")
    return value


def _number(raw: object, name: str, *, query: bool) -> float | None:
    """Seconds, from a query string (text) or a JSON body (a number: ``"5"`` is not)."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, str if query else int | float):
        raise _bad(name, "must be a number of seconds")
    try:
        value = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise _bad(name, "must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise _bad(name, "must be a finite number >= 0")
    return value


def _int(raw: object, name: str, default: int, maximum: int, *, query: bool) -> int:
    """An integer from a query string (digits) or a JSON body (an integral number)."""
    if raw is None:
        return default
    problem = _bad(name, f"must be an integer from 0 to {maximum}")
    if query:
        if not isinstance(raw, str) or not raw.isascii() or not raw.strip().isdigit():
            raise problem
        value = int(raw)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    else:
        raise problem
    if not 0 <= value <= maximum:
        raise problem
    return value


def _text(raw: object, name: str) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise _bad(name, "must be a string")
    return raw


def parse_filter(
    fields: Mapping[str, Any], now: float, after_seq: int = 0, *, query: bool = False
) -> DeadLetterFilter:
    """A ``DeadLetterFilter`` from query parameters (``query``, text) or a JSON body (JSON
    types), ages in seconds."""
    older = _number(fields.get("older_than_s"), "older_than_s", query=query)
    newer = _number(fields.get("newer_than_s"), "newer_than_s", query=query)
    ids = fields.get("ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise _bad("ids", "must be a list of event ids")
    reason = _text(fields.get("reason"), "reason")
    if reason is not None and reason not in DEAD_LETTER_REASONS:
        raise _bad("reason", f"must be one of: {', '.join(DEAD_LETTER_REASONS)}")
    return DeadLetterFilter(
        reason=reason,
        agent_key=_text(fields.get("agent_key"), "agent_key"),
        dead_before=None if older is None else now - older,
        dead_after=None if newer is None else now - newer,
        ids=None if ids is None else tuple(ids),
        after_seq=after_seq,
    )


def ledger_totals(rows: list[LedgerRow]) -> dict[str, Any]:
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


async def get_ledger(request: web.Request) -> web.Response:
    _check_token(request)
    q = _query(request, _LEDGER_QUERY)
    rows = await request.app[STORE].ledger(
        agent_key=_text(q.get("agent_key"), "agent_key"),
        since=_day(q, "since"),
        until=_day(q, "until"),
    )
    return _json({"rows": [r.as_dict() for r in rows], "totals": ledger_totals(rows)})


async def list_dead_letters(request: web.Request) -> web.Response:
    _check_token(request)
    q = _query(request, _LIST_QUERY)
    limit = _int(q.get("limit"), "limit", 100, MAX_PAGE, query=True)
    after = _int(q.get("after_seq"), "after_seq", 0, 2**62, query=True)
    fields: dict[str, Any] = dict(q)
    if "ids" in fields:
        fields["ids"] = [i for i in fields["ids"].split(",") if i]
    flt = parse_filter(fields, time.time(), after_seq=after, query=True)
    records = await request.app[STORE].dead_letters(limit, flt)
    body = {
        "dead_letters": [r.as_dict() for r in records],
        "next_after_seq": records[-1].seq if len(records) == limit and records else None,
    }
    return _json(body)


async def dead_letter_summary(request: web.Request) -> web.Response:
    _check_token(request)
    store = request.app[STORE]
    return _json(
        {
            "reasons": await store.dead_letter_summary(),
            "dead_lettered": store.counts().dead_lettered,
        }
    )


async def count_dead_letters(request: web.Request) -> web.Response:
    _check_token(request)
    fields: dict[str, Any] = _query(request, _FILTER_FIELDS)
    if "ids" in fields:
        fields["ids"] = [i for i in fields["ids"].split(",") if i]
    n = await request.app[STORE].count_dead_letters(parse_filter(fields, time.time(), query=True))
    return _json({"count": n})


async def show_dead_letter(request: web.Request) -> web.Response:
    _check_token(request)
    event_id = request.match_info["id"]
    records = await request.app[STORE].dead_letters(1, DeadLetterFilter(ids=(event_id,)))
    if not records:
        raise ApiError(404, "not_found", f"no dead letter with id {event_id}")
    return _json(records[0].as_dict())


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of an operator POST, parsed as strictly as an event's: invalid JSON,
    invalid UTF-8 and a key named twice in one object (which one wins is ambiguous) are
    refused."""
    try:
        body = events.decode(await request.read())
    except ValidationError as exc:
        raise ApiError(
            400, "invalid_request", str(exc), [p.as_dict() for p in exc.problems]
        ) from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    return body


def _store_error(exc: StoreError) -> ApiError:
    if isinstance(exc, QueueFullError):
        return ApiError(503, "queue_full", str(exc), retry_after_s=exc.retry_after_s)
    return ApiError(
        503, "store_unavailable", f"the sidecar could not write: {exc}", retry_after_s=2
    )


async def _change(request: web.Request, action: str) -> web.Response:
    _check_token(request)
    body = await _body(request)
    unknown = sorted(set(body) - _FILTER_FIELDS - {"limit"})
    if unknown:
        raise _bad(
            unknown[0], f"unknown field; allowed: {', '.join(sorted(_FILTER_FIELDS))}, limit"
        )
    limit = _int(body.get("limit"), "limit", MAX_CHANGE, MAX_CHANGE, query=False)
    flt = parse_filter(body, time.time())
    store = request.app[STORE]
    try:
        if action == "requeued":
            n = await store.requeue_dead_letters(flt, limit)
        else:
            n = await store.purge_dead_letters(flt, limit)
    except StoreError as exc:
        raise _store_error(exc) from exc
    return _json({action: n})


async def retry_dead_letters(request: web.Request) -> web.Response:
    return await _change(request, "requeued")


async def purge_dead_letters(request: web.Request) -> web.Response:
    return await _change(request, "purged")


# -- salvage ---------------------------------------------------------------------------


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


_SALVAGE_FIELDS: Final = frozenset(
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


def parse_salvage_record(raw: object, index: int) -> NewEvent:
    """A ``salvage_record`` back into the event it was, or a 400 naming the field."""
    where = f"events[{index}]"
    if not isinstance(raw, dict):
        raise _bad(where, "must be an object")
    unknown = sorted(set(raw) - _SALVAGE_FIELDS)
    if unknown:
        raise _bad(f"{where}.{unknown[0]}", "is not a field of a salvaged event")
    kind = raw.get("kind")
    if kind not in ("action", "outcome"):
        raise _bad(f"{where}.kind", "must be action or outcome")
    value = raw.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise _bad(f"{where}.value", "must be a number or null")
    received_at = raw.get("received_at")
    if isinstance(received_at, bool) or not isinstance(received_at, int | float):
        raise _bad(f"{where}.received_at", "must be a Unix time (a number)")
    fingerprint = raw.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise _bad(f"{where}.fingerprint", "must be hexadecimal text or null")
    try:
        digest = bytes.fromhex(fingerprint or "")
        number = None if value is None else float(value)
        received = float(received_at)
    except (ValueError, OverflowError) as exc:
        raise _bad(where, f"is not a salvaged event: {exc}") from exc
    event = NewEvent(
        id=_required(raw, "id", where),
        idem_key=_required(raw, "idempotency_key", where),
        kind=cast(Kind, kind),
        body=_required(raw, "body", where).encode("utf-8"),
        fingerprint=digest,
        agent_key=_required(raw, "agent_key", where),
        event_type=_required(raw, "event_type", where),
        value=number,
        received_at=received,
        created_at=_required(raw, "created_at", where),
    )
    problem = salvage_problem(event)
    if problem is not None:
        raise _bad(f"{where}.{problem[0]}", problem[1])
    return event


def _required(raw: Mapping[str, Any], name: str, where: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise _bad(f"{where}.{name}", "must be a non-empty string")
    return value


async def post_salvage(request: web.Request) -> web.Response:
    _check_token(request)
    body = await _body(request)
    unknown = sorted(set(body) - {"events"})
    if unknown:
        raise _bad(unknown[0], 'unknown field; the body is {"events": [...]}')
    raw = body.get("events")
    if not isinstance(raw, list):
        raise _bad("events", "must be a list of salvaged events")
    salvaged = [parse_salvage_record(r, i) for i, r in enumerate(raw)]
    try:
        result = await request.app[STORE].import_events(salvaged)
    except StoreError as exc:
        raise _store_error(exc) from exc
    return _json(
        {
            "imported": result.imported,
            "duplicates": result.duplicates,
            "conflicts": result.conflicts,
        }
    )


def moved_aside_json(paths: list[Path]) -> list[dict[str, Any]]:
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


def add_admin_routes(app: web.Application) -> None:
    """Add the operator routes to the local API (the caller sets ``app[STORE]``)."""
    app.router.add_get("/v1/ledger", get_ledger)
    app.router.add_get("/v1/dead-letters", list_dead_letters)
    app.router.add_get("/v1/dead-letters/summary", dead_letter_summary)
    app.router.add_get("/v1/dead-letters/count", count_dead_letters)
    # Not the names of the routes beside it: GET .../retry is a 405 (Allow: POST), not a
    # lookup of a dead letter called "retry".
    app.router.add_get(
        r"/v1/dead-letters/{id:(?!(?:summary|count|retry|purge)$)[^/]+}", show_dead_letter
    )
    app.router.add_post("/v1/dead-letters/retry", retry_dead_letters)
    app.router.add_post("/v1/dead-letters/purge", purge_dead_letters)
    app.router.add_post("/v1/salvage", post_salvage)


__all__ = [
    "DEAD_LETTER_REASONS",
    "add_admin_routes",
    "ledger_totals",
    "moved_aside_json",
    "parse_filter",
    "salvage_record",
]
