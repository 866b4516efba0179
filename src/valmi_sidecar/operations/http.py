"""The operator's actions through a running sidecar's API (``admin.py`` serves them)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..config import ENV_INGEST_TOKEN, ENV_INGEST_TOKEN_FILE
from ..events import NewEvent
from .forms import salvage_record
from .interface import DeadLetterPage, DeadLetterQuery, ImportCounts, OperationError

if TYPE_CHECKING:
    import httpx

#: ``{"events": []}`` around the records of one POST /v1/salvage body.
SALVAGE_WRAPPER_BYTES: Final = len(json.dumps({"events": []}))


class NotAnsweringError(OperationError):
    """Nothing listens at the sidecar's address (the connection was refused)."""


class EventTooBigError(OperationError):
    """A salvaged event does not fit in one request the sidecar takes; ``done`` says what
    this call had imported before it."""

    def __init__(self, message: str, done: ImportCounts) -> None:
        super().__init__(message)
        self.done = done


class HttpOperations:
    """``Operations`` through ``base`` (``http://HOST:PORT``), with the ingest token when
    one is set. ``announce`` is told ``source`` at the first answer."""

    def __init__(
        self,
        base: str,
        source: str,
        *,
        token: str | None,
        timeout: float,
        max_body_bytes: int,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        # Imported here: only the commands that ask a running sidecar need it, and the
        # service itself never loads it.
        import httpx  # noqa: PLC0415

        self.base = base
        self.source = source
        self._timeout = timeout
        self._max_body_bytes = max_body_bytes
        self._announce = announce
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def answers(self, path: str) -> bool:
        """Whether anything answers HTTP at the address (any status): ``False`` when the
        connection is refused. ``path`` is the command's, for the error message."""
        import httpx  # noqa: PLC0415 - loaded by __init__ already

        try:
            await self._client.get(self.base + "/healthz")
        except httpx.ConnectError:
            return False
        except httpx.TimeoutException:
            raise OperationError(
                f"the sidecar at {self.base}{path} did not answer within {self._timeout:g} s"
            ) from None
        except httpx.HTTPError as e:
            raise OperationError(f"cannot ask {self.base}{path}: {type(e).__name__}: {e}") from e
        return True

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: object = None,
        announce: bool = True,
    ) -> Any:
        """The JSON answer to one request; an ``OperationError`` saying what to do when
        there is none."""
        import httpx  # noqa: PLC0415 - loaded by __init__ already

        url = self.base + path
        try:
            response = await self._client.request(
                method,
                url,
                params={k: v for k, v in (params or {}).items() if v is not None},
                json=body,
            )
        except httpx.ConnectError:
            raise NotAnsweringError(
                f"the sidecar at {url} stopped answering; run the command again (what it "
                "did is kept: it goes on from there)"
            ) from None
        except httpx.TimeoutException:
            raise OperationError(
                f"the sidecar at {url} did not answer within {self._timeout:g} s"
            ) from None
        except httpx.HTTPError as e:
            raise OperationError(f"cannot ask {url}: {type(e).__name__}: {e}") from e
        answer = _answer(url, response)
        if announce and self._announce is not None:
            self._announce(self.source)
        return answer

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.call("GET", "/v1/status", announce=False)
        return data

    async def ledger(
        self, agent_key: str | None = None, since: str | None = None, until: str | None = None
    ) -> dict[str, Any]:
        params = {"agent_key": agent_key, "since": since, "until": until}
        data: dict[str, Any] = await self.call("GET", "/v1/ledger", params=params)
        return data

    async def dead_letters(
        self, query: DeadLetterQuery, *, limit: int, after_seq: int = 0
    ) -> DeadLetterPage:
        params = {**query.params(), "after_seq": after_seq, "limit": limit}
        data = await self.call("GET", "/v1/dead-letters", params=params)
        return DeadLetterPage(data["dead_letters"], data["next_after_seq"])

    async def dead_letter_summary(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.call("GET", "/v1/dead-letters/summary", announce=False)
        return data

    async def count_dead_letters(self, query: DeadLetterQuery) -> int:
        data = await self.call("GET", "/v1/dead-letters/count", params=query.params())
        return int(data["count"])

    async def requeue_dead_letters(self, query: DeadLetterQuery, limit: int) -> int:
        body = {**query.body(), "limit": limit}
        data = await self.call("POST", "/v1/dead-letters/retry", body=body)
        return int(data["requeued"])

    async def purge_dead_letters(self, query: DeadLetterQuery, limit: int) -> int:
        body = {**query.body(), "limit": limit}
        data = await self.call("POST", "/v1/dead-letters/purge", body=body)
        return int(data["purged"])

    async def import_events(self, events: Sequence[NewEvent]) -> ImportCounts:
        """In requests of at most the sidecar's ``max_body_bytes``, in order."""
        done = ImportCounts()
        for records in salvage_bodies(events, self._max_body_bytes):
            problem = too_big_to_post(records, self._max_body_bytes)
            if problem is not None:
                raise EventTooBigError(problem, done)
            data = await self.call("POST", "/v1/salvage", body={"events": records})
            done += ImportCounts(
                int(data["imported"]), int(data["duplicates"]), int(data["conflicts"])
            )
        return done

    async def aclose(self) -> None:
        await self._client.aclose()


def _answer(url: str, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        hint = ""
        if response.status_code == 401:
            hint = f"; set {ENV_INGEST_TOKEN} or {ENV_INGEST_TOKEN_FILE} to the sidecar's token"
        elif response.status_code == 413:
            hint = (
                "; the sidecar takes smaller bodies than this command's configuration says:"
                " give it the sidecar's configuration (--config, VALMI_SIDECAR_MAX_BODY_BYTES)"
            )
        raise OperationError(
            f"{url} answered HTTP {response.status_code}: {response.text[:500]}{hint}"
        )
    try:
        return response.json()
    except ValueError:
        raise OperationError(
            f"{url} answered with something that is not JSON: {response.text[:200]!r}"
        ) from None


def salvage_bodies(events: Sequence[NewEvent], limit: int) -> list[list[dict[str, Any]]]:
    """The records of ``events`` in POST bodies of at most ``limit`` bytes (the sidecar's
    ``max_body_bytes``), in order; a record too big for any body is alone in its own.
    Sizes are measured as ``json.dumps`` writes them (ASCII escapes, spaced separators):
    never smaller than what the client sends."""
    bodies: list[list[dict[str, Any]]] = []
    records: list[dict[str, Any]] = []
    size = SALVAGE_WRAPPER_BYTES
    for event in events:
        record = salvage_record(event)
        n = len(json.dumps(record)) + 2  # and ", " before the next one
        if records and size + n > limit:
            bodies.append(records)
            records, size = [], SALVAGE_WRAPPER_BYTES
        records.append(record)
        size += n
    if records:
        bodies.append(records)
    return bodies


def too_big_to_post(records: list[dict[str, Any]], limit: int) -> str | None:
    """Why a body of ``records`` cannot be sent, or ``None``."""
    if len(records) > 1 or SALVAGE_WRAPPER_BYTES + len(json.dumps(records[0])) <= limit:
        return None
    return (
        f"event {records[0]['id']} is too big to salvage through the sidecar's API "
        f"(more than max_body_bytes={limit} allows in one request); stop the sidecar and "
        f"run `valmi-sidecar salvage` again: it then writes the database directly, and the "
        "events already salvaged are recognised by their keys and not stored twice"
    )
