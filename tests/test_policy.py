"""The upstream policy's rules, on a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from valmi_sidecar.config import Settings
from valmi_sidecar.policy import (
    BACKOFF_AFTER_FAILURES,
    MAX_HOLD_S,
    Decision,
    UpstreamPolicy,
    full_jitter,
    rate_budget,
)
from valmi_sidecar.upstream import Answer

BASE_S = 1.0
CAP_S = 60.0


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Fraction(random.Random):
    """Jitter that always picks the same fraction of its range."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


@dataclass(frozen=True)
class Ev:
    seq: int
    id: str = "evt_x"
    attempts: int = 0


OK = Answer("delivered", 202, "")
FAIL = Answer("retry", 503, "HTTP 503: unavailable")


def refused(status: int = 400) -> Answer:
    return Answer("dead_letter", status, f"HTTP {status}: no")


def make(
    clock: Clock,
    *,
    fraction: float = 1.0,
    pause_after_refusals: int = 3,
    rate_limit_per_min: int = 600_000,
    enabled: bool = True,
) -> UpstreamPolicy[Ev]:
    settings = Settings(
        backoff_base_s=BASE_S,
        backoff_cap_s=CAP_S,
        pause_after_refusals=pause_after_refusals,
        rate_limit_per_min=rate_limit_per_min,
    )
    return UpstreamPolicy(
        settings, enabled=enabled, rng=Fraction(fraction), clock=clock, wall=lambda: 1.7e9
    )


def answer(
    clock: Clock, policy: UpstreamPolicy[Ev], event: Ev, reply: Answer, *, sending: int = 0
) -> Decision[Ev]:
    """``reply`` to ``event``, sent now in the current generation."""
    return policy.on_answer(event, reply, policy.generation, clock.t, sending=sending)


@pytest.mark.parametrize("attempts", [0, 1, 3, 10, 200])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_full_jitter_stays_within_zero_and_the_capped_exponential(
    attempts: int, fraction: float
) -> None:
    bound = min(CAP_S, BASE_S * 2.0 ** min(attempts, 64))
    assert fraction * bound == full_jitter(attempts, BASE_S, CAP_S, Fraction(fraction))


def test_a_failed_event_is_retried_within_its_own_jitter_and_not_before_retry_after() -> None:
    clock = Clock()
    policy = make(clock, fraction=0.5)
    d = answer(clock, policy, Ev(1, attempts=2), FAIL)
    assert ("retry", 0.5 * BASE_S * 4) == (d.action, d.retry_in_s)
    told = Answer("retry", 503, "busy", retry_after_s=30.0)
    assert 30.0 == answer(clock, policy, Ev(2, attempts=0), told).retry_in_s


def test_backoff_starts_after_consecutive_failures_and_holds_everything() -> None:
    clock = Clock()
    policy = make(clock, fraction=1.0)
    for seq in range(1, BACKOFF_AFTER_FAILURES):
        answer(clock, policy, Ev(seq), FAIL)
        assert ("ok", 0.0) == (policy.state, policy.wait_s())
    d = answer(clock, policy, Ev(99), FAIL)
    assert "backing_off" == policy.state
    assert ["upstream_backing_off"] == [n.event for n in d.notes]
    assert BASE_S == policy.next_attempt_in_s  # the first backoff: jitter of base * 2**0
    assert 1 == policy.send_limit(16)
    assert "HTTP 503: unavailable" == policy.last_error
    assert 1.7e9 == policy.last_error_at
    clock.t += BASE_S
    assert 0.0 == policy.wait_s()


def test_answers_to_requests_sent_before_the_backoff_do_not_stretch_it() -> None:
    clock = Clock()
    policy = make(clock, fraction=1.0)
    before = policy.generation
    for seq in range(BACKOFF_AFTER_FAILURES):
        policy.on_answer(Ev(seq), FAIL, policy.generation, clock.t, sending=0)
    hold_until = policy.hold_until
    for seq in range(10, 20):  # sent in the generation before the backoff started
        policy.on_answer(Ev(seq), FAIL, before, clock.t, sending=0)
    assert hold_until == policy.hold_until


def test_a_delivery_ends_the_backoff() -> None:
    clock = Clock()
    policy = make(clock)
    for seq in range(BACKOFF_AFTER_FAILURES):
        answer(clock, policy, Ev(seq), FAIL)
    d = answer(clock, policy, Ev(50), OK)
    assert ("delivered", "ok", 0.0) == (d.action, policy.state, policy.hold_until)
    assert ["upstream_recovered"] == [n.event for n in d.notes]
    assert policy.next_attempt_in_s is None


@pytest.mark.parametrize("status", [401, 403, 404])
def test_an_auth_or_path_answer_pauses_and_keeps_the_event(status: int) -> None:
    clock = Clock()
    policy = make(clock, fraction=1.0)
    d = answer(clock, policy, Ev(7), Answer("pause", status, f"HTTP {status}"))
    assert ("keep", [7], True) == (d.action, d.release, d.release_buffer)
    assert ["upstream_paused"] == [n.event for n in d.notes]
    assert ("paused", True) == (policy.state, policy.stopped)
    assert BASE_S == policy.next_attempt_in_s
    assert (status in (401, 403)) == policy.refresh_key_first
    assert policy.probe_now()
    assert 0.0 == policy.wait_s()


def test_each_refused_probe_waits_longer_and_a_delivery_resumes() -> None:
    clock = Clock()
    policy = make(clock, fraction=1.0)
    paused = Answer("pause", 401, "HTTP 401")
    answer(clock, policy, Ev(1), paused)
    d = answer(clock, policy, Ev(1), paused)  # the probe
    assert [] == d.notes  # paused already: said once
    assert 2 * BASE_S == policy.next_attempt_in_s
    d = answer(clock, policy, Ev(2), OK)
    assert ("ok", False) == (policy.state, policy.refresh_key_first)
    assert [("upstream_resumed", {"probes": 2})] == [(n.event, n.fields) for n in d.notes]


def test_refusals_of_different_events_in_a_row_pause_with_every_event_kept() -> None:
    clock = Clock()
    policy = make(clock, pause_after_refusals=3)
    for seq in (1, 2):
        d = answer(clock, policy, Ev(seq), refused(400))
        assert ("keep", [], seq) == (d.action, d.release, policy.held)
        assert ["event_refused_held"] == [n.event for n in d.notes]
        assert "held, kept queued" in (policy.last_error or "")
    d = answer(clock, policy, Ev(3), refused(400))
    assert ("keep", [1, 2, 3], True) == (d.action, d.release, d.release_buffer)
    assert ([], 0, "paused") == (d.dead_letters, policy.held, policy.state)
    assert "HTTP 400 for 3 requests in a row" in (policy.last_error or "")


def test_refusals_with_different_statuses_do_not_add_up_to_a_pause() -> None:
    clock = Clock()
    policy = make(clock, pause_after_refusals=3)
    for seq, status in enumerate((400, 422, 400, 422)):
        assert "keep" == answer(clock, policy, Ev(seq), refused(status)).action
    assert ("ok", 4) == (policy.state, policy.held)


def test_a_delivery_makes_the_held_refusals_dead_letters() -> None:
    clock = Clock()
    policy = make(clock, pause_after_refusals=3)
    held = [Ev(1), Ev(2)]
    for event in held:
        answer(clock, policy, event, refused(422))
    d = answer(clock, policy, Ev(3), OK)
    assert [1, 2] == [event.seq for event, _ in d.dead_letters]
    assert 0 == policy.held


def test_a_refusal_sent_before_a_delivery_was_answered_is_a_dead_letter_at_once() -> None:
    clock = Clock()
    policy = make(clock)
    sent_at = clock.t
    clock.t += 1.0
    answer(clock, policy, Ev(1), OK)
    d = policy.on_answer(Ev(2), refused(400), policy.generation, sent_at, sending=0)
    assert "dead_letter" == d.action  # a delivery came back while it was out: its own fault


def test_a_probe_refused_while_paused_is_kept_and_not_tried_again_first() -> None:
    clock = Clock()
    policy = make(clock, pause_after_refusals=2)
    answer(clock, policy, Ev(1), refused(400))
    answer(clock, policy, Ev(2), refused(400))
    d = answer(clock, policy, Ev(3), refused(400))  # the first probe
    assert ("keep", [3]) == (d.action, d.release)
    assert frozenset({3}) == policy.probed
    assert "HTTP 400 for 3 requests in a row" in (policy.last_error or "")
    policy.forget_probes()
    assert frozenset() == policy.probed


def test_a_429_holds_for_retry_after_then_sending_goes_on() -> None:
    clock = Clock()
    policy = make(clock)
    d = answer(clock, policy, Ev(1), Answer("retry", 429, "HTTP 429", retry_after_s=30.0))
    assert ("keep", [1], True) == (d.action, d.release, d.release_buffer)
    assert ["upstream_rate_limited"] == [n.event for n in d.notes]
    assert ("rate_limited", 30.0) == (policy.state, policy.next_attempt_in_s)
    clock.t += 30.0
    assert "ok" == policy.state
    assert 0.0 == policy.wait_s()


def test_a_429_without_retry_after_holds_until_the_rate_limit_resets() -> None:
    clock = Clock()
    policy = make(clock)
    answer(clock, policy, Ev(1), Answer("retry", 429, "HTTP 429", rate_limit_reset_s=12.0))
    assert 12.0 == policy.next_attempt_in_s


def test_no_hint_holds_longer_than_a_day() -> None:
    clock = Clock()
    policy = make(clock)
    answer(clock, policy, Ev(1), Answer("retry", 429, "HTTP 429", retry_after_s=10 * MAX_HOLD_S))
    assert MAX_HOLD_S == policy.next_attempt_in_s


def test_an_exhausted_rate_limit_budget_holds_until_its_window_resets() -> None:
    clock = Clock()
    policy = make(clock)
    told = Answer("delivered", 202, "", rate_limit_remaining=3, rate_limit_reset_s=10.0)
    answer(clock, policy, Ev(1), told, sending=1)  # one still out: 2 left for new requests
    assert (True, []) == policy.take()
    taken, notes = policy.take()
    assert taken
    assert ["upstream_budget_exhausted"] == [n.event for n in notes]
    assert ("rate_limited", 10.0) == (policy.state, policy.wait_s())
    clock.t += 10.0
    assert 0.0 == policy.wait_s()
    assert "ok" == policy.state
    assert (True, []) == policy.take()  # a new window: unknown until upstream says


@pytest.mark.parametrize("limit", [1, 60, 1_000, 10_000, 600_000])
def test_the_token_bucket_never_allows_more_than_the_limit_in_a_minute(limit: int) -> None:
    clock = Clock()
    policy = make(clock, rate_limit_per_min=limit)
    sent = 0
    for _ in range(limit * 2 + 10):  # a minute of trying as fast as the bucket allows
        if clock.t - 1000.0 > 60.0:
            break
        taken, _ = policy.take()
        if taken:
            sent += 1
        else:
            clock.t += max(policy.token_wait_s(), 1e-6)
    assert 0 < sent <= limit


def test_the_token_bucket_gives_its_burst_then_one_token_per_interval() -> None:
    clock = Clock()
    policy = make(clock, rate_limit_per_min=1_000)
    rate_per_s, burst = rate_budget(1_000)
    assert [True] * burst == [policy.take()[0] for _ in range(burst)]
    assert (False, []) == policy.take()
    assert pytest.approx(1 / rate_per_s) == policy.token_wait_s()
    clock.t += 1 / rate_per_s
    assert policy.take()[0]


def test_without_an_upstream_the_policy_is_disabled() -> None:
    policy = make(Clock(), enabled=False)
    assert ("disabled", True, None) == (policy.state, policy.stopped, policy.next_attempt_in_s)


def test_only_an_event_tried_before_expires_and_never_while_paused() -> None:
    clock = Clock()
    policy = make(clock)
    age_limit = Settings().max_event_age_s
    assert not policy.expired(0, age_limit + 1)  # never tried: it gets its chance
    assert not policy.expired(3, age_limit)
    assert policy.expired(3, age_limit + 1)
    answer(clock, policy, Ev(1), Answer("pause", 401, "HTTP 401"))
    assert not policy.expired(3, age_limit + 1)  # it is the probe


def _delivery_then_failures(
    policy: UpstreamPolicy[Ev], clock: Clock, *, quiet: bool
) -> tuple[Decision[Ev] | None, tuple[object, ...], str]:
    """A plain delivery (through ``on_quiet_delivery`` first when ``quiet``), then
    failures up to one short of a backoff: what a caller can see of the policy after."""
    d = None
    if not (quiet and policy.on_quiet_delivery(OK)):
        d = answer(clock, policy, Ev(50), OK)
    seen: tuple[object, ...] = (
        policy.state,
        policy.hold_until,
        policy.generation,
        policy.held,
        policy.probed,
        policy.next_attempt_in_s,
        policy.send_limit(16),
        policy.answered,
        policy.last_error,
    )
    for seq in range(60, 60 + BACKOFF_AFTER_FAILURES - 1):
        answer(clock, policy, Ev(seq), FAIL)
    return d, seen, policy.state


_BEFORE_A_DELIVERY = {
    "nothing": [],
    "one failure": [FAIL],
    "a backoff": [FAIL] * BACKOFF_AFTER_FAILURES,
    "a refusal held": [refused()],
    "a pause": [Answer("pause", 401, "HTTP 401")],
    "a 429": [Answer("retry", 429, "HTTP 429", retry_after_s=1.0)],
    "a budget told": [
        Answer("delivered", 202, "", rate_limit_remaining=50, rate_limit_reset_s=9.0)
    ],
}


@pytest.mark.parametrize("before", list(_BEFORE_A_DELIVERY))
def test_a_quiet_delivery_leaves_the_policy_as_on_answer_would(before: str) -> None:
    """The flusher asks ``on_quiet_delivery`` first for every answer: where it takes one,
    nothing may differ from what ``on_answer`` decides; where ``on_answer`` would decide
    something (dead letters, a note, the end of a hold), it declines."""
    outcomes: list[tuple[Decision[Ev] | None, tuple[object, ...], str]] = []
    for quiet in (True, False):
        clock = Clock()
        policy = make(clock)
        for i, reply in enumerate(_BEFORE_A_DELIVERY[before]):
            answer(clock, policy, Ev(i + 1, attempts=1), reply)
        clock.t += 2.0  # past a 429's hold
        policy.wait_s()
        outcomes.append(_delivery_then_failures(policy, clock, quiet=quiet))
    (taken_d, taken_seen, taken_after), (d, seen, after) = outcomes
    assert d is not None
    assert (seen, after) == (taken_seen, taken_after)
    if taken_d is None:  # taken quietly: on_answer had nothing to decide
        assert ("delivered", [], [], [], False) == (
            d.action,
            d.release,
            d.dead_letters,
            d.notes,
            d.release_buffer,
        )
    quiet_expected = before in ("nothing", "a budget told")
    assert quiet_expected == (taken_d is None)


def test_a_delivery_that_tells_the_rate_limit_is_not_quiet() -> None:
    policy = make(Clock())
    told = Answer("delivered", 202, "", rate_limit_remaining=0, rate_limit_reset_s=5.0)
    assert not policy.on_quiet_delivery(told)
    assert not policy.on_quiet_delivery(FAIL)
    assert policy.on_quiet_delivery(OK)
    assert policy.answered
