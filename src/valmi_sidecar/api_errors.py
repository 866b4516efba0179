"""The one error shape of the local API: ``ApiError``, and what each store error means
for a client (``store_api_error``, the one place they are mapped)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec
from aiohttp import web

from .store import IdempotencyConflictError, OutcomeUnknownError, QueueFullError, StoreError

_encode: Final = msgspec.json.Encoder().encode
#: Seconds a client should wait before retrying when the sidecar is shutting down.
RETRY_AFTER_DRAINING_S: Final = 5
#: Seconds a client should wait before retrying after a failed disk write.
RETRY_AFTER_STORE_ERROR_S: Final = 2


class ApiError(Exception):
    """A refusal: HTTP status, a stable code, a message saying what to do, details."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Sequence[dict[str, str]] = (),
        *,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = list(details)
        self.retry_after_s = retry_after_s

    def response(self) -> web.Response:
        body = {"error": {"code": self.code, "message": self.message, "details": self.details}}
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        return web.Response(
            status=self.status, body=_encode(body), content_type="application/json", headers=headers
        )


def too_large(limit: int, _detail: str | None = None) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the body is larger than {limit} bytes; send fewer events per request",
    )


def store_api_error(
    request: web.Request, exc: StoreError | IdempotencyConflictError, *, ingest: bool
) -> ApiError:
    """The API error for a store error: the one place they are mapped. ``ingest`` for a
    request that submitted events (its answer says whether they may have been stored);
    else an operator's change (re-queue, purge, salvage)."""
    if isinstance(exc, QueueFullError):
        message = (
            f"the sidecar's queue is full ({exc}); retry later, nothing was stored"
            if ingest
            else str(exc)
        )
        return ApiError(503, "queue_full", message, retry_after_s=exc.retry_after_s)
    if isinstance(exc, IdempotencyConflictError):
        return ApiError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different body; "
            "use a new key for a new event",
            [{"field": "Idempotency-Key", "message": f"already used: {exc.key}"}],
        )
    if isinstance(exc, OutcomeUnknownError):
        if ingest:
            return outcome_unknown(request, str(exc))
        return ApiError(
            503,
            "outcome_unknown",
            f"the sidecar cannot tell whether this change was committed ({exc}); it may "
            "have been. Running the same command again is safe: it acts only on what is "
            "left, and salvage recognises the events already queued by their keys",
            retry_after_s=RETRY_AFTER_STORE_ERROR_S,
        )
    if ingest:
        message = "the sidecar could not write the event to disk; retry shortly, nothing was stored"
    else:
        message = f"the sidecar could not write: {exc}"
    return ApiError(503, "store_unavailable", message, retry_after_s=RETRY_AFTER_STORE_ERROR_S)


def outcome_unknown(request: web.Request, reason: str) -> ApiError:
    """The answer when the events may or may not have been committed: never "nothing was
    stored", which would make a client send them again under a new key."""
    if request.headers.get("Idempotency-Key") is not None:
        retry = (
            "Retry with the same Idempotency-Key: if they were stored, the retry gets the "
            "original answer and stores nothing"
        )
    else:
        retry = (
            "This request had no Idempotency-Key, so a retry may store them twice; send an "
            "Idempotency-Key with every request so that retrying with the same key is safe"
        )
    return ApiError(
        503,
        "outcome_unknown",
        f"the sidecar cannot tell whether this request's events were stored ({reason}); "
        f"they may be. {retry}",
        retry_after_s=RETRY_AFTER_STORE_ERROR_S,
    )
