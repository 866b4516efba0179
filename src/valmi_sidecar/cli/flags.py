"""The flags commands share: every setting's (built from ``Settings``), where to find the
sidecar, and the dead-letter filters."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from ..config import (
    DEFAULT_TEXT,
    ENV_API_KEY,
    ENV_API_KEY_FILE,
    ENV_CONFIG,
    ENV_INGEST_TOKEN,
    ENV_INGEST_TOKEN_FILE,
    PLAIN_FIELDS,
    env_var,
    field_choices,
    field_default,
    field_help,
    field_kind,
    field_metavar,
    flag,
)
from ..operations import DEAD_LETTER_REASONS

SECRETS_EPILOG: Final = f"""\
secrets (environment only, never flags or the config file):
  {ENV_API_KEY} / {ENV_API_KEY_FILE}
      the Valmi API key, or a file holding it (--api-key-file also works)
  {ENV_INGEST_TOKEN} / {ENV_INGEST_TOKEN_FILE}
      bearer token that clients must send; required to listen beyond loopback

config file (--config or {ENV_CONFIG}): TOML with the setting names as keys,
e.g. max_queue_events = 1_000_000; api_key_file and ingest_token_file are allowed.
Precedence: defaults < config file < environment < flags. Unknown keys are an error.
"""
_KIND_METAVARS: Final[Mapping[type, str]] = {int: "N", float: "SECONDS", Path: "DIR"}


def _show_default(name: str) -> str:
    if name == "data_dir":
        return "$STATE_DIRECTORY, else $XDG_STATE_HOME/valmi-sidecar"
    if name in DEFAULT_TEXT:
        return DEFAULT_TEXT[name]
    if name == "ops_listen":
        return "off"
    value = field_default(name)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def setting_help(name: str) -> str:
    """The setting's own description, with its default and environment variable."""
    return f"{field_help(name)} (default: {_show_default(name)}; env: {env_var(name)})"


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name in PLAIN_FIELDS:
        kind = field_kind(name)
        choices = field_choices(name)
        if kind is bool:
            parser.add_argument(
                flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=setting_help(name),
            )
            continue
        meta = field_metavar(name) or _KIND_METAVARS.get(kind, name.upper())
        parser.add_argument(
            flag(name),
            dest=name,
            default=None,
            choices=choices,
            metavar=None if choices else meta,
            help=setting_help(name),
        )
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        default=None,
        help=f"file holding the Valmi API key (env: {ENV_API_KEY_FILE}; or set {ENV_API_KEY})",
    )
    parser.add_argument(
        "--ingest-token-file",
        metavar="FILE",
        default=None,
        help=f"file holding the ingest token (env: {ENV_INGEST_TOKEN_FILE}; or set {ENV_INGEST_TOKEN})",
    )


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=None,
        help=f"TOML config file (default: none; env: {ENV_CONFIG})",
    )


def add_target_flags(parser: argparse.ArgumentParser, url_help: str | None = None) -> None:
    add_config_flag(parser)
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help=f"the sidecar's data directory, read when no sidecar answers (default: as for "
        f"'run': {env_var('data_dir')}, the config file, else $STATE_DIRECTORY or "
        "$XDG_STATE_HOME/valmi-sidecar)",
    )
    parser.add_argument(
        "--url",
        default=None,
        help=url_help
        or f"base URL of the running sidecar (default: http://<listen>, listen from "
        f"{env_var('listen')} or the config file, else 127.0.0.1:8787)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the sidecar's answer (default: 5)",
    )


_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS: Final[Mapping[str, float]] = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 2h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def utc_day(text: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a UTC day, YYYY-MM-DD")
    return text


def add_from_flag(parser: argparse.ArgumentParser, what: str = "the dead letters") -> None:
    parser.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help=f"read {what} of this database file instead, read-only (such as a moved-aside "
        "queue.db.corrupt-…: salvage queues its queued events again, not the rest)",
    )


def add_filter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reason", choices=DEAD_LETTER_REASONS, help="only this reason (rejected, expired)"
    )
    parser.add_argument("--agent-key", help="only events of this agent key")
    parser.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="only those dead-lettered more than DURATION ago (90s, 15m, 2h, 7d)",
    )
    parser.add_argument(
        "--newer-than",
        type=parse_duration,
        metavar="DURATION",
        help="only those dead-lettered less than DURATION ago",
    )
    parser.add_argument(
        "--id", action="append", dest="ids", metavar="ID", help="only this event id (repeat)"
    )
