"""The OpenAPI 3.1 description of the local API, shipped in the package as ``openapi.json``.

``GET /openapi.json`` serves it; CI validates it (openapi-spec-validator) and keeps it
true with a schemathesis run against a live sidecar (tests/test_hostile_input.py).
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from typing import Any

__all__ = ["document", "document_bytes"]


@functools.cache
def document_bytes() -> bytes:
    """The document as shipped (read once: a few kilobytes, then cached)."""
    return files(__package__ or "valmi_sidecar").joinpath("openapi.json").read_bytes()


def document() -> dict[str, Any]:
    """The document, decoded (a fresh copy each call)."""
    doc: dict[str, Any] = json.loads(document_bytes())
    return doc
