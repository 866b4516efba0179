"""Validation and stamping of events: pure functions, no sockets."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valmi_sidecar import events
from valmi_sidecar.events import ValidationError, parse_batch, parse_one

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
        (body(agent_key="a", action_type="x", timestamp="yesterday"), "timestamp", "ISO 8601"),
        (body(agent_key="a", action_type="x", timestamp=17), "timestamp", "ISO 8601 string"),
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
        ("1e999", "not valid JSON"),
    ],
)
def test_outcome_value_must_be_a_finite_number(value: str, fragment: str) -> None:
    raw = b'{"agent_key": "a", "outcome_type": "hire", "value": ' + value.encode() + b"}"
    found = problems_of("outcome", raw)
    assert any(fragment in m for m in found.values()), found


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
    json_values | names | st.sampled_from(["2024-01-15T10:30:00Z", "nope"]),
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
    expected.setdefault("timestamp", events.rfc3339(NOW))
    assert expected == sent
    assert isinstance(sent["agent_key"], str)
    assert sent["agent_key"].strip()
    if kind == "outcome":
        assert isinstance(sent["value"], int | float)
        assert not isinstance(sent["value"], bool)
        assert math.isfinite(sent["value"])
    datetime.fromisoformat(sent["timestamp"])
