"""``run``, ``fake-api`` and ``check``: the commands that are not operator reads or changes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

from ..config import PLAIN_FIELDS, ConfigError, Settings, load_settings, split_listen
from ..logs import configure_logging
from ..runtime import run_until_signalled
from ..store import StoreError
from . import common
from .output import PROG, CliError, error, out

FAKE_API_LISTEN: Final = "127.0.0.1:8788"
FAKE_API_KEY: Final = "sk_test_fake"


def cmd_run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in PLAIN_FIELDS}
    overrides["api_key_file"] = args.api_key_file
    overrides["ingest_token_file"] = args.ingest_token_file

    def read_settings() -> Settings:
        # The same sources each time: a SIGHUP reads the config and secret files again.
        return load_settings(argv_overrides=overrides, config_file=args.config)

    settings = read_settings()

    # Imported here so that --help and config errors never depend on the service.
    from ..service import run as run_service  # noqa: PLC0415

    return run_service(settings, read_settings)


def cmd_fake_api(args: argparse.Namespace) -> int:
    host, port = split_listen(args.listen)
    keys: list[str] = args.api_key or [FAKE_API_KEY]
    if args.rate_limit_per_min is not None and args.rate_limit_per_min <= 0:
        raise ConfigError(f"--rate-limit-per-min: {args.rate_limit_per_min} must be greater than 0")

    from .. import fake_api  # noqa: PLC0415 - only when it runs
    from ..service import listen_error  # noqa: PLC0415 - only when it runs

    configure_logging(args.log_level)
    try:
        return run_until_signalled(
            lambda: fake_api.serve(
                host, port, api_keys=keys, rate_limit_per_min=args.rate_limit_per_min
            )
        )
    except OSError as e:
        problem = listen_error(e, args.listen, "--listen HOST:PORT")
        if problem is None:
            raise
        raise CliError(f"{problem}; {problem.action}") from e


def cmd_check(args: argparse.Namespace) -> int:
    t = common.target(args)
    path = Path(args.file) if args.file else t.db
    untouched = bool(args.file) and not common.is_live(t, path)
    with common.read_only(path, untouched=untouched) as db:
        try:
            problems = db.integrity_check()
        except StoreError as e:
            raise CliError(f"{path} is damaged: {e}") from e
    if problems:
        for p in problems:
            out(p)
        error(
            f"{path} failed the integrity check ({len(problems)} problems); stop the sidecar, "
            f"move the file aside (or restart: the sidecar does it) and run `{PROG} salvage` on it"
        )
        return 1
    out(f"{path}: ok")
    return 0
