"""Validation and stamping of events: pure functions, no sockets."""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valmi_sidecar import events
from valmi_sidecar.events import Kind, ValidationError, check_body, parse_batch, parse_one

NOW = 1_700_000_000.123


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def problems_of(kind: events.Kind, raw: bytes) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        parse_one(kind, raw, now=NOW)
    return {p.field: p.message for p in info.value.problems}


def test_valid_action_is_forwarded_with_exactly_its_fields_and_a_filled_timestamp() -> None:
    ev = parse_one(
        "action", body(agent_key="a", action_type="llm_call", metadata={"m": 1}), now=NOW
    )
    assert {
        "agent_key": "a",
        "action_type": "llm_call",
        "metadata": {"m": 1},
        "timestamp": "2023-11-14T22:13:20.123Z",
    } == json.loads(ev.body)
    assert ev.created_at == "2023-11-14T22:13:20.123Z"
    assert ev.idem_key == ev.id
    assert ev.id.startswith("evt_")


def test_given_timestamp_is_forwarded_as_given() -> None:
    ev = parse_one(
        "outcome",
        body(agent_key="a", outcome_type="hire", value=2.5, timestamp="2024-01-15T10:30:00+02:00"),
        now=NOW,
    )
    assert "2024-01-15T10:30:00+02:00" == json.loads(ev.body)["timestamp"]
    assert ev.value == 2.5


def test_client_idempotency_key_is_the_event_key() -> None:
    ev = parse_one("action", body(agent_key="a", action_type="x"), idem_key="k-1", now=NOW)
    assert "k-1" == ev.idem_key


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        (b"{not json", "", "not valid JSON"),
        (b"[1, 2]", "", "must be a JSON object"),
        (b'"text"', "", "must be a JSON object"),
        (body(action_type="x"), "agent_key", "is required"),
        (body(agent_key="", action_type="x"), "agent_key", "must not be empty"),
        (body(agent_key="   ", action_type="x"), "agent_key", "must not be empty"),
        (body(agent_key=5, action_type="x"), "agent_key", "must be a string"),
        (body(agent_key="a" * 257, action_type="x"), "agent_key", "at most 256"),
        (body(agent_key="a", action_type="x" * 257), "action_type", "at most 256"),
        (body(agent_key="a", action_type="x", metadata=[1]), "metadata", "must be an object"),
        (body(agent_key="a", action_type="x", metadata="m"), "metadata", "must be an object"),
        (body(agent_key="a", action_type="x", timestamp="yesterday"), "timestamp", "RFC 3339"),
        (
            body(agent_key="a", action_type="x", timestamp=17),
            "timestamp",
            "RFC 3339 date-time string",
        ),
        (body(agent_key="a", action_type="x", cost=1), "cost", "is not a field"),
    ],
)
def test_bad_action_is_refused_naming_the_field(raw: bytes, field: str, fragment: str) -> None:
    found = problems_of("action", raw)
    assert field in found, found
    assert fragment in found[field]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("true", "must be a number, not a boolean"),
        ('"3"', "must be a number, not a string"),
        ("null", "is required"),
        ("NaN", "not valid JSON"),
        ("Infinity", "not valid JSON"),
        ("1e999", "too large for a double"),
    ],
)
def test_outcome_value_must_be_a_finite_number(value: str, fragment: str) -> None:
    raw = b'{"agent_key": "a", "outcome_type": "hire", "value": ' + value.encode() + b"}"
    found = problems_of("outcome", raw)
    assert any(fragment in m for m in found.values()), found


@pytest.mark.parametrize(
    "value",
    ["9" * 400, "-" + "9" * 400, "1" + "0" * 309, "1e400", "-1e400", "123e999"],
)
def test_outcome_value_too_large_for_a_double_is_refused_naming_the_field(value: str) -> None:
    raw = b'{"agent_key": "a", "outcome_type": "hire", "value": ' + value.encode() + b"}"
    assert {"value": "is a number too large for a double (at most about 1.8e308 in magnitude)"} == (
        problems_of("outcome", raw)
    )
    batch = b'{"outcomes": [{"agent_key": "a", "outcome_type": "o", "value": 1}, '
    batch += b'{"agent_key": "a", "outcome_type": "o", "value": ' + value.encode() + b"}]}"
    with pytest.raises(ValidationError) as info:
        parse_batch(batch, now=NOW)
    assert ["outcomes[1].value"] == [p.field for p in info.value.problems]


def test_a_number_too_large_for_a_double_in_metadata_names_its_place() -> None:
    raw = b'{"agent_key": "a", "action_type": "x", "metadata": {"n": [1, 2e400]}}'
    assert ["metadata.n[1]"] == list(problems_of("action", raw))


def test_the_largest_double_is_still_a_value() -> None:
    ev = parse_one("outcome", body(agent_key="a", outcome_type="o", value=10**308), now=NOW)
    assert 1e308 == ev.value
    assert json.loads(ev.body)["value"] == 10**308


@pytest.mark.parametrize(
    ("timestamp", "fragment"),
    [
        ("2026-01-15", "must be an RFC 3339 date-time with Z or an offset"),
        ("2026-W03-1", "must be an RFC 3339 date-time with Z or an offset"),
        ("2026-01-15T10", "must be an RFC 3339 date-time with Z or an offset"),
        ("2026-01-15T10:30Z", "must be an RFC 3339 date-time with Z or an offset"),
        ("2026-01-15 10:30", "must be an RFC 3339 date-time with Z or an offset"),
        ("2026-01-15 10:30:00Z", "must be an RFC 3339 date-time with Z or an offset"),
        ("2026-01-15T10:30:00+0100", "must be an RFC 3339 date-time with Z or an offset"),
        ("2026-01-15t10:30:00z", "must be an RFC 3339 date-time with Z or an offset"),
        ("20260115T103000Z", "must be an RFC 3339 date-time with Z or an offset"),
        ("2026-01-15T10:30:00", "has no time zone: add Z for UTC or the offset"),
        ("2026-01-15T10:30:00.123", "has no time zone: add Z for UTC or the offset"),
        ("2026-02-30T10:30:00Z", "is not a real date and time"),
        ("2026-01-15T10:30:00+24:00", "is not a real date and time"),
        ("", "must be an RFC 3339 date-time with Z or an offset"),
    ],
)
def test_a_timestamp_must_be_an_rfc3339_date_time_with_a_zone(
    timestamp: str, fragment: str
) -> None:
    found = problems_of("action", body(agent_key="a", action_type="x", timestamp=timestamp))
    assert ["timestamp"] == list(found)
    assert fragment in found["timestamp"]
    assert "2026-01-15T10:30:00Z" in found["timestamp"]  # says what to send instead


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-01-15T10:30:00Z",
        "2026-01-15T10:30:00.5Z",
        "2026-01-15T10:30:00.123456789Z",
        "2026-01-15T10:30:00+05:30",
        "2026-01-15T10:30:00.250-08:00",
        "2026-01-15T10:30:00-00:00",
    ],
)
def test_an_rfc3339_timestamp_with_a_zone_is_forwarded_as_given(timestamp: str) -> None:
    ev = parse_one("action", body(agent_key="a", action_type="x", timestamp=timestamp), now=NOW)
    assert timestamp == json.loads(ev.body)["timestamp"]


def test_a_null_timestamp_is_filled_with_the_receipt_time_like_a_missing_one() -> None:
    null = parse_one("action", b'{"agent_key":"a","timestamp":null,"action_type":"x"}', now=NOW)
    missing = parse_one("action", b'{"agent_key":"a","action_type":"x"}', now=NOW)
    expected = {"agent_key": "a", "action_type": "x", "timestamp": "2023-11-14T22:13:20.123Z"}
    assert expected == json.loads(null.body)
    assert missing.body == null.body
    # A retry that spells it the other way is the same event for its Idempotency-Key.
    assert missing.fingerprint == null.fingerprint
    (in_batch,) = parse_batch(
        b'{"outcomes": [{"agent_key":"a","outcome_type":"o","value":1,"timestamp":null}]}',
        now=NOW,
    )
    assert "2023-11-14T22:13:20.123Z" == json.loads(in_batch.body)["timestamp"]


def test_every_problem_is_listed_not_just_the_first() -> None:
    found = problems_of("outcome", body(agent_key=1, value=True, metadata=3, extra=1))
    assert {"agent_key", "outcome_type", "value", "metadata", "extra"} == set(found)


def test_batch_problems_carry_their_index() -> None:
    raw = json.dumps(
        {
            "actions": [{"agent_key": "a", "action_type": "x"}, {"agent_key": "a"}],
            "outcomes": [{"agent_key": "a", "outcome_type": "o", "value": "1"}],
        }
    ).encode()
    with pytest.raises(ValidationError) as info:
        parse_batch(raw, now=NOW)
    fields = {p.field for p in info.value.problems}
    assert {"actions[1].action_type", "outcomes[0].value"} == fields


def test_batch_with_key_gives_each_event_a_derived_key() -> None:
    raw = json.dumps(
        {
            "actions": [{"agent_key": "a", "action_type": "x"}],
            "outcomes": [{"agent_key": "a", "outcome_type": "o", "value": 1}],
        }
    ).encode()
    batch = parse_batch(raw, idem_key="K", now=NOW)
    assert ["K:0", "K:1"] == [e.idem_key for e in batch]
    assert ["action", "outcome"] == [e.kind for e in batch]


def test_batch_over_the_limit_is_refused() -> None:
    raw = json.dumps({"actions": [{"agent_key": "a", "action_type": "x"}] * 1001}).encode()
    with pytest.raises(ValidationError, match="at most 1000"):
        parse_batch(raw, now=NOW)


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ValidationError, match="no events"):
        parse_batch(b'{"actions": []}', now=NOW)


def test_fingerprint_ignores_key_order_but_not_content() -> None:
    a = parse_one("action", b'{"agent_key":"a","action_type":"x"}', now=NOW)
    b = parse_one("action", b'{"action_type":"x","agent_key":"a"}', now=NOW + 5)
    c = parse_one("action", b'{"action_type":"y","agent_key":"a"}', now=NOW)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint


def test_an_event_without_a_client_key_is_fingerprinted_like_one_with_a_key() -> None:
    """The sidecar's own key can never be reused, but salvage checks the stored body
    against this fingerprint: without it, a body damaged outside the columns copied from it
    (metadata, timestamp) would be queued again as if intact."""
    raw = b'{"agent_key":"a","action_type":"x","metadata":{"n":1}}'
    mine = parse_one("action", raw, now=NOW)
    theirs = parse_one("action", raw, idem_key="client-1", now=NOW)
    assert events.body_fingerprint("action", json.loads(raw)) == mine.fingerprint
    assert theirs.fingerprint == mine.fingerprint


@pytest.mark.parametrize(
    "raw",
    [
        b'{"agent_key":"a","action_type":"x","timestamp":"2026-01-15T10:30:00Z"}',
        b'{"agent_key":"a","action_type":"x","metadata":{"n":1,"s":"\xc3\xa9"}}',
        b'{"agent_key": "a",  "action_type": "x"}',
        b'{"agent_key":"a","action_type":"x","metadata":{"e":"\\u00e9","f":1.50}}',
    ],
)
def test_the_body_stored_is_the_body_sent_minified_or_re_encoded(raw: bytes) -> None:
    """Compact or spaced, the stored body is the decoded object encoded once, with the
    receipt time appended when the client gave none."""
    ev = parse_one("action", raw, now=NOW)
    obj = json.loads(raw)
    obj.setdefault("timestamp", events.rfc3339(NOW))
    assert msgspec.json.encode(obj) == ev.body


@settings(max_examples=200, deadline=None)
@given(
    obj=st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=6), min_size=1),
    nested=st.booleans(),
    spaced=st.booleans(),
    data=st.data(),
)
def test_any_repeated_key_is_refused_naming_it(
    obj: dict[str, Any], nested: bool, spaced: bool, data: st.DataObject
) -> None:
    """Compact or spaced, at the top or nested, a key named twice in one object is refused
    with the same message."""
    key = data.draw(st.sampled_from(sorted(obj)))
    separators = (", ", ": ") if spaced else (",", ":")
    members = json.dumps(obj, separators=separators)[:-1]
    repeated = members + separators[0] + json.dumps(key) + separators[1] + "0}"
    if nested:
        raw = b'{"agent_key":"a","action_type":"x","metadata":' + repeated.encode() + b"}"
    else:
        raw = repeated.encode()
    with pytest.raises(ValidationError) as info:
        parse_one("action", raw, now=NOW)
    assert [("", f"the body names the key {key!r} twice in one object")] == [
        (p.field, p.message) for p in info.value.problems
    ]


@pytest.mark.parametrize(
    ("key", "ok"),
    [("abc-123", True), ("", False), (" ", False), ("k" * 256, False), ("é", False)],
)
def test_idempotency_key_rules(key: str, ok: bool) -> None:
    assert ok == (events.check_idempotency_key(key) is None)


# --- property: accepted exactly, or refused ------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
names = st.text(min_size=0, max_size=300)
maybe_bodies = st.dictionaries(
    st.sampled_from(
        ["agent_key", "action_type", "outcome_type", "value", "metadata", "timestamp", "x"]
    ),
    json_values
    | names
    | st.sampled_from(["2024-01-15T10:30:00Z", "2024-01-15T10:30:00", "2024-01-15", "nope"]),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(events.KINDS), obj=maybe_bodies)
def test_any_body_is_either_accepted_exactly_or_refused(
    kind: events.Kind, obj: dict[str, Any]
) -> None:
    raw = json.dumps(obj).encode()
    try:
        ev = parse_one(kind, raw, now=NOW)
    except ValidationError as exc:
        assert exc.problems
        return
    sent = json.loads(ev.body)
    expected = dict(obj)
    if expected.get("timestamp") is None:
        expected["timestamp"] = events.rfc3339(NOW)
    assert expected == sent
    assert isinstance(sent["agent_key"], str)
    assert sent["agent_key"].strip()
    if kind == "outcome":
        assert isinstance(sent["value"], int | float)
        assert not isinstance(sent["value"], bool)
        assert math.isfinite(sent["value"])
    assert datetime.fromisoformat(sent["timestamp"]).tzinfo is not None


def test_event_ids_are_unique_time_ordered_and_not_shared_with_a_forked_child() -> None:
    ids = [events.new_event_id(1_700_000_000.5 + i / 1000) for i in range(3000)]
    assert len(set(ids)) == len(ids)  # more than one draw of random parts
    assert ids == sorted(ids)  # the millisecond prefix orders them
    assert all(re.fullmatch(r"evt_[0-9a-f]{28}", i) for i in ids)
    events.new_event_id(0.0)  # the pool holds undrawn parts now
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its next id, to the parent
        os.write(write, events.new_event_id(0.0).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        from_child = pipe.read().decode()
    assert os.waitpid(child, 0)[1] == 0
    assert from_child.startswith("evt_000000000000")
    assert from_child != events.new_event_id(0.0)


def _bodies_around_the_rules() -> list[tuple[str, object]]:
    """Bodies on each side of each rule ``check_body`` applies."""
    names = ["x", " x ", "", " ", "\t\n", "\u00a0", "\u2003", "a" * 256, "a" * 257, 7, None, True]
    values: list[object] = [
        1.5, 0, -3, True, False, None, "2", float("inf"), float("nan"), 2**53, -(2**53),
        2**53 + 1, 2**1023, 2**1100, [1], {"v": 1},
    ]  # fmt: skip
    stamps: list[object] = [
        None, "2026-01-15T10:30:00Z", "2026-01-15T10:30:00.250+01:00", "2026-01-15",
        "2026-02-30T10:30:00Z", "2026-01-15T10:30:00", 5,
    ]  # fmt: skip
    bodies: list[tuple[str, object]] = [("action", []), ("action", "x"), ("outcome", None)]
    for name in names:
        bodies.append(("action", {"agent_key": name, "action_type": "llm_call"}))
        bodies.append(("action", {"agent_key": "a", "action_type": name}))
        bodies.append(("outcome", {"agent_key": "a", "outcome_type": name, "value": 1}))
    for value in values:
        bodies.append(("outcome", {"agent_key": "a", "outcome_type": "t", "value": value}))
    for ts in stamps:
        bodies.append(("action", {"agent_key": "a", "action_type": "t", "timestamp": ts}))
    metadatas: list[object] = [{}, {"m": 1}, None, [], "x"]
    for metadata in metadatas:
        bodies.append(("action", {"agent_key": "a", "action_type": "t", "metadata": metadata}))
    bodies += [
        ("action", {"agent_key": "a"}),
        ("action", {"agent_key": "a", "action_type": "t", "extra": 1}),
        ("action", {"agent_key": "a", "action_type": "t", "value": 1}),
        ("outcome", {"agent_key": "a", "outcome_type": "t"}),
        ("outcome", {"agent_key": "a", "action_type": "t", "value": 1}),
    ]
    return bodies


@pytest.mark.parametrize(("kind", "body"), _bodies_around_the_rules())
def test_the_check_of_a_plain_body_agrees_with_the_full_check(kind: Kind, body: object) -> None:
    """``check_body`` passes a usual body without asking each rule in turn: it must
    never pass one that the full check refuses, and says the same of every other."""
    assert events._problems(kind, body, "") == check_body(kind, body)


def test_the_usual_bodies_take_the_plain_check() -> None:
    usual: list[tuple[Kind, dict[str, object]]] = [
        ("action", {"agent_key": "a1", "action_type": "llm_call"}),
        ("action", {"agent_key": "a1", "action_type": "llm_call", "metadata": {"tokens": 3}}),
        ("outcome", {"agent_key": "a1", "outcome_type": "ticket_resolved", "value": 1}),
        ("outcome", {"agent_key": "a1", "outcome_type": "sale", "value": 12.5,
                     "timestamp": "2026-01-15T10:30:00Z"}),
    ]  # fmt: skip
    assert all(events._plainly_valid(kind, body) for kind, body in usual)
    assert [] == [check_body(kind, body) for kind, body in usual if check_body(kind, body)]


_FIELD_VALUES = st.one_of(
    st.text(max_size=300),
    st.sampled_from([" ", "\u00a0x", "a" * 256, "a" * 257, "2026-01-15T10:30:00Z"]),
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)
_FIELD_NAMES = st.sampled_from(
    ["agent_key", "action_type", "outcome_type", "value", "metadata", "timestamp", "x"]
)


@settings(max_examples=400)
@given(
    kind=st.sampled_from(["action", "outcome"]),
    body=st.dictionaries(_FIELD_NAMES, _FIELD_VALUES, max_size=6),
)
def test_any_body_is_judged_alike_by_the_plain_and_the_full_check(
    kind: Kind, body: dict[str, Any]
) -> None:
    assert events._problems(kind, body, "") == check_body(kind, body)
