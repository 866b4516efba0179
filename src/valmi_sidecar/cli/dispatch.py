"""The command line's parser and ``main``: each command's flags, and which function runs it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final

from .. import __version__, health
from ..config import ENV_INGEST_TOKEN, ENV_INGEST_TOKEN_FILE, ConfigError, env_var, field_choices
from ..operations import OperationError
from . import dead_letters, run, salvage, status
from .flags import (
    SECRETS_EPILOG,
    add_config_flag,
    add_filter_flags,
    add_from_flag,
    add_setting_flags,
    add_target_flags,
    utc_day,
)
from .output import PROG, CliError, error

Command = Callable[[argparse.Namespace], int]
COMMANDS: Final[Mapping[str, Command]] = {
    "run": run.cmd_run,
    "fake-api": run.cmd_fake_api,
    "status": status.cmd_status,
    "healthcheck": health.run,
    "ledger": status.cmd_ledger,
    "salvage": salvage.cmd_salvage,
    "check": run.cmd_check,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "dead-letters":
            return dead_letters.COMMANDS[args.dl_command](args)
        return COMMANDS[args.command](args)
    except ConfigError as e:
        error(str(e))
        return 2
    except (CliError, OperationError) as e:
        error(str(e))
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A local buffering agent for the Valmi metering API: agents post events "
        "to it on localhost; it stores each durably in SQLite before answering and forwards "
        "the queue to the Valmi API with rate limiting, backoff and stable idempotency keys.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.\n\n{SECRETS_EPILOG}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_fake_api(sub)
    _add_status(sub)
    _add_ledger(sub)
    _add_dead_letters(sub)
    _add_salvage_and_check(sub)
    healthcheck = sub.add_parser(
        "healthcheck",
        help="exit 0 when the sidecar is ready (--live: alive), else 1 with the reason",
        description=health.DESCRIPTION,
    )
    health.add_arguments(healthcheck)
    return parser


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the sidecar (receiver, queue and flusher) until SIGTERM",
        description="Run the sidecar until SIGINT/SIGTERM. Every option can also be set by "
        "its environment variable or in the config file; flags win.",
        epilog=SECRETS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flag(p)
    add_setting_flags(p)


def _add_fake_api(sub: Any) -> None:
    p = sub.add_parser(
        "fake-api",
        help="run a Valmi API emulator for local development and tests",
        description="Run a Valmi API emulator (POST /v1/actions, /v1/outcomes) until "
        "SIGINT/SIGTERM. It takes no environment variables.",
    )
    p.add_argument(
        "--listen",
        default=run.FAKE_API_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on (default: {run.FAKE_API_LISTEN})",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"an API key the fake accepts; repeat for several (default: {run.FAKE_API_KEY})",
    )
    p.add_argument(
        "--rate-limit-per-min",
        type=int,
        default=None,
        metavar="N",
        help="answer 429 beyond N requests per minute per key (default: no limit)",
    )
    p.add_argument(
        "--log-level",
        choices=field_choices("log_level"),
        default="info",
        help="lowest level logged (default: info)",
    )


def _add_status(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="show the queue, dead letters and upstream state (running or not)",
        description="Ask a running sidecar for GET /v1/status and print a summary; when none "
        "answers, read the data directory's database (read-only) instead. The address, the "
        "data directory and the ingest token come from the same config file and environment "
        f"as 'run' ({env_var('listen')}, {env_var('data_dir')}, {ENV_INGEST_TOKEN} / "
        f"{ENV_INGEST_TOKEN_FILE}).",
    )
    add_target_flags(
        p,
        url_help=f"status URL (default: http://<listen>/v1/status, listen from "
        f"{env_var('listen')} or the config file, else 127.0.0.1:8787)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the raw JSON (default: a readable summary)"
    )


def _add_ledger(sub: Any) -> None:
    p = sub.add_parser(
        "ledger",
        help="events per agent key, event type and UTC day: received, queued, delivered, dead-lettered",
        description="The billing ledger: per agent key, event type and UTC day of receipt, the "
        "events received, still queued, delivered and dead-lettered, and for outcomes the "
        "summed value. Totals reconcile with the event counts of `status`.",
    )
    add_target_flags(p)
    add_from_flag(p, "the ledger")
    p.add_argument("--agent-key", help="only this agent key")
    p.add_argument("--since", type=utc_day, metavar="YYYY-MM-DD", help="from this UTC day")
    p.add_argument(
        "--until", type=utc_day, metavar="YYYY-MM-DD", help="to this UTC day (inclusive)"
    )
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON (rows and totals)")
    form.add_argument("--csv", action="store_true", help="print CSV")


def _add_limit(p: argparse.ArgumentParser, default: int | None) -> None:
    shown = "all" if default is None else default
    p.add_argument(
        "--limit", type=int, default=default, metavar="N", help=f"at most N (default: {shown})"
    )


def _add_dead_letters(sub: Any) -> None:
    dl = sub.add_parser(
        "dead-letters",
        help="list, show, retry, purge or export the dead letters",
        description="Dead letters: events upstream refused for good (reason 'rejected') or that "
        "waited longer than max_event_age_s ('expired'). Through the running sidecar's API, "
        "else on the data directory's database.",
    )
    dls = dl.add_subparsers(dest="dl_command", metavar="ACTION", required=True)
    p = dls.add_parser("list", help="list dead letters (a table, or --json)")
    add_target_flags(p)
    add_from_flag(p)
    add_filter_flags(p)
    _add_limit(p, 100)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = dls.add_parser("show", help="one dead letter, with its body, as JSON")
    add_target_flags(p)
    add_from_flag(p)
    p.add_argument("event_id", metavar="ID", help="the event id (evt_…)")
    _add_dead_letter_changes(dls)
    p = dls.add_parser("export", help="write dead letters as NDJSON (one JSON object a line)")
    add_target_flags(p)
    add_from_flag(p)
    add_filter_flags(p)
    _add_limit(p, None)
    p.add_argument(
        "--output", "-o", default="-", metavar="FILE", help="file to write (default: stdout)"
    )


def _add_dead_letter_changes(dls: Any) -> None:
    p = dls.add_parser(
        "retry",
        help="re-queue dead letters with their original idempotency keys",
        description="Re-queue matching dead letters: each keeps its id and idempotency key "
        "and moves from dead-lettered to queued (received is unchanged, so the counts "
        "reconcile). Only those dead-lettered before the command started.",
    )
    add_target_flags(p)
    add_filter_flags(p)
    _add_limit(p, None)
    p = dls.add_parser(
        "purge",
        help="delete dead letters for good (asks first unless --yes)",
        description="Delete matching dead letters. They stay counted as dead-lettered (in "
        "status, metrics and the ledger); only the stored events go.",
    )
    add_target_flags(p)
    add_filter_flags(p)
    _add_limit(p, None)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _add_salvage_and_check(sub: Any) -> None:
    p = sub.add_parser(
        "salvage",
        help="re-queue every readable event of a moved-aside database",
        description="Read a damaged database that the sidecar moved aside "
        "(queue.db.corrupt-<time>) and queue every readable event again with its original "
        "id and idempotency key, through the running sidecar or on the data directory.",
    )
    add_target_flags(p)
    p.add_argument("file", metavar="FILE", help="the moved-aside database")
    p = sub.add_parser(
        "check",
        help="run SQLite's integrity check on the database (read-only)",
        description="PRAGMA integrity_check on the data directory's database (or FILE), "
        "read-only: safe while the sidecar runs. Exit 0 when ok, 1 with the problems.",
    )
    add_target_flags(p)
    p.add_argument(
        "file", metavar="FILE", nargs="?", help="a database file (default: the data directory's)"
    )
