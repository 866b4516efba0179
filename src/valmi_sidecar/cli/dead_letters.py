"""``dead-letters list | show | export | retry | purge``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from ..operations import DeadLetterQuery, Operations, Target
from . import common
from .output import (
    CliError,
    age,
    dead_letters,
    format_table,
    out,
    progress,
    progress_done,
    with_times,
)

#: Dead letters asked for per request, and moved per request.
PAGE: Final = 1_000


def query_of(args: argparse.Namespace, started: float | None = None) -> DeadLetterQuery:
    """The filter flags. With ``started``, only dead letters that were dead-lettered before
    the command started (so a retry never chases its own tail)."""
    older: float | None = args.older_than
    if started is not None:
        older = max(older or 0.0, time.time() - started)
    return DeadLetterQuery(
        reason=args.reason,
        agent_key=args.agent_key,
        older_than_s=older,
        newer_than_s=args.newer_than,
        ids=None if args.ids is None else tuple(args.ids),
    )


async def _pages(
    ops: Operations, query: DeadLetterQuery, limit: int | None
) -> AsyncIterator[dict[str, Any]]:
    """Matching dead letters as JSON objects, oldest first."""
    remaining = limit if limit is not None else 2**62
    after = 0
    while remaining > 0:
        page = await ops.dead_letters(query, limit=min(remaining, PAGE), after_seq=after)
        for item in page.items:
            yield item
        remaining -= len(page.items)
        if page.next_after_seq is None:
            return
        after = page.next_after_seq


async def _each(
    t: Target,
    query: DeadLetterQuery,
    limit: int | None,
    from_file: str | None,
    use: Callable[[dict[str, Any]], None],
) -> None:
    """``use`` each matching dead letter, from the sidecar or its database, or from the
    database file ``from_file`` (``--from``: a moved-aside one)."""
    if from_file is not None:
        ops = common.file_operations(t, Path(from_file))
        try:
            async for item in _pages(ops, query, limit):
                use(item)
        finally:
            await ops.aclose()
        return
    async with common.operations(t, "/v1/dead-letters") as chosen:
        async for item in _pages(chosen, query, limit):
            use(item)


def _collect(args: argparse.Namespace, query: DeadLetterQuery, limit: int | None) -> list[Any]:
    t = common.target(args)
    items: list[dict[str, Any]] = []
    common.run(_each(t, query, limit, args.from_file, items.append))
    return items


def cmd_list(args: argparse.Namespace) -> int:
    items = _collect(args, query_of(args), args.limit)
    if args.json:
        out(json.dumps([with_times(d) for d in items], indent=2))
        return 0
    now = time.time()
    tty = sys.stdout.isatty()
    rows = [
        [
            d["id"], d["kind"], d["agent_key"], d["event_type"], d["reason"], d["status"],
            age(now - d["dead_at"]), d["detail"][:60] if tty else d["detail"],
        ]
        for d in items
    ]  # fmt: skip
    headers = ("id", "kind", "agent_key", "event_type", "reason", "status", "dead_for", "detail")
    # Cut to fit a terminal only: piped, every byte of the detail goes to the next program.
    out(format_table(headers, rows, tty=tty))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    items = _collect(args, DeadLetterQuery(ids=(args.event_id,)), 1)
    if not items:
        raise CliError(f"no dead letter with id {args.event_id}")
    out(json.dumps(with_times(items[0]), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    t = common.target(args)
    out_path: str = args.output
    n = 0
    stream = sys.stdout if out_path == "-" else open(out_path, "w", encoding="utf-8")  # noqa: SIM115

    def write(item: dict[str, Any]) -> None:
        nonlocal n
        stream.write(json.dumps(item, separators=(",", ":")) + "\n")
        n += 1
        if n % 1000 == 0:
            progress(f"exported {dead_letters(n)}…")

    try:
        common.run(_each(t, query_of(args), args.limit, args.from_file, write))
    finally:
        if stream is not sys.stdout:
            stream.close()
    progress_done()
    if out_path != "-":
        out(f"exported {dead_letters(n)} to {out_path}")
    return 0


async def _change(t: Target, args: argparse.Namespace, action: str) -> int:
    """Retry or purge in chunks, through the API or on the database; returns how many."""
    started = time.time()
    limit: int | None = args.limit
    done = 0
    verb = "re-queued" if action == "retry" else "purged"
    async with common.operations(t, f"/v1/dead-letters/{action}", writes=True) as ops:
        change = ops.requeue_dead_letters if action == "retry" else ops.purge_dead_letters
        while limit is None or done < limit:
            chunk = min(PAGE, (limit - done) if limit is not None else PAGE)
            n = await change(query_of(args, started), chunk)
            done += n
            progress(f"{verb} {dead_letters(done)}…")
            if n < chunk:
                break
    progress_done()
    return done


def cmd_retry(args: argparse.Namespace) -> int:
    n = common.run(_change(common.target(args), args, "retry"))
    out(f"re-queued {dead_letters(n)} (original ids and idempotency keys)")
    return 0


async def _count(t: Target, query: DeadLetterQuery) -> int:
    async with common.operations(t, "/v1/dead-letters/count") as ops:
        return await ops.count_dead_letters(query)


def cmd_purge(args: argparse.Namespace) -> int:
    t = common.target(args)
    matching = common.run(_count(t, query_of(args)))
    if matching == 0:
        out("no dead letters match; nothing purged")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(
                f"{dead_letters(matching)} match; pass --yes to purge them without a prompt"
            )
        answer = input(f"Delete {dead_letters(matching)} for good (their counts stay)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            out("nothing purged")
            return 1
    n = common.run(_change(t, args, "purge"))
    out(f"purged {dead_letters(n)} (still counted as dead-lettered)")
    return 0


COMMANDS: Mapping[str, Callable[[argparse.Namespace], int]] = {
    "list": cmd_list,
    "show": cmd_show,
    "retry": cmd_retry,
    "purge": cmd_purge,
    "export": cmd_export,
}
