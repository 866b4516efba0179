"""The one error a bad setting raises."""

from __future__ import annotations


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message says which and what is allowed."""
