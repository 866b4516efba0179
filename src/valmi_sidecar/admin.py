"""The operator's HTTP API on the listen address: the ledger, the dead letters, salvage.

Every route is under ``/v1/``, so the receiver's guard (``receiver.guarded``) takes it like
ingest: with an ingest token set, ``Authorization: Bearer <token>`` is required. Errors
have the receiver's one shape, store errors mapped by ``receiver.store_api_error``. The
answers come from ``LocalOperations`` over the live store. ``valmi-sidecar ledger``,
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
from collections.abc import Mapping
from typing import Any, Final, cast

import msgspec
from aiohttp import web

from . import events
from .api_errors import ApiError, store_api_error
from .events import Kind, NewEvent, ValidationError
from .operations import (
    DEAD_LETTER_REASONS,
    DeadLetterQuery,
    LocalOperations,
    Operations,
    ledger_totals,
    moved_aside_json,
    salvage_record,
)
from .operations.forms import SALVAGE_FIELDS
from .receiver import STORE, add_get, add_post
from .store import StoreError, salvage_problem

_encode: Final = msgspec.json.Encoder().encode
_JSON: Final = "application/json"
#: Dead letters listed per request at most, and moved per retry/purge request at most.
MAX_PAGE: Final = 1_000
MAX_CHANGE: Final = 10_000
_DAY: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_FILTER_FIELDS: Final = frozenset({"reason", "agent_key", "older_than_s", "newer_than_s", "ids"})


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encode(body), content_type=_JSON)


def _bad(field: str, message: str) -> ApiError:
    return ApiError(
        400, "invalid_request", f"{field}: {message}", [{"field": field, "message": message}]
    )


def _operations(request: web.Request) -> Operations:
    """The operations on the store the service set on the application."""
    return LocalOperations.live(request.app[STORE])


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


def parse_query(fields: Mapping[str, Any], *, query: bool = False) -> DeadLetterQuery:
    """A ``DeadLetterQuery`` from query parameters (``query``, text) or a JSON body (JSON
    types), ages in seconds."""
    older = _number(fields.get("older_than_s"), "older_than_s", query=query)
    newer = _number(fields.get("newer_than_s"), "newer_than_s", query=query)
    ids = fields.get("ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise _bad("ids", "must be a list of event ids")
    reason = _text(fields.get("reason"), "reason")
    if reason is not None and reason not in DEAD_LETTER_REASONS:
        raise _bad("reason", f"must be one of: {', '.join(DEAD_LETTER_REASONS)}")
    return DeadLetterQuery(
        reason=reason,
        agent_key=_text(fields.get("agent_key"), "agent_key"),
        older_than_s=older,
        newer_than_s=newer,
        ids=None if ids is None else tuple(ids),
    )


def _ids_listed(q: dict[str, str]) -> dict[str, Any]:
    """Query parameters with ``ids`` (comma-separated) as a list."""
    fields: dict[str, Any] = dict(q)
    if "ids" in fields:
        fields["ids"] = [i for i in fields["ids"].split(",") if i]
    return fields


async def get_ledger(request: web.Request) -> web.Response:
    q = _query(request, _LEDGER_QUERY)
    answer = await _operations(request).ledger(
        agent_key=_text(q.get("agent_key"), "agent_key"),
        since=_day(q, "since"),
        until=_day(q, "until"),
    )
    return _json(answer)


async def list_dead_letters(request: web.Request) -> web.Response:
    q = _query(request, _LIST_QUERY)
    limit = _int(q.get("limit"), "limit", 100, MAX_PAGE, query=True)
    after = _int(q.get("after_seq"), "after_seq", 0, 2**62, query=True)
    query = parse_query(_ids_listed(q), query=True)
    page = await _operations(request).dead_letters(query, limit=limit, after_seq=after)
    return _json({"dead_letters": page.items, "next_after_seq": page.next_after_seq})


async def dead_letter_summary(request: web.Request) -> web.Response:
    return _json(await _operations(request).dead_letter_summary())


async def count_dead_letters(request: web.Request) -> web.Response:
    query = parse_query(_ids_listed(_query(request, _FILTER_FIELDS)), query=True)
    return _json({"count": await _operations(request).count_dead_letters(query)})


async def show_dead_letter(request: web.Request) -> web.Response:
    event_id = request.match_info["id"]
    page = await _operations(request).dead_letters(DeadLetterQuery(ids=(event_id,)), limit=1)
    if not page.items:
        raise ApiError(404, "not_found", f"no dead letter with id {event_id}")
    return _json(page.items[0])


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


async def _change(request: web.Request, action: str) -> web.Response:
    body = await _body(request)
    unknown = sorted(set(body) - _FILTER_FIELDS - {"limit"})
    if unknown:
        raise _bad(
            unknown[0], f"unknown field; allowed: {', '.join(sorted(_FILTER_FIELDS))}, limit"
        )
    limit = _int(body.get("limit"), "limit", MAX_CHANGE, MAX_CHANGE, query=False)
    query = parse_query(body)
    ops = _operations(request)
    try:
        if action == "requeued":
            n = await ops.requeue_dead_letters(query, limit)
        else:
            n = await ops.purge_dead_letters(query, limit)
    except StoreError as exc:
        raise store_api_error(request, exc, ingest=False) from exc
    return _json({action: n})


async def retry_dead_letters(request: web.Request) -> web.Response:
    return await _change(request, "requeued")


async def purge_dead_letters(request: web.Request) -> web.Response:
    return await _change(request, "purged")


# -- salvage ---------------------------------------------------------------------------


def parse_salvage_record(raw: object, index: int) -> NewEvent:
    """A ``salvage_record`` back into the event it was, or a 400 naming the field."""
    where = f"events[{index}]"
    if not isinstance(raw, dict):
        raise _bad(where, "must be an object")
    unknown = sorted(set(raw) - SALVAGE_FIELDS)
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
    body = await _body(request)
    unknown = sorted(set(body) - {"events"})
    if unknown:
        raise _bad(unknown[0], 'unknown field; the body is {"events": [...]}')
    raw = body.get("events")
    if not isinstance(raw, list):
        raise _bad("events", "must be a list of salvaged events")
    salvaged = [parse_salvage_record(r, i) for i, r in enumerate(raw)]
    try:
        result = await _operations(request).import_events(salvaged)
    except StoreError as exc:
        raise store_api_error(request, exc, ingest=False) from exc
    return _json(
        {
            "imported": result.imported,
            "duplicates": result.duplicates,
            "conflicts": result.conflicts,
        }
    )


def add_admin_routes(app: web.Application) -> None:
    """Add the operator routes to the local API (the caller sets ``app[STORE]``). They are
    all under ``/v1/``: the receiver's guard checks the ingest token."""
    add_get(app, "/v1/ledger", get_ledger)
    add_get(app, "/v1/dead-letters", list_dead_letters)
    add_get(app, "/v1/dead-letters/summary", dead_letter_summary)
    add_get(app, "/v1/dead-letters/count", count_dead_letters)
    # Not the names of the routes beside it: GET .../retry is a 405 (Allow: POST), not a
    # lookup of a dead letter called "retry".
    add_get(app, r"/v1/dead-letters/{id:(?!(?:summary|count|retry|purge)$)[^/]+}", show_dead_letter)
    add_post(app, "/v1/dead-letters/retry", retry_dead_letters)
    add_post(app, "/v1/dead-letters/purge", purge_dead_letters)
    add_post(app, "/v1/salvage", post_salvage)


__all__ = [
    "DEAD_LETTER_REASONS",
    "add_admin_routes",
    "ledger_totals",
    "moved_aside_json",
    "parse_query",
    "parse_salvage_record",
    "salvage_record",
]
