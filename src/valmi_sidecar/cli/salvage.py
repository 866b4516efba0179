"""``salvage FILE``: queue again every readable event of a moved-aside database."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from ..operations import EventTooBigError, ImportCounts, Target
from ..store import DeadLetterFilter, ReadOnlyDatabase, SalvageReport, StoreError
from . import common
from .output import PROG, CliError, dead_letters, out, progress, progress_done


def cmd_salvage(args: argparse.Namespace) -> int:
    t = common.target(args)
    source = Path(args.file)
    if source.resolve() == t.db.resolve():
        raise CliError(f"{source} is the live database; salvage a moved-aside copy")
    report = SalvageReport()
    totals, dead = common.run(_salvage(t, source, report))
    progress_done()
    out(
        f"salvaged {totals.imported} events from {source} "
        f"({totals.duplicates} already queued, {totals.conflicts} with a reused key skipped, "
        f"{len(report.unreadable)} unreadable rows skipped)"
    )
    damage = format_salvage_damage(report)
    if damage:
        out(damage)
    if dead != 0:
        # Salvage queues only what was queued: the file's dead letters (refused by Valmi or
        # expired) are not sent again unasked, and would go with the file.
        held = "its dead letters could not be counted" if dead is None else dead_letters(dead)
        out(
            f"{held} stay in {source}, not queued again: see them with `{PROG} dead-letters "
            f"list --from {source}` and keep them with `{PROG} dead-letters export --from "
            f"{source} -o FILE` before deleting it"
        )
    return 0


def _open(t: Target, source: Path) -> ReadOnlyDatabase:
    return common.read_only(source, untouched=not common.is_live(t, source))


def _count_dead(db: ReadOnlyDatabase) -> int | None:
    try:
        return db.count_dead_letters(DeadLetterFilter())
    except StoreError:
        return None  # a damaged table: the command says so


async def _salvage(
    t: Target, source: Path, report: SalvageReport
) -> tuple[ImportCounts, int | None]:
    """Import every readable event of ``source`` through the chosen operations; returns
    what was imported and how many dead letters stay in the file (``None``: unknown)."""
    db = await asyncio.to_thread(_open, t, source)
    try:
        dead = await asyncio.to_thread(_count_dead, db)
        chunks = db.salvage(report)
        total = ImportCounts()
        async with common.operations(t, "/v1/salvage", create=True, writes=True) as ops:
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                try:
                    total += await ops.import_events(chunk)
                except EventTooBigError as e:
                    progress_done()
                    salvaged = (total + e.done).imported
                    raise CliError(f"{e} ({salvaged} salvaged before it)") from e
                progress(f"salvaged {total.imported} events…")
        return total, dead
    finally:
        await asyncio.to_thread(db.close)


def format_salvage_damage(report: SalvageReport) -> str:
    """What salvage could not queue again, row by row, and where the file is damaged."""
    lines = []
    for row in report.unreadable:
        where = " ".join(
            part
            for part in (row.id or "", f"(seq {row.seq})" if row.seq is not None else "")
            if part
        )
        lines.append(f"unreadable: {where or 'a row'}: {row.reason}")
    for first, last in report.damaged:
        seqs = f"seq {first}" if first == last else f"seqs {first}-{last}"
        lines.append(
            f"damaged: no row with {seqs} could be read (rows there, if any, cannot be salvaged)"
        )
    if report.unchecked:
        lines.append(
            f"unchecked: {report.unchecked} of the events queued again had no key row left "
            "to check their idempotency key, id and body against (only the rest of their "
            "row vouched for them)"
        )
    if report.gave_up:
        lines.append(
            "damaged: the events table could not be walked to its end; rows after the last "
            "one read may be missing"
        )
    if report.errors:
        lines.append("SQLite said: " + "; ".join(sorted(report.errors)))
    return "\n".join(lines)
