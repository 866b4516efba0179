"""Command line: ``valmi-sidecar run | fake-api | status``. INTERFACE STUB."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise NotImplementedError
