"""``status`` and ``ledger``: what the sidecar holds, through its API or its database."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..operations import OperationError, Operations, Target
from . import common
from .output import format_status, format_status_details, format_table, out


def cmd_status(args: argparse.Namespace) -> int:
    t = common.target(args)
    data = common.run(_status(t, args.json))
    if args.json or not isinstance(data, dict):
        out(json.dumps(data, indent=2, sort_keys=True))
        return 0
    details = format_status_details(data)
    out(format_status(data) + ("\n" + details if details else ""))
    return 0


async def _status(t: Target, raw: bool) -> Any:
    async with common.operations(t, "/v1/status", announced=False) as ops:
        data = await ops.status()
        if isinstance(data, dict):
            data["source"] = ops.source
        if not raw and isinstance(data, dict) and data.get("running") is not False:
            try:
                summary = await ops.dead_letter_summary()
            except OperationError:
                pass  # an older sidecar without the route: the summary has no such lines
            else:
                data = {**data, "dead_letters": summary}
        return data


_LEDGER_HEADERS: Final = (
    "day", "agent_key", "kind", "event_type", "received", "queued", "delivered",
    "dead_lettered", "value",
)  # fmt: skip
_VALUE_KEYS: Final = ("received", "queued", "delivered", "dead_lettered")


def _ledger_line(row: Mapping[str, Any]) -> list[object]:
    value = row.get("value")
    return [
        row["day"] or "(before ledger)",
        row["agent_key"] or "-",
        row["kind"] or "-",
        row["event_type"] or "-",
        row["received"],
        row["queued"],
        row["delivered"],
        row["dead_lettered"],
        value["received"] if isinstance(value, Mapping) else None,
    ]


def cmd_ledger(args: argparse.Namespace) -> int:
    t = common.target(args)
    data = common.run(_ledger(t, args))
    if args.json:
        out(json.dumps(data, indent=2))
    elif args.csv:
        _write_csv(data["rows"])
    else:
        totals = data["totals"]
        lines = [_ledger_line(r) for r in data["rows"]]
        lines.append(
            ["total", "", "", "", totals["received"], totals["queued"], totals["delivered"],
             totals["dead_lettered"], totals["outcome_value"]["received"]]
        )  # fmt: skip
        out(format_table(_LEDGER_HEADERS, lines, tty=sys.stdout.isatty()))
    return 0


async def _ledger(t: Target, args: argparse.Namespace) -> dict[str, Any]:
    async def read(ops: Operations) -> dict[str, Any]:
        return await ops.ledger(args.agent_key, args.since, args.until)

    if args.from_file:
        ops = common.file_operations(t, Path(args.from_file))
        try:
            return await read(ops)
        finally:
            await ops.aclose()
    async with common.operations(t, "/v1/ledger") as chosen:
        return await read(chosen)


def _write_csv(rows: list[dict[str, Any]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([*_LEDGER_HEADERS[:-1], *(f"value_{k}" for k in _VALUE_KEYS)])
    for row in rows:
        value = row.get("value") or {}
        writer.writerow(
            [*(row[h] for h in _LEDGER_HEADERS[:-1]), *(value.get(k, "") for k in _VALUE_KEYS)]
        )
