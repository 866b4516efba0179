"""Command line: ``valmi-sidecar run | fake-api | status | ledger | dead-letters | salvage |
check | healthcheck``.

Every ``run`` flag is generated from ``Settings`` (each setting's help lives on it) and
its help says the default and the environment variable, so the three stay in step.
Config problems exit 2 before anything starts; the service and the fake API are imported
only when they are about to run. The operator commands use one ``Operations`` each,
chosen when they start: the running sidecar's API, else its database.

Modules: ``dispatch`` (the parser and ``main``), ``flags``, ``run`` (run, fake-api,
check), ``status`` (status, ledger), ``dead_letters``, ``salvage``, ``common`` (which
sidecar, which operations), ``output`` and ``status_view`` (what is printed).
"""

from __future__ import annotations

from ..operations import recorded_url, status_url
from ..runtime import run_until_signalled
from .common import SYSTEMD_DATA_DIR, service_data_dir
from .dispatch import build_parser, main
from .flags import parse_duration
from .output import CliError, format_status, format_status_details, format_table
from .salvage import format_salvage_damage
from .status_view import StatusView

__all__ = [
    "SYSTEMD_DATA_DIR",
    "CliError",
    "StatusView",
    "build_parser",
    "format_salvage_damage",
    "format_status",
    "format_status_details",
    "format_table",
    "main",
    "parse_duration",
    "recorded_url",
    "run_until_signalled",
    "service_data_dir",
    "status_url",
]
