"""The two kinds of event Valmi meters, their validation, and their exact upstream bodies.

Pure functions, no I/O: the receiver decodes and validates a request body here, and the
store keeps the upstream body that this module produced, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Final, Literal

import msgspec

Kind = Literal["action", "outcome"]
KINDS: Final[tuple[Kind, Kind]] = ("action", "outcome")

#: Upstream path of each kind (the same path the sidecar serves locally).
PATHS: Final[Mapping[Kind, str]] = {"action": "/v1/actions", "outcome": "/v1/outcomes"}
#: The field that names an event's type, per kind.
TYPE_FIELDS: Final[Mapping[Kind, str]] = {"action": "action_type", "outcome": "outcome_type"}

MAX_NAME_CHARS: Final = 256
MAX_TIMESTAMP_CHARS: Final = 64
MAX_BATCH_EVENTS: Final = 1000
MAX_IDEMPOTENCY_KEY_CHARS: Final = 255
_TOO_LARGE: Final = "a number too large for a double (at most about 1.8e308 in magnitude)"

_REQUIRED: Final[Mapping[Kind, tuple[str, ...]]] = {
    "action": ("agent_key", "action_type"),
    "outcome": ("agent_key", "outcome_type", "value"),
}
_ALLOWED: Final[Mapping[Kind, frozenset[str]]] = {
    "action": frozenset({"agent_key", "action_type", "metadata", "timestamp"}),
    "outcome": frozenset({"agent_key", "outcome_type", "value", "metadata", "timestamp"}),
}
_BATCH_FIELDS: Final[Mapping[str, Kind]] = {"actions": "action", "outcomes": "outcome"}

_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()
_sorted_encoder: Final = msgspec.json.Encoder(order="sorted")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a request body: where (a field path) and what."""

    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class ValidationError(Exception):
    """A request body that cannot be accepted; lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        where = f"{first.field}: " if first.field else ""
        super().__init__(f"{where}{first.message}{more}")


class NewEvent(msgspec.Struct, frozen=True, array_like=True):
    """A validated event, stamped at ingest and ready to be stored.

    The worker channel sends it as an array of these fields, in this order (see
    ``channel.py``); the store reads them by name.

    ``body`` is the exact JSON the flusher sends upstream: the client's fields as sent,
    with ``timestamp`` filled with the receipt time when the client left it out.
    ``fingerprint`` identifies what the client sent (before the timestamp was filled), so
    that a retry with the same ``Idempotency-Key`` and a different body is told apart.
    """

    # msgspec makes the fields the slots; said here for the type checker.
    __slots__: ClassVar[tuple[str, ...]]

    id: str
    idem_key: str
    kind: Kind
    body: bytes
    fingerprint: bytes
    agent_key: str
    event_type: str
    value: float | None
    received_at: float
    created_at: str


#: The formatted second of the last ``rfc3339`` call: (Unix second, "YYYY-MM-DDTHH:MM:SS.").
_last_second: tuple[int, str] = (-1, "")


def rfc3339(ts: float) -> str:
    """Format a Unix time as RFC 3339 UTC with milliseconds: ``2024-01-15T10:30:00.123Z``.

    Milliseconds are truncated, as in ``new_event_id``.
    """
    return _rfc3339_ms(int(ts * 1000))


def receipt_time(now: float | None = None) -> tuple[float, str]:
    """An event's receipt time (``now``, or the clock's), cut to the millisecond that its
    RFC 3339 form shows, and that form: its ``received_at`` and ``created_at``.

    Cut, the time is one that SQLite formats as the same text (``strftime`` rounds to
    the nearest millisecond, where ``rfc3339`` truncates), so the key row, kept for the
    de-dup window, leaves its ``created_at`` out (``sql.KEY_CREATED_AT``). With the time as
    the clock gave it, half the key rows kept theirs (24 bytes each).
    """
    ms = int((time.time() if now is None else now) * 1000)
    return ms / 1000, _rfc3339_ms(ms)


def _rfc3339_ms(unix_ms: int) -> str:
    """``rfc3339`` of a time in whole milliseconds. The date and time of the last second
    are kept: every event of a busy second formats only its milliseconds."""
    global _last_second  # noqa: PLW0603 - a one-entry cache on the hot path
    second, ms = divmod(unix_ms, 1000)
    cached, prefix = _last_second
    if second != cached:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _last_second = (second, prefix)
    return f"{prefix}{ms:03d}Z"


#: Random parts of event ids drawn from the OS at once: ``os.urandom`` lets go of the GIL
#: for its system call, and taking it back costs the event loop a wait whenever the store's
#: thread wants it meanwhile (see docs/PERFORMANCE.md, "Where a closed loop waits").
_IDS_PER_DRAW: Final = 512
_random_parts: Iterator[str] = iter(())


def _draw_random_parts() -> Iterator[str]:
    drawn = os.urandom(8 * _IDS_PER_DRAW).hex()
    return iter([drawn[i : i + 16] for i in range(0, len(drawn), 16)])


def _forget_random_parts() -> None:
    # A forked child must not hand out its parent's next ids.
    global _random_parts  # noqa: PLW0603 - the pool's one reset
    _random_parts = iter(())


os.register_at_fork(after_in_child=_forget_random_parts)


def new_event_id(ts: float) -> str:
    """A time-ordered, unique event id: ``evt_`` + 12 hex digits of milliseconds + 16 random."""
    global _random_parts  # noqa: PLW0603 - refilled on the hot path
    random_part = next(_random_parts, None)
    if random_part is None:
        _random_parts = _draw_random_parts()
        random_part = next(_random_parts)
    return f"evt_{int(ts * 1000):012x}{random_part}"


def decode(raw: bytes) -> Any:
    """Decode a JSON request body, or raise ``ValidationError`` saying why it is not JSON.

    Refused as well: invalid UTF-8, nesting deeper than the decoder's recursion limit
    (about 900 levels), and an object that names a key twice (which value would be
    billed is ambiguous: parsers disagree, so the sidecar takes neither).
    """
    return _decode(raw)[0]


def _decode(raw: bytes) -> tuple[Any, bytes | None]:
    """``decode``, plus ``raw`` minified when that equals the object re-encoded (the
    common case: then it is the event's body, with no second encoding)."""
    try:
        obj = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        # msgspec's only complaint about an untyped document: a number past a double's
        # range (1e400), valid JSON that no double can hold.
        where = _out_of_range_number(raw)
        problem = (
            Problem(where, f"is {_TOO_LARGE}")
            if where
            else Problem("", f"the body holds {_TOO_LARGE}")
        )
        raise ValidationError([problem]) from exc
    except msgspec.DecodeError as exc:
        raise ValidationError([Problem("", f"the body is not valid JSON: {exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ValidationError([Problem("", f"the body is not valid UTF-8: {exc.reason}")]) from exc
    except RecursionError as exc:
        raise ValidationError([Problem("", "the body is nested too deeply")]) from exc
    # Fast path: when the body minified as written equals the decoded object re-encoded,
    # no member was dropped, so no key repeats (a body sent compact is compared as it is,
    # without minifying it). Otherwise (escapes, number spellings or a repeat) the stdlib
    # parser looks at every object's pairs. The encoding is the event's body either way.
    encoded = _encoder.encode(obj)
    if raw == encoded or msgspec.json.format(raw, indent=-1) == encoded:
        return obj, encoded
    key = _duplicate_key(raw)
    if key is not None:
        raise ValidationError([Problem("", f"the body names the key {key!r} twice in one object")])
    return obj, None


class _Huge(float):
    """A JSON number that overflows a double, marked where the stdlib parser found it."""


def _out_of_range_number(raw: bytes) -> str | None:
    """The field path (``metadata.a[2]``) of the first number in ``raw`` that overflows a
    double, else ``None``."""

    def number(text: str) -> float:
        value = float(text)
        return _Huge(value) if math.isinf(value) else value

    try:
        obj = json.loads(raw, parse_float=number)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, _Huge):
            return path
        if isinstance(node, dict):
            prefix = f"{path}." if path else ""
            stack.extend((prefix + k, v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(node))))
    return None


def _duplicate_key(raw: bytes) -> str | None:
    """A key that some object of ``raw`` repeats, else ``None``."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for k, _ in items:
            if k in seen and not found:
                found.append(k)
            seen.add(k)
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None  # msgspec accepted it; the stdlib's own limits are not the client's fault
    return found[0] if found else None


def _check_name(obj: Mapping[str, Any], name: str, where: str, out: list[Problem]) -> None:
    value = obj.get(name)
    if name not in obj or value is None:
        out.append(Problem(where + name, "is required"))
    elif not isinstance(value, str):
        out.append(Problem(where + name, f"must be a string, not {_json_type(value)}"))
    elif not value.strip():
        out.append(Problem(where + name, "must not be empty"))
    elif len(value) > MAX_NAME_CHARS:
        out.append(
            Problem(where + name, f"must be at most {MAX_NAME_CHARS} characters, not {len(value)}")
        )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


#: The string fields of each kind that ``_plainly_valid`` checks.
_NAMES: Final[Mapping[Kind, tuple[str, ...]]] = {
    "action": ("agent_key", "action_type"),
    "outcome": ("agent_key", "outcome_type"),
}
#: An outcome's integer value up to this magnitude is a double exactly (``_plainly_valid``).
_EXACT_INT: Final = 2**53


def check_body(kind: Kind, obj: object, where: str = "") -> list[Problem]:
    """Every problem with one event body (an empty list when it is valid)."""
    if type(obj) is dict and _plainly_valid(kind, obj):
        return []
    return _problems(kind, obj, where)


def _plainly_valid(kind: Kind, obj: dict[str, Any]) -> bool:
    """Whether ``obj`` is a valid body of the usual shape, asked before ``_problems``
    (every event pays for it): ``True`` only when ``_problems`` finds none. A body it
    does not pass may be valid still; ``_problems`` says."""
    first, second = _NAMES[kind]
    a = obj.get(first)
    b = obj.get(second)
    if (
        type(a) is not str
        or type(b) is not str
        or not 0 < len(a) <= MAX_NAME_CHARS
        or not 0 < len(b) <= MAX_NAME_CHARS
        or a.isspace()
        or b.isspace()
        or not obj.keys() <= _ALLOWED[kind]
    ):
        return False
    if kind == "outcome" and not _plain_number(obj.get("value")):
        return False
    if "metadata" in obj and type(obj["metadata"]) is not dict:
        return False
    ts = obj.get("timestamp")
    return ts is None or check_timestamp(ts) is None


def _plain_number(value: object) -> bool:
    """A finite float, or an int that a double holds exactly (a bool is neither)."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -_EXACT_INT <= value <= _EXACT_INT


def _problems(kind: Kind, obj: object, where: str) -> list[Problem]:
    """``check_body`` in full: each field asked in turn, each problem said."""
    if not isinstance(obj, dict):
        return [Problem(where.rstrip("."), f"must be a JSON object, not {_json_type(obj)}")]
    out: list[Problem] = []
    for name in _REQUIRED[kind]:
        if name == "value":
            continue
        _check_name(obj, name, where, out)
    if kind == "outcome":
        value = obj.get("value")
        if "value" not in obj or value is None:
            out.append(Problem(where + "value", "is required"))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            out.append(Problem(where + "value", f"must be a number, not {_json_type(value)}"))
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(Problem(where + "value", "must be a finite number"))
        elif isinstance(value, int) and not _fits_double(value):
            out.append(Problem(where + "value", f"is {_TOO_LARGE}"))
    if "metadata" in obj and not isinstance(obj["metadata"], dict):
        out.append(
            Problem(where + "metadata", f"must be an object, not {_json_type(obj['metadata'])}")
        )
    ts = obj.get("timestamp")
    if ts is not None:
        problem = check_timestamp(ts)
        if problem is not None:
            out.append(Problem(where + "timestamp", problem))
    extra = obj.keys() - _ALLOWED[kind]
    for name in sorted(extra):
        allowed = ", ".join(sorted(_ALLOWED[kind]))
        out.append(Problem(where + name, f"is not a field of an {kind}; allowed: {allowed}"))
    return out


def _fits_double(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


#: RFC 3339's date-time (section 5.6) with upper-case ``T`` and ``Z``, as the RFC allows a
#: format to require: a date, a time with seconds, and ``Z`` or a numeric offset.
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})?"
)
_RFC3339_EXAMPLES: Final = "such as 2026-01-15T10:30:00Z or 2026-01-15T10:30:00.250+01:00"


def check_timestamp(ts: object) -> str | None:
    """What is wrong with a client's ``timestamp``, or ``None`` when it is usable.

    Only an RFC 3339 date-time with ``Z`` or an offset names one instant: a date alone, a
    time without seconds or a local time without a zone would bill at a moment that
    depends on who reads it, and upstream may refuse it after the event was accepted.
    """
    if not isinstance(ts, str):
        return f"must be an RFC 3339 date-time string {_RFC3339_EXAMPLES}, not {_json_type(ts)}"
    match = _RFC3339.fullmatch(ts) if len(ts) <= MAX_TIMESTAMP_CHARS else None
    if match is None:
        return (
            f"must be an RFC 3339 date-time with Z or an offset, {_RFC3339_EXAMPLES}; "
            "a date alone, a time without seconds and other ISO 8601 forms are refused"
        )
    if match.group(1) is None:
        return f"has no time zone: add Z for UTC or the offset it was taken in, {_RFC3339_EXAMPLES}"
    try:
        datetime.fromisoformat(ts)
    except ValueError as exc:
        return f"is not a real date and time ({exc}); use RFC 3339, {_RFC3339_EXAMPLES}"
    return None


def body_fingerprint(kind: Kind, obj: Mapping[str, Any]) -> bytes:
    """What identifies a client's event body, whatever its key order and spacing: it tells
    a retry with the same ``Idempotency-Key`` from a different event, and a salvaged body
    from a damaged one."""
    return hashlib.blake2b(
        kind.encode() + b"\0" + _sorted_encoder.encode(obj), digest_size=16
    ).digest()


def _stamp(
    kind: Kind,
    obj: dict[str, Any],
    idem_key: str | None,
    received_at: float,
    created_at: str,
    *,
    encoded: bytes | None = None,
) -> NewEvent:
    """The event to store. ``encoded``, when given, is ``obj`` encoded (no timestamp added)."""
    if "timestamp" in obj and obj["timestamp"] is None:
        # ``"timestamp": null`` means what leaving it out means: the receipt time.
        obj = {k: v for k, v in obj.items() if k != "timestamp"}
        encoded = None
    fingerprint = body_fingerprint(kind, obj)
    if "timestamp" in obj:
        body = encoded if encoded is not None else _encoder.encode(obj)
    elif encoded is not None and len(obj) > 0:
        # The same bytes as encoding ``{**obj, "timestamp": created_at}``: the member is
        # appended last, and created_at is plain ASCII with nothing to escape.
        body = b'%s,"timestamp":"%s"}' % (encoded[:-1], created_at.encode())
    else:
        obj = {**obj, "timestamp": created_at}
        body = _encoder.encode(obj)
    event_id = new_event_id(received_at)
    value = obj.get("value") if kind == "outcome" else None
    return NewEvent(
        id=event_id,
        idem_key=idem_key if idem_key is not None else event_id,
        kind=kind,
        body=body,
        fingerprint=fingerprint,
        agent_key=obj["agent_key"],
        event_type=obj[TYPE_FIELDS[kind]],
        value=float(value) if value is not None else None,
        received_at=received_at,
        created_at=created_at,
    )


def parse_one(
    kind: Kind, raw: bytes, *, idem_key: str | None = None, now: float | None = None
) -> NewEvent:
    """Validate one action or outcome body and stamp it; raise ``ValidationError`` if bad."""
    obj, encoded = _decode(raw)
    problems = check_body(kind, obj)
    if problems:
        raise ValidationError(problems)
    received_at, created_at = receipt_time(now)
    return _stamp(kind, obj, idem_key, received_at, created_at, encoded=encoded)


def parse_batch(
    raw: bytes, *, idem_key: str | None = None, now: float | None = None
) -> list[NewEvent]:
    """Validate a ``{"actions": [...], "outcomes": [...]}`` batch, all or nothing.

    Every problem is listed with the index of its event (``actions[3].value``). With an
    ``Idempotency-Key``, event *i* of the batch (actions first) gets the key ``KEY:i``.
    """
    obj = decode(raw)
    if not isinstance(obj, dict):
        raise ValidationError(
            [Problem("", f"the body must be a JSON object, not {_json_type(obj)}")]
        )
    problems: list[Problem] = []
    for name in sorted(set(obj) - set(_BATCH_FIELDS)):
        problems.append(Problem(name, "is not a field of a batch; allowed: actions, outcomes"))
    items: list[tuple[Kind, dict[str, Any]]] = []
    for field, kind in _BATCH_FIELDS.items():
        if field not in obj:
            continue
        entries = obj[field]
        if not isinstance(entries, list):
            problems.append(Problem(field, f"must be an array, not {_json_type(entries)}"))
            continue
        for i, entry in enumerate(entries):
            found = check_body(kind, entry, f"{field}[{i}].")
            problems.extend(found)
            if not found:
                items.append((kind, entry))
    total = sum(len(v) for k, v in obj.items() if k in _BATCH_FIELDS and isinstance(v, list))
    if not problems and total == 0:
        problems.append(Problem("", "the batch has no events; send at least one action or outcome"))
    if total > MAX_BATCH_EVENTS:
        problems.append(
            Problem("", f"a batch holds at most {MAX_BATCH_EVENTS} events, not {total}; split it")
        )
    if problems:
        raise ValidationError(problems)
    received_at, created_at = receipt_time(now)
    return [
        _stamp(
            kind, entry, None if idem_key is None else f"{idem_key}:{i}", received_at, created_at
        )
        for i, (kind, entry) in enumerate(items)
    ]


def check_idempotency_key(key: str) -> str | None:
    """The problem with a client's ``Idempotency-Key`` header, or ``None`` when it is usable."""
    if not key.strip():
        return "must not be empty"
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        return f"must be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
    if not key.isprintable() or not key.isascii():
        return "must be printable ASCII"
    return None
