"""What the commands print: stdout is the data, stderr the errors, the source and progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from .status_view import StatusView, UnwritableView

PROG: Final = "valmi-sidecar"


class CliError(Exception):
    """A command failed; the message says why and what to do."""


def error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)  # noqa: T201 - the CLI's output


def out(text: str) -> None:
    print(text)  # noqa: T201 - the CLI's output


_announced: list[str] = []


def announce(text: str) -> None:
    """Say once, on stderr (stdout stays the data), whose answers the command shows."""
    if text not in _announced:
        _announced.append(text)
        print(f"source: {text}", file=sys.stderr)  # noqa: T201 - the CLI's output


def progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"\r{text}", end="", file=sys.stderr, flush=True)  # noqa: T201 - progress


def progress_done() -> None:
    if sys.stderr.isatty():
        print(file=sys.stderr)  # noqa: T201 - progress


def dead_letters(n: int) -> str:
    return f"{n} dead letter" if n == 1 else f"{n} dead letters"


def age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def with_times(record: Mapping[str, Any]) -> dict[str, Any]:
    """A dead letter for people: Unix times (``…_at`` numbers) as RFC 3339 UTC."""
    result = dict(record)
    for key, value in record.items():
        if key.endswith("_at") and isinstance(value, int | float) and not isinstance(value, bool):
            result[key] = (
                datetime.fromtimestamp(value, UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )
    return result


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, tty: bool) -> str:
    """Aligned columns on a terminal (numbers right-aligned); tab-separated when piped."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not tty:
        return "\n".join("\t".join(r) for r in [list(headers), *cells])
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in [list(headers), *cells])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# --- status ---------------------------------------------------------------------------

_COUNTS: Final = ("received", "queued", "in_flight", "delivered", "dead_lettered", "duplicates")
#: The label column of the status summary.
_WIDTH: Final = len("oldest queued")
_DRAIN_BASES: Final = {
    "observed": "delivery rate of the last minute",
    "rate_limit": "at best: the rate limit",
    "stalled": "stalled",
}


def _row(label: str, value: object) -> str:
    return f"{label:<{_WIDTH}}  {value}"


def format_status(data: Mapping[str, Any] | StatusView) -> str:
    """A readable summary of a status; missing fields show as ``-``."""
    s = StatusView.of(data)
    lines: list[str] = []
    if s.ready is not None:
        lines.append(_row("ready", "draining" if s.draining else "yes" if s.ready else "no"))
    for key in _COUNTS:
        value = getattr(s.events, key)
        lines.append(_row(key.replace("_", " "), "-" if value is None else value))
    if s.queue is not None and s.queue.bytes is not None:
        lines.append(_row("queued bytes", f"{s.queue.bytes} (bodies)"))
    if s.disk is not None and s.disk.bytes is not None:
        full = " (full: new events get 503)" if s.disk.full else ""
        lines.append(_row("disk", f"{s.disk.bytes} of {s.disk.max_bytes} bytes{full}"))
        if s.disk.dead_letters_warning:
            lines.append(_row("", s.disk.dead_letters_warning))
    if s.store is not None and s.store.writable is False:
        lines.append(_row("store", _unwritable(s.store.unwritable)))
    oldest = s.oldest_queued_age_s
    lines.append(_row("oldest queued", age(oldest) if oldest is not None else "none"))
    lines.extend(_upstream_lines(s))
    return "\n".join(lines)


def _unwritable(u: UnwritableView | None) -> str:
    """The store's line while commits fail: new events get 503 until one succeeds."""
    if u is None:
        return "not writable: new events get 503"
    since = f" for {age(u.for_s)}" if u.for_s is not None else ""
    text = f"not writable{since}: {u.error or 'commits fail'}"
    if u.failed_commits is not None:
        text += f" ({u.failed_commits} commits failed)"
    if u.fs_free_bytes is not None:
        text += f", {u.fs_free_bytes} bytes free on its file system"
    return text + "; new events get 503, nothing queued is lost"


def _upstream_lines(s: StatusView) -> list[str]:
    up = s.upstream
    if up is None:
        return [_row("upstream", "-"), _row("last error", "none")]
    shown = up.state if up.state is not None else "-"
    if up.state == "ok" and up.answered_since_start is False:
        shown = "ok (not tried yet since start)"
    if up.next_attempt_in_s is not None:
        shown += f", next attempt in {age(up.next_attempt_in_s)}"
    when = f" (at {up.last_error_at})" if up.last_error and up.last_error_at else ""
    return [
        _row("upstream", shown),
        _row("last error", f"{up.last_error if up.last_error else 'none'}{when}"),
    ]


def format_status_details(data: Mapping[str, Any] | StatusView) -> str:
    """The lines after ``format_status``: where it was read, rates, dead letters by reason."""
    s = StatusView.of(data)
    lines: list[str] = []
    if s.running is False:
        lines.append(_row("running", f"no (read from {s.data_dir})"))
    if s.source:
        lines.append(_row("source", s.source))
    rates = s.rates_per_s
    if rates is not None and rates.received is not None:
        lines.append(
            _row(
                "rates",
                f"{rates.received:g}/s received, {rates.delivered or 0:g}/s delivered, "
                f"{rates.dead_lettered or 0:g}/s dead-lettered (last minute)",
            )
        )
    if s.drain is not None and s.drain.basis in _DRAIN_BASES:
        if s.drain.forecast_s is None:
            text = "never at this rate: nothing is delivered (see upstream)"
        else:
            basis = _DRAIN_BASES[s.drain.basis]
            text = f"{age(s.drain.forecast_s)} at {s.drain.rate_per_s:g}/s ({basis})"
        lines.append(_row("drains in", text))
    for r in s.dead_letters.reasons if s.dead_letters is not None else []:
        last = age(time.time() - r.last_dead_at) if r.last_dead_at else "-"
        lines.append(_row("dead letters", f"{r.count} {r.reason} (last {last} ago)"))
    for moved in s.moved_aside:
        lines.append(
            _row(
                "moved aside",
                f"{moved.path} ({moved.bytes} bytes; recover its events: {moved.salvage})",
            )
        )
    return "\n".join(lines)
