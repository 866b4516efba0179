"""The ``valmi-sidecar`` command: ``healthcheck`` goes straight to ``health.py``, so a probe
run every few seconds never imports the service, the store and their dependencies (half a
second of CPU); every other command goes to ``cli.py``."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["healthcheck"]:
        from .health import main as healthcheck  # noqa: PLC0415 - the light path

        return healthcheck(args[1:])
    from .cli import main as cli_main  # noqa: PLC0415 - everything else

    return cli_main(args)
