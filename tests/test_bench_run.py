"""``make bench``'s report (``benchmarks/run.py``): what its verdicts are judged from."""

from __future__ import annotations

import copy
import json
from typing import Any

from .conftest import BENCH, load_bench

run = load_bench("run")
#: A whole result as ``make bench`` writes it, whose backlog points the tests replace.
RESULT: dict[str, Any] = json.loads((BENCH / "results" / "bench.json").read_text())


def _verdict(result: dict[str, Any], start: str) -> tuple[str, str, bool]:
    verdicts: list[tuple[str, str, bool]] = run.verdicts(result)
    (found,) = [v for v in verdicts if v[0].startswith(start)]
    return found


def test_backlog_ingest_is_judged_by_the_median_of_its_rounds() -> None:
    """One low window does not fail the backlog's ingest, nor one high window pass it:
    the median of the rounds' shares, each against its own round's empty queue."""
    result = copy.deepcopy(RESULT)
    big = result["backlog"]["points"][-1]
    big["backlog"] = 1_000_000
    big["ingest_rounds"] = [
        {"empty": 10_000.0, "backlog": 8_000.0, "share": 0.80},
        {"empty": 8_000.0, "backlog": 7_600.0, "share": 0.95},
        {"empty": 5_000.0, "backlog": 5_100.0, "share": 1.02},
    ]
    assert (
        "backlog 1,000,000: ingest ≥ 90% of empty (median of rounds)",
        "95% (80-102%)",
        True,
    ) == _verdict(result, "backlog 1,000,000: ingest")
    table = run.markdown(result)
    assert (
        "| backlog 1,000,000: ingest as a share of an empty queue's, by round | 80%, 95%, 102% |"
        in table
    )
    assert "| backlog 1,000,000: ingest @64 (median of 3 rounds) / drain, events/s | 7,600 /" in (
        table
    )
    big["ingest_rounds"][1] |= {"backlog": 6_800.0, "share": 0.85}
    assert ("85% (80-102%)", False) == _verdict(result, "backlog 1,000,000: ingest")[1:]


def test_a_result_from_before_the_rounds_is_judged_by_its_one_window() -> None:
    result = copy.deepcopy(RESULT)
    big = result["backlog"]["points"][-1]
    big.pop("ingest_rounds", None)
    big["backlog"] = 1_000_000
    big["empty"]["ingest"]["events_per_s"] = 8_000.0
    big["ingest"]["events_per_s"] = 7_000.0
    assert ("88%", False) == _verdict(result, "backlog 1,000,000: ingest")[1:]
    assert "| backlog 1,000,000: ingest as a share of an empty queue's, by round | 88% |" in (
        run.markdown(result)
    )
