"""The floor benchmark's instrument (``benchmarks/floor.py``, ``benchmarks/floor_stats.py``):
the floor checks bodies exactly as the sidecar does, answers only after its commit and
forwards each event once with a stable key; the CPU reading counts threads that ended;
the rounds' medians, ranges and ratios are what the table says."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valmi_sidecar import events
from valmi_sidecar.events import ValidationError, parse_one
from valmi_sidecar.fake_api import FakeValmi

from .conftest import ACTION, BENCH, DEFAULT_KEY, OUTCOME, load_bench, wait_until

NOW = 1_765_000_000.25


floor = load_bench("floor")
stats = load_bench("floor_stats")
parts = load_bench("commit_parts")
kernel_counts = load_bench("kernel_counts")
compare = load_bench("floor_compare")
instructions = load_bench("instructions")


# -- the body check: the sidecar's, exactly ----------------------------------------------


def _same_as_sidecar(kind: events.Kind, raw: bytes) -> None:
    created_at = events.rfc3339(NOW)
    try:
        expected = parse_one(kind, raw, now=NOW).body
    except ValidationError as exc:
        with pytest.raises(ValidationError) as info:
            floor.upstream_body(kind, raw, created_at)
        assert [p.as_dict() for p in exc.problems] == [p.as_dict() for p in info.value.problems]
        return
    assert expected == floor.upstream_body(kind, raw, created_at)


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        ("action", json.dumps(ACTION).encode()),
        ("outcome", json.dumps(OUTCOME).encode()),
        ("action", json.dumps({**ACTION, "timestamp": None}).encode()),
        ("action", json.dumps({**ACTION, "timestamp": "2026-01-15T10:30:00Z"}).encode()),
        ("action", json.dumps({**ACTION, "agent_key": "é"}, ensure_ascii=True).encode()),
        ("action", b'{"agent_key":"a","agent_key":"b","action_type":"llm_call"}'),
        ("action", b'{"agent_key":"a","action_type":"llm_call","metadata":{"n":1e400}}'),
        ("action", b'{"agent_key":"\xff","action_type":"llm_call"}'),
        ("action", b"[1, 2]"),
        ("action", b"{"),
        ("outcome", b'{"agent_key":"a","outcome_type":"x","value":1.0E2}'),
        ("action", b'{"agent_key":"a","action_type":"llm_call","extra":1}'),
    ],
)
def test_floor_accepts_and_refuses_what_the_sidecar_does(kind: events.Kind, raw: bytes) -> None:
    """Same upstream body byte for byte, or the same problems."""
    _same_as_sidecar(kind, raw)


_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
)


def _mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` four times in five, else any JSON value: most bodies are accepted."""
    return st.tuples(st.integers(0, 4), good, _values).map(lambda t: t[1] if t[0] else t[2])


_names = _mostly(st.text(min_size=1, max_size=8))
_optional = {
    "metadata": _mostly(st.dictionaries(st.text(max_size=4), _values, max_size=3)),
    "timestamp": _mostly(st.sampled_from(["2026-01-15T10:30:00Z", "2026-01-15", None])),
}
_bodies: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "action": st.fixed_dictionaries(
        {"agent_key": _names, "action_type": _names}, optional=_optional
    ),
    "outcome": st.fixed_dictionaries(
        {"agent_key": _names, "outcome_type": _names, "value": _mostly(st.floats())},
        optional=_optional,
    ),
}


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    kind=st.sampled_from(events.KINDS),
    spacing=st.sampled_from([(",", ":"), (", ", ": ")]),
    ascii_only=st.booleans(),
    extra=st.integers(0, 9),
    repeat=st.integers(0, 9),
)
def test_any_body_gets_the_sidecars_answer_from_the_floor(
    data: st.DataObject,
    kind: events.Kind,
    spacing: tuple[str, str],
    ascii_only: bool,
    extra: int,
    repeat: int,
) -> None:
    obj = data.draw(_bodies[kind])
    if extra == 0:
        obj["x"] = 1  # not a field of either kind
    raw = json.dumps(obj, separators=spacing, ensure_ascii=ascii_only).encode()
    if repeat == 0:
        name = next(iter(obj))
        raw = raw[:1] + json.dumps(name).encode() + b":0," + raw[1:]  # a key named twice
    _same_as_sidecar(kind, raw)


# -- the floor as a process ---------------------------------------------------------------


class FloorProcess:
    def __init__(self, data_dir: Path, api_url: str, *, api_key: str | None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VALMI")}
        if api_key is not None:
            env["VALMI_API_KEY"] = api_key
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"floor-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, str(BENCH / "floor.py"), "--listen", "127.0.0.1:0"),
                *("--data-dir", str(data_dir), "--api-url", api_url),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.url = ""

    async def wait_ready(self) -> str:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"the floor exited: {self.log_path.read_text()}")
            for line in self.log_path.read_text().splitlines():
                if '"floor_ready"' in line:
                    self.url = "http://" + json.loads(line)["listen"]
                    return True
            return False

        await wait_until(ready, 20, "floor_ready")
        return self.url

    def rows(self) -> int:
        db = sqlite3.connect(self.data_dir / "floor.db")
        try:
            return int(db.execute("SELECT count(*) FROM events").fetchone()[0])
        finally:
            db.close()

    async def no_rows(self) -> bool:
        """Every delivery recorded: the queue's table is empty."""
        return await asyncio.to_thread(self.rows) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def floors(tmp_path: Path) -> Iterator[list[FloorProcess]]:
    """Floor processes a test starts; any still running are killed at the end."""
    started: list[FloorProcess] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()


async def _post(client: httpx.AsyncClient, url: str, body: bytes, **headers: str) -> httpx.Response:
    return await client.post(
        url, content=body, headers={"Content-Type": "application/json", **headers}
    )


async def test_floor_forwards_each_acknowledged_event_once_under_its_id(
    tmp_path: Path, fake: FakeValmi, floors: list[FloorProcess]
) -> None:
    floors.append(FloorProcess(tmp_path / "data", fake.url, api_key=DEFAULT_KEY))
    url = await floors[0].wait_ready()
    async with httpx.AsyncClient() as client:
        answers = [
            await _post(client, url + "/v1/actions", json.dumps(ACTION).encode()) for _ in range(4)
        ]
        answers.append(await _post(client, url + "/v1/outcomes", json.dumps(OUTCOME).encode()))
    assert [202] * 5 == [a.status_code for a in answers]
    ids = {a.json()["id"] for a in answers}
    await wait_until(lambda: len(fake.events()) == 5, 10, "five events upstream")
    assert ids == {r.idem_key for r in fake.events()}
    assert [1] * 5 == [r.attempts for r in fake.events()]
    await wait_until(floors[0].no_rows, 10, "deliveries recorded")


async def test_floor_refuses_what_the_sidecar_refuses_and_sends_none_of_it(
    tmp_path: Path, fake: FakeValmi, floors: list[FloorProcess]
) -> None:
    floors.append(FloorProcess(tmp_path / "data", fake.url, api_key=DEFAULT_KEY))
    url = await floors[0].wait_ready() + "/v1/actions"
    async with httpx.AsyncClient() as client:
        twice = await _post(client, url, b'{"agent_key":"a","agent_key":"b","action_type":"x"}')
        bad_key = await _post(
            client, url, json.dumps(ACTION).encode(), **{"Idempotency-Key": "k" * 256}
        )
        plain = await client.post(url, content=json.dumps(ACTION).encode())
        good = await _post(client, url, json.dumps(ACTION).encode())
    assert (400, "invalid_request") == (twice.status_code, twice.json()["error"]["code"])
    assert (400, "invalid_idempotency_key") == (
        bad_key.status_code,
        bad_key.json()["error"]["code"],
    )
    assert 415 == plain.status_code
    assert 202 == good.status_code
    await wait_until(lambda: len(fake.events()) >= 1, 10, "the good event upstream")
    assert [good.json()["id"]] == [r.idem_key for r in fake.events()]


async def test_floor_sends_what_a_kill_left_with_the_same_keys(
    tmp_path: Path, fake: FakeValmi, floors: list[FloorProcess]
) -> None:
    data = tmp_path / "data"
    floors.append(FloorProcess(data, fake.url, api_key=None))  # no key: nothing forwarded
    url = await floors[0].wait_ready()
    async with httpx.AsyncClient() as client:
        answers = [
            await _post(
                client,
                url + "/v1/actions",
                json.dumps(ACTION).encode(),
                **{"Idempotency-Key": f"k{i}"},
            )
            for i in range(3)
        ]
    assert [202] * 3 == [a.status_code for a in answers]
    floors[0].proc.send_signal(signal.SIGKILL)
    await wait_until(lambda: floors[0].proc.poll() is not None, 10, "the floor killed")
    assert 3 == await asyncio.to_thread(floors[0].rows)
    floors.append(FloorProcess(data, fake.url, api_key=DEFAULT_KEY))
    await floors[1].wait_ready()
    await wait_until(lambda: len(fake.events()) == 3, 10, "the left events upstream")
    assert {"k0", "k1", "k2"} == {r.idem_key for r in fake.events()}
    await wait_until(floors[1].no_rows, 10, "deliveries recorded")


# -- CPU readings ---------------------------------------------------------------------------


def _sample_after_spinning(script: str) -> Any:
    """Run ``script`` in a child Python, sample its CPU once the script is done, then end
    it (the child stays alive until then, so its threads can still be read)."""
    script += "print('spun', flush=True)\nsys.stdin.read()\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert "spun\n" == proc.stdout.readline()
        return stats.cpu_sample(proc.pid)
    finally:
        proc.communicate("")


#: The start of a child's script: ``spin(s)`` burns ``s`` seconds of its thread's CPU.
_SPIN = (
    "import threading, time, sys\n"
    "def spin(seconds):\n"
    "    end = time.thread_time() + seconds\n"
    "    while time.thread_time() < end: pass\n"
)


def test_process_clock_counts_a_thread_that_ended_and_the_thread_sum_does_not() -> None:
    """Why floor_compare reports the process's CPU-time clock: a thread that spun for
    0.3 s and ended is in it, and gone from /proc/<pid>/task/*/schedstat."""
    script = _SPIN + (
        "t = threading.Thread(target=spin, args=(0.3,)); t.start(); t.join()\n"
        # join() returns when Python is done with the thread, a moment before the kernel
        # takes it off /proc/self/task: wait for that (with a deadline), else it is sampled.
        "import os\n"
        "end = time.monotonic() + 10\n"
        "while len(os.listdir('/proc/self/task')) > 1 and time.monotonic() < end:\n"
        "    time.sleep(0.001)\n"
    )
    sample = _sample_after_spinning(script)
    assert sample.process_ns >= 300_000_000
    assert sample.process_ns - sample.threads_ns >= 300_000_000
    assert 1 == sample.threads


def test_cpu_sample_tells_the_main_threads_time_from_the_others() -> None:
    """The main thread spins 0.2 s and a live second thread spins 0.2 s: each side holds
    its own 0.2 s."""
    script = _SPIN + (
        "done = threading.Event()\n"
        "def side(): spin(0.2); done.set(); sys.stdin.read()\n"
        "threading.Thread(target=side, daemon=True).start()\n"
        "done.wait(); spin(0.2)\n"
    )
    sample = _sample_after_spinning(script)
    assert sample.main_ns >= 200_000_000
    assert sample.threads_ns - sample.main_ns >= 200_000_000
    assert sample.main_ns < sample.threads_ns <= sample.process_ns


def test_cpu_spent_is_in_seconds_by_each_reading() -> None:
    before = stats.CpuSample(process_ns=1_000_000_000, threads_ns=900_000_000, ticks=100, threads=3)
    after = stats.CpuSample(
        process_ns=1_500_000_000, threads_ns=1_300_000_000, ticks=150, threads=4
    )
    spent = stats.cpu_spent(before, after)
    assert 0.0 == spent["cpu_main_s"]  # not read in these samples
    assert 0.5 == spent["cpu_s"]
    assert pytest.approx(0.4) == spent["cpu_threads_s"]
    assert 50 / stats.CLK_TCK == spent["cpu_ticks_s"]


# -- over rounds ------------------------------------------------------------------------------


def test_spread_shows_the_median_and_the_range_unless_they_agree() -> None:
    assert "1,058 (1,000-1,200)" == stats.Spread.of([1200.0, 1000.0, 1058.0]).show()
    assert "52" == stats.Spread.of([52.0]).show()
    assert "1.68" == stats.Spread.of([1.68, 1.681]).show(2)


def test_spread_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        stats.Spread.of([])


def _run(
    target: str, point: str, n: int, us: float, eps: float = 0.0, p99: float = 1.0
) -> dict[str, Any]:
    return {
        "target": target,
        "point": point,
        "round": n,
        "us_per_event": us,
        "events_per_s": eps,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
    }


def test_ratios_pair_each_round_with_the_same_round() -> None:
    """Round 0: 2.0; round 1: 1.0. Ratios of medians (1.5 / 1.5 = 1.0) would hide both."""
    runs = [
        _run("floor", "10", 0, 1000.0),
        _run("sidecar", "10", 0, 2000.0),
        _run("floor", "10", 1, 2000.0),
        _run("sidecar", "10", 1, 2000.0),
    ]
    summary = stats.summarize(runs, ["10"])
    assert {"median": 1.5, "low": 1.0, "high": 2.0} == summary["ratios"]["cpu_sidecar_over_floor"][
        "10"
    ]
    assert {"median": 1500.0, "low": 1000.0, "high": 2000.0} == summary["cells"]["floor"]["10"][
        "us_per_event"
    ]


def test_verdicts_and_table_name_the_issues_targets() -> None:
    runs = [
        _run("floor", "1000", 0, 500.0, p99=1.0),
        _run("sidecar", "1000", 0, 550.0, p99=3.0),
        _run("bare", "1000", 0, 70.0, p99=0.5),
        _run("floor", "closed", 0, 50.0, eps=20_000.0),
        _run("sidecar", "closed", 0, 100.0, eps=16_000.0),
        _run("bare", "closed", 0, 50.0, eps=20_000.0),
    ]
    summary = stats.summarize(runs, ["1000", "closed"])
    assert [
        ("CPU per event ≤ 1.2 x the floor's (1,000 ev/s)", "1.10", True),
        ("CPU per event ≤ 1.2 x the floor's (closed loop, ingest only)", "2.00", False),
        ("durable ingest, closed loop ≥ 75% of bare aiohttp's events/s", "0.80", True),
        ("p99 at 1,000 ev/s paced ≤ 2 x the floor's", "3.00", False),
    ] == stats.verdicts(summary)
    table = stats.markdown(summary, ["1000", "closed"], "header")
    assert "| ratio sidecar / floor | 1.10 | 2.00 |" in table
    assert "Closed loop, sidecar events/s ÷ bare aiohttp's: 0.80; the floor's: 1.00." in table
    assert "| bare aiohttp, receive only | 70 µs | 50 µs, 20,000 ev/s |" in table
    assert (
        "p50/p99 at 1,000 ev/s paced: floor 0.5/1.0 ms, sidecar 1.5/3.0 ms, bare 0.2/0.5 ms."
        in table
    )


def test_the_table_splits_off_the_event_loops_thread_when_the_runs_carry_it() -> None:
    runs = [
        {**_run("floor", "100", 0, 1000.0), stats.LOOP: 800.0},
        {**_run("sidecar", "100", 0, 1500.0), stats.LOOP: 1100.0},
        _run("bare", "100", 0, 400.0),
    ]
    summary = stats.summarize(runs, ["100"])
    table = stats.markdown(summary, ["100"], "header")
    assert "| of which the event loop's thread, floor / sidecar | 800 µs / 1,100 µs |" in table
    older = stats.markdown(stats.summarize([_run("floor", "100", 0, 1.0)], ["100"]), ["100"], "")
    assert "event loop's thread" not in older  # runs saved before the split was read


def test_the_floor_against_itself_tells_a_verdict_from_the_runs_noise() -> None:
    """At 10 ev/s the floor's second process reads 10% from its first in one round, and
    the sidecar's 1.20 cannot be told from 1.2; at 100 ev/s the floor reads within 2% of
    itself, and the sidecar's 1.50 is a miss beyond doubt."""
    again = stats.CONTROL
    runs = [
        _run("floor", "10", 0, 1000.0),
        _run(again, "10", 0, 1100.0),
        _run("sidecar", "10", 0, 1250.0),
        _run("floor", "10", 1, 1000.0),
        _run(again, "10", 1, 950.0),
        _run("sidecar", "10", 1, 1150.0),
        _run("floor", "100", 0, 1000.0),
        _run(again, "100", 0, 1020.0),
        _run("sidecar", "100", 0, 1500.0),
        _run("floor", "100", 1, 1000.0),
        _run(again, "100", 1, 990.0),
        _run("sidecar", "100", 1, 1500.0),
    ]
    summary = stats.summarize(runs, ["10", "100"])
    noise_10 = stats.cpu_noise(summary, "10")
    noise_100 = stats.cpu_noise(summary, "100")
    assert noise_10 is not None
    assert noise_100 is not None
    assert pytest.approx(0.1) == noise_10[0]
    assert not noise_10[1]
    assert pytest.approx(0.02) == noise_100[0]
    assert noise_100[1]
    table = stats.markdown(summary, ["10", "100"], "header")
    assert "| ratio floor again / floor (nothing differs: the run's noise) | " in table
    assert "| CPU per event ≤ 1.2 x the floor's (10 ev/s) | 1.20 (1.15-1.25) | yes, within" in table
    assert "| CPU per event ≤ 1.2 x the floor's (100 ev/s) | 1.50 | **no** |" in table
    without = stats.summarize([r for r in runs if r["target"] != again], ["10"])
    assert stats.cpu_noise(without, "10") is None
    assert "floor again" not in stats.markdown(without, ["10"], "header")


def test_the_closed_loop_and_the_p99_are_told_from_the_runs_noise_too() -> None:
    """The floor's p99 reads from 0.4 to 1.5 of itself between its two processes, so the
    sidecar's 1.5 times the floor's cannot be told from the bound of 2; its events/s in the
    closed loop read within 2% of itself, so a share of 0.60 of bare aiohttp's is a miss
    beyond doubt."""
    again = stats.CONTROL
    runs = []
    for n, (floor_p99, again_p99) in enumerate([(2.0, 3.0), (5.0, 2.0)]):
        runs += [
            _run("floor", "1000", n, 500.0, p99=floor_p99),
            _run(again, "1000", n, 500.0, p99=again_p99),
            _run("sidecar", "1000", n, 550.0, p99=1.5 * floor_p99),
            _run("bare", "1000", n, 70.0, p99=0.5),
            _run("floor", "closed", n, 50.0, eps=15_000.0),
            _run(again, "closed", n, 50.0, eps=15_300.0 - 600 * n),
            _run("sidecar", "closed", n, 60.0, eps=12_000.0),
            _run("bare", "closed", n, 50.0, eps=20_000.0),
        ]
    summary = stats.summarize(runs, ["1000", "closed"])
    p99 = stats.other_noise(summary, "p99_sidecar_over_floor")
    rate = stats.other_noise(summary, "events_per_s_sidecar_over_bare")
    assert p99 is not None
    assert rate is not None
    assert (pytest.approx(0.6), False) == p99
    assert (pytest.approx(0.02), True) == rate
    table = stats.markdown(summary, ["1000", "closed"], "header")
    assert "| p99 at 1,000 ev/s paced ≤ 2 x the floor's | 1.50 | yes, within the noise |" in table
    assert (
        "| durable ingest, closed loop ≥ 75% of bare aiohttp's events/s | 0.60 | **no** |" in table
    )
    assert "its events/s in the closed loop 1.00 (0.98-1.02) (±2%)" in table
    assert "its p99 0.95 (0.40-1.50) (±60%)" in table
    alone = stats.summarize([r for r in runs if r["target"] != again], ["1000", "closed"])
    assert stats.other_noise(alone, "p99_sidecar_over_floor") is None
    assert "within the noise" not in stats.markdown(alone, ["1000", "closed"], "header")


def test_old_against_new_pairs_each_also_tree_with_the_sidecar_of_its_round() -> None:
    """``floor_compare.py --also SRC``: another tree's sidecar, run in the same rounds, is
    read against the sidecar of the same round (CPU at each point, the p99 at the highest
    rate), and the table names the tree; the issue's verdicts stay the sidecar's."""
    old = stats.also_target(1)
    runs = []
    for n, scale in enumerate([1.0, 2.0]):
        runs += [
            _run("floor", "1000", n, 500.0 * scale, p99=2.0),
            _run("sidecar", "1000", n, 600.0 * scale, p99=3.0 * scale),
            _run(old, "1000", n, 660.0 * scale, p99=4.5 * scale),
            _run("floor", "closed", n, 50.0 * scale, eps=15_000.0),
            _run("sidecar", "closed", n, 55.0 * scale, eps=12_000.0),
            _run(old, "closed", n, 44.0 * scale, eps=12_500.0),
        ]
    summary = stats.summarize(runs, ["1000", "closed"], [old])
    found = summary["also"][old]
    assert pytest.approx(1.1) == found["cpu"]["1000"]["median"]
    assert pytest.approx(0.8) == found["cpu"]["closed"]["median"]
    assert pytest.approx(1.5) == found["p99"]["median"]
    assert pytest.approx(1.2) == summary["ratios"]["cpu_sidecar_over_floor"]["1000"]["median"]
    found["source"] = "before"
    table = stats.markdown(summary, ["1000", "closed"], "header")
    assert f"| {old} (`before`) | 990 (660-1,320) | 66 (44-88) |" in table
    assert f"| ratio {old} / sidecar | 1.10 | 0.80 |" in table
    assert "(p99 1.50 of the sidecar's)" in table
    assert "Old against new" not in stats.markdown(
        stats.summarize(runs, ["1000", "closed"]), ["1000", "closed"], "header"
    )


def test_a_source_tree_given_as_also_is_the_package_its_process_imports(tmp_path: Path) -> None:
    """``--also SRC`` runs the sidecar with ``PYTHONPATH=SRC``: the copy, not the
    installed package, is what it imports; a directory without the package is refused."""
    run_mod = load_bench("run")
    src = tmp_path / "old"
    (src / "valmi_sidecar").mkdir(parents=True)
    (src / "valmi_sidecar" / "__init__.py").write_text("OLD = True\n")
    code = "import valmi_sidecar; print(valmi_sidecar.__file__, valmi_sidecar.OLD)"
    cmd = [*run_mod.from_source(src), sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    assert f"{src / 'valmi_sidecar' / '__init__.py'} True" == out.strip()
    with pytest.raises(SystemExit, match="no valmi_sidecar package there"):
        run_mod.check_also([tmp_path])


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_rounds_vary_which_target_runs_first_and_after_which(k: int) -> None:
    """Over a cycle of rounds (``k``, twice that for an odd ``k``) every target runs once
    in every place, and right after every other target as often as after any."""
    targets = [f"t{i}" for i in range(k)]
    cycle = k if k % 2 == 0 else 2 * k
    orders = [compare.round_order(targets, n) for n in range(2 * cycle)]
    assert all(sorted(o) == targets for o in orders)
    assert orders[:cycle] == orders[cycle:]  # then it repeats
    for place in range(k):
        seen = collections.Counter(o[place] for o in orders[:cycle])
        assert set(seen.values()) == {cycle // k}, (place, seen)
    followed = collections.Counter((o[i - 1], o[i]) for o in orders[:cycle] for i in range(1, k))
    assert len(followed) == k * (k - 1)
    assert len(set(followed.values())) == 1, followed


# Two threads' dumps of one window as callgrind writes them (format 1, --separate-threads,
# --compress-strings): names spelled out once, in the first file that uses them.
_LOOP_DUMP = """version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  python floor.py
part: 1

thread: 1

positions: line
events: Ir
summary: 1600
ob=(1) /usr/lib/libpython3.11.so.1.0
fl=(1) ceval.c
fn=(1) _PyEval_EvalFrameDefault
10 500
+2 300
cob=(2) /usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6
cfl=(2) ???
cfn=(2) sqlite3_step
calls=3 0
12 700
ob=(2)
fl=(2)
fn=(2)
0 600
ob=(3) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(3) ???
fn=(3) memset
* 200
totals: 1600
"""
_WRITER_DUMP = """version: 1
part: 1

thread: 3

events: Ir
ob=(2)
fl=(2)
fn=(2)
0 900
ob=(1)
fl=(1)
fn=(1)
5 100
cob=(3)
cfi=(3)
cfn=(4) fdatasync
calls=2 0
6 10
ob=(3)
fl=(3)
fn=(4)
0 10
totals: 1010
"""


def test_callgrind_dumps_are_read_per_thread_and_shared_object(tmp_path: Path) -> None:
    """Each cost line counts once, where it is spent: the 700 after ``calls=`` is the
    callee's (already in its own 600: callgrind's sums are the files' totals), and a name
    given by id in the writer's file was spelled out in the loop's."""
    (tmp_path / "floor.callgrind.4242.1-03").write_text(_WRITER_DUMP)
    (tmp_path / "floor.callgrind.4242.1-01").write_text(_LOOP_DUMP)
    loop = instructions.parse_dump(_LOOP_DUMP.splitlines())
    assert 1 == loop.thread
    assert 1600 == loop.total == sum(loop.by_object.values())
    assert 0 == loop.syncs
    assert 800 == loop.by_object["/usr/lib/libpython3.11.so.1.0"]
    counts = instructions.read_dumps(sorted(tmp_path.iterdir(), reverse=True))
    assert {
        "loop": 1600,
        "others": 1010,
        "all": 2610,
        "the interpreter": 900,
        "SQLite": 1500,
        "libc": 210,
        "syncs": 2,  # the writer's two calls to fdatasync, named by id in its own file
    } == counts
    assert "the rest" == instructions.object_group("/x/_http_parser.cpython-311.so")


def test_the_instruction_table_divides_by_events_and_compares_with_the_floor() -> None:
    floor = {"events": 10, "all": 10_000, "loop": 8_000, "others": 2_000, "SQLite": 1_000}
    floor["syncs"] = 10
    sidecar = {"events": 20, "all": 30_000, "loop": 20_000, "others": 10_000, "SQLite": 6_000}
    sidecar["syncs"] = 10
    table = instructions.markdown({"floor": floor, "sidecar": sidecar})
    assert "| floor | 1,000 | 800 | 200 | 0 | 100 | 0 | 0 | 1.00 |" in table
    assert "| sidecar | 1,500 | 1,000 | 500 | 0 | 300 | 0 | 0 | 0.50 |" in table
    assert "| sidecar / floor | 1.50 | 1.25 | 2.50 |" in table
    before = {"events": 10, "all": 16_000, "loop": 10_000, "others": 6_000, "SQLite": 3_000}
    ab = instructions.markdown({"floor": floor, "sidecar": sidecar, "sidecar from old": before})
    assert "| sidecar from old | 1,600 | 1,000 | 600 | 0 | 300 | 0 | 0 | 0.00 |" in ab
    assert "| sidecar from old / floor | 1.60 |" in ab
    assert "| sidecar from old / sidecar | 1.07 | 1.00 | 1.20 |" in ab
    closed = instructions.markdown({"floor": floor, "sidecar": sidecar}, "acknowledged request")
    assert closed.startswith("| instructions per acknowledged request | all |")
    assert "| sidecar / floor | 1.50 | 1.25 | 2.50 |" in closed


def test_valgrind_starts_the_interpreter_itself(tmp_path: Path) -> None:
    """valgrind does not follow an exec: ``env`` (for another source tree) must come
    before it, and the interpreter right after its own options."""
    plain = instructions.command(tmp_path / "x")
    assert "valgrind" == plain[0]
    assert f"--callgrind-out-file={tmp_path / 'x'}.%p" == plain[-2]
    other = instructions.command(tmp_path / "x", tmp_path / "old")
    assert ("env", f"PYTHONPATH={tmp_path / 'old'}", "valgrind") == other[:3]
    assert plain[-1] == other[-1]
    assert "python" in Path(other[-1]).name


def _run_script(name: str, *args: str) -> str:
    """Run a script of ``benchmarks/`` to its end (it must succeed); its standard output."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert 0 == proc.returncode, proc.stderr
    return proc.stdout


def test_writer_cost_measures_both_threads_of_the_store_and_of_the_floor(
    tmp_path: Path,
) -> None:
    """``benchmarks/writer_cost.py`` finds the store's writer thread by its name and
    gets one commit per group (else it stops with an error), and drives the floor's own
    writer the same way: a few groups each way."""
    stdout = _run_script(
        "writer_cost.py", "--groups", "30", "--rounds", "1", "--dir", str(tmp_path)
    )
    figures = {}
    for line in stdout.splitlines()[1:]:
        name, _, rest = line.partition(":")
        figures[name.strip()] = float(rest.split()[0])
    assert {
        "store, writer thread",
        "store, event loop",
        "floor, writer thread",
        "floor, event loop",
        "floor SQL",
    } == set(figures)
    assert all(v > 0 for v in figures.values())
    assert [] == list(tmp_path.iterdir())  # its files are gone


def test_calls_counts_each_targets_calls_per_event_by_origin() -> None:
    """``benchmarks/calls.py`` profiles a window of the floor and of the sidecar, each
    forwarding to the fake API, and counts the calls per delivered event by where the
    function lives."""
    stdout = _run_script("calls.py", "--rate", "20", "--seconds", "1", "--top", "3")
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("floor", "sidecar"):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    assert {"floor", "sidecar"} == set(rows)
    for total, own, aiohttp, *rest in rows.values():
        assert own > 0
        assert aiohttp > 0
        assert abs(total - (own + aiohttp + sum(rest))) < 0.5  # the columns add up
    listed = [line for line in stdout.splitlines() if line.startswith("- ")]
    assert 3 == len(listed)
    assert all(".py:" in line for line in listed)


def test_opcodes_counts_each_targets_bytecode_per_event_by_thread_and_origin() -> None:
    """``benchmarks/opcodes.py`` traces a window of the floor and of the sidecar, each
    forwarding to the fake API, and counts the bytecode instructions per delivered event
    on the event loop's thread and the others, by where the code lives; it lists the
    sidecar's own functions that execute most on each."""
    stdout = _run_script("opcodes.py", "--rate", "20", "--seconds", "1", "--top", "3")
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("floor", "sidecar"):
            rows[cells[0]] = [float(c.replace(",", "")) for c in cells[1:]]
    assert {"floor", "sidecar"} == set(rows)
    for _total, loop_own, loop_aiohttp, _, _, others_own, *_ in rows.values():
        assert loop_own > 0
        assert loop_aiohttp > 1_000  # a request served and one sent, each event
        assert others_own > 0  # the writer's thread
    for total, *columns in rows.values():
        assert abs(total - sum(columns)) <= len(columns)  # the columns add up (rounded)
    listed = [line for line in stdout.splitlines() if line.startswith("- ")]
    assert 6 == len(listed)  # the top 3 of each thread
    assert all(".py:" in line for line in listed)


def test_kernel_counts_reads_each_targets_writes_and_switches_per_event(tmp_path: Path) -> None:
    """``benchmarks/kernel_counts.py`` reads the kernel's counters of every thread of the
    floor and of the sidecar around a window of forwarded events: the event loop's
    thread makes two write calls an event (the ``202`` and the upstream POST), the
    others at least one (the WAL's frames), and the data directories are gone after."""
    stdout = _run_script(
        "kernel_counts.py", "--rate", "20", "--seconds", "1", "--dir", str(tmp_path)
    )
    rows: dict[str, list[list[float]]] = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("floor", "sidecar"):
            rows[cells[0]] = [[float(x.replace(",", "")) for x in c.split("/")] for c in cells[1:]]
    assert {"floor", "sidecar"} == set(rows)
    for (disk,), (loop_writes, other_writes), voluntary, _ in rows.values():
        assert disk >= 0
        assert 1.5 <= loop_writes <= 3
        assert other_writes >= 1
        assert sum(voluntary) > 0
    assert [] == list(tmp_path.iterdir())


def test_kernel_counts_split_the_loops_thread_from_the_others() -> None:
    """A thread's counters are taken from the first sample; one that started in between
    counts from zero; the event loop's thread is the process's own id."""
    counts = kernel_counts.Counts
    before = {10: counts(5, 4096, 3, 1), 11: counts(7, 0, 2, 0)}
    after = {10: counts(9, 8192, 4, 1), 11: counts(10, 4096, 5, 2), 12: counts(1, 0, 1, 0)}
    spent = kernel_counts.spent(10, before, after)
    assert counts(4, 4096, 1, 0) == spent["loop"]
    assert counts(4, 4096, 4, 2) == spent["others"]
    io = (Path("/proc/self/task") / str(threading.get_native_id()) / "io").read_text()
    fields = kernel_counts.parse_fields(io, ("syscw", "write_bytes"))
    assert fields["syscw"] >= 0
    with pytest.raises(SystemExit, match="no nowhere"):
        kernel_counts.parse_fields(io, ("nowhere",))


@pytest.mark.parametrize(
    ("variant", "keys", "ledger"),
    [
        ("event row", 0, 0),
        ("+ key row (the store)", 1, 0),
        ("+ ledger row", 0, 1),
        ("+ both (before v5)", 1, 1),
    ],
)
def test_commit_parts_writes_the_rows_each_variant_names(
    tmp_path: Path, variant: str, keys: int, ledger: int
) -> None:
    """``benchmarks/commit_parts.py`` times what it says: every commit writes its event
    row, and its key row and ledger row only in the variants that name them."""
    cpu_us, frames = parts.run(tmp_path, variant, 20)
    commits = parts.WARM_UP + 20 + parts.FRAME_COMMITS
    db = sqlite3.connect(tmp_path / "queue.db")
    try:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == commits
        assert db.execute("SELECT count(*) FROM keys").fetchone()[0] == keys * commits
        received = db.execute("SELECT coalesce(sum(received), 0) FROM ledger").fetchone()[0]
        assert received == ledger * commits
    finally:
        db.close()
    assert cpu_us > 0
    # Each commit appends at least the events table's page to the WAL, one more each for
    # a key row and a ledger row.
    assert frames >= 1 + keys + ledger


def _saved(runs: list[dict[str, Any]], started: str) -> dict[str, Any]:
    return {"started": started, "command": "benchmarks/floor_compare.py", "runs": runs}


def test_pooled_runs_keep_each_results_rounds_apart() -> None:
    """Round 0 of one run pairs with its own round 0, not another run's: the sidecar read
    2.0 and 1.0 of the floor in the two runs, so the pooled median is 1.5 (pairing across
    runs would make 1.0 and 0.5 out of nothing). An ``--also`` tree of one run is not
    another's: left out."""
    first = _saved(
        [
            _run("floor", "closed", 0, 100.0),
            _run("sidecar", "closed", 0, 200.0),
            _run(stats.also_target(1), "closed", 0, 150.0),
        ],
        "first",
    )
    second = _saved(
        [
            _run("floor", "1000", 0, 400.0),
            _run("sidecar", "1000", 0, 400.0),
            _run("floor", "closed", 0, 200.0),
            _run("sidecar", "closed", 0, 200.0),
            _run("floor", "10", 1, 1000.0),
            _run("sidecar", "10", 1, 1300.0),
        ],
        "second",
    )
    runs, points = stats.pooled([first, second])
    assert ["10", "1000", "closed"] == points
    assert {0, 1, 2} == {r["round"] for r in runs}
    assert not any(r["target"].startswith(stats.ALSO_PREFIX) for r in runs)
    summary = stats.summarize(runs, points)
    closed = summary["ratios"]["cpu_sidecar_over_floor"]["closed"]
    assert {"median": 1.5, "low": 1.0, "high": 2.0} == closed
    assert pytest.approx(1.3) == summary["ratios"]["cpu_sidecar_over_floor"]["10"]["median"]


def test_pool_prints_the_table_of_saved_runs_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    """``floor_compare.py --pool A B``: measures nothing, prints the rounds of both runs
    as one table with its verdicts; a file that is not a saved run is named, not a
    traceback."""
    a, b, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    for n, (path, us) in enumerate([(a, 1100.0), (b, 1300.0)]):
        runs = [_run("floor", "1000", 0, 1000.0, p99=2.0), _run("sidecar", "1000", 0, us, p99=3.0)]
        path.write_text(json.dumps(_saved(runs, f"run {n}")))
    bad.write_text(json.dumps({"cells": {}}))
    cmd = [sys.executable, str(BENCH / "floor_compare.py"), "--pool"]
    done = subprocess.run(
        [*cmd, str(a), str(b)], check=False, capture_output=True, text=True, timeout=60
    )
    assert 0 == done.returncode, done.stderr
    assert "The rounds of 2 runs taken together, 2 in all" in done.stdout
    assert "run 0, `benchmarks/floor_compare.py`; run 1," in done.stdout
    assert "| CPU per event ≤ 1.2 x the floor's (1,000 ev/s) | 1.20 (1.10-1.30) |" in done.stdout
    refused = subprocess.run(
        [*cmd, str(a), str(bad)], check=False, capture_output=True, text=True, timeout=60
    )
    assert 1 == refused.returncode
    assert f"{bad}: not a result of floor_compare.py (it has no runs)" in refused.stderr
