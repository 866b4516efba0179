"""The fake Valmi API's fault model and rate window, without a server."""

from __future__ import annotations

import pytest

from valmi_sidecar.fake_faults import FaultsError, RateWindow, check_faults


def test_check_faults_accepts_a_valid_change() -> None:
    assert [] == check_faults({"error_rate": 0.5, "error_status": 500, "hang": True})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nope": 1}, "is not a field of Faults"),
        ({"hang": 1}, "must be a boolean"),
        ({"error_status": 1.5}, "must be an integer"),
        ({"error_status": 600}, "must be an HTTP status from 100 to 599"),
        ({"latency_s": "1"}, "must be a number"),
        ({"latency_s": -1}, "must be a finite number >= 0"),
        ({"error_rate": 1.5}, "must be between 0 and 1"),
    ],
)
def test_check_faults_names_the_problem(change: dict[str, object], message: str) -> None:
    problems = check_faults(change)
    assert [next(iter(change))] == [p.field for p in problems]
    assert message in problems[0].message


def test_faults_error_lists_every_problem() -> None:
    err = FaultsError(check_faults({"hang": 1, "error_rate": 2.0}))
    assert "hang: must be a boolean; error_rate: must be between 0 and 1" == str(err)


def test_rate_window_stamps_headers_and_refuses_past_the_budget() -> None:
    window = RateWindow(2, length_s=60.0)
    first: dict[str, str] = {}
    assert window.stamp(first, 100.0, lambda: 1_000.0, take=True)
    assert {
        "X-RateLimit-Limit": "2",
        "X-RateLimit-Remaining": "1",
        "X-RateLimit-Reset": "1060",
    } == first
    assert window.stamp({}, 110.0, lambda: 1_010.0, take=True)
    refused: dict[str, str] = {}
    assert not window.stamp(refused, 130.0, lambda: 1_030.0, take=True)
    assert "30" == refused["Retry-After"]
    assert "0" == refused["X-RateLimit-Remaining"]


def test_rate_window_without_take_spends_nothing() -> None:
    window = RateWindow(1, length_s=60.0)
    headers: dict[str, str] = {}
    assert window.stamp(headers, 5.0, lambda: 0.0, take=False)
    assert "1" == headers["X-RateLimit-Remaining"]
    assert "Retry-After" not in headers


def test_rate_window_budget_comes_back_in_the_next_window() -> None:
    window = RateWindow(1, length_s=60.0)
    assert window.take(0.0)
    assert not window.take(59.0)
    assert window.take(125.0)
    assert 55.0 == window.ends_in(125.0)
