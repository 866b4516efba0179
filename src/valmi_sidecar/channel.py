"""The channel between the main process and its ingest workers: its frames, defined once.

A frame is one member of the tagged union ``Frame``, encoded as msgpack by one encoder and
decoded by one decoder, behind a 4-byte length prefix. Each frame is an array whose first
item is its tag (``["submit", [...]]``); an event in a submission is ``NewEvent`` itself,
as an array of its fields, so a field added to ``NewEvent`` travels without a second
definition here.

* worker to main: ``Ready`` once it listens; ``Submit``, all the submissions of one
  event-loop pass; ``Refused``, the refusals counted since the last such frame.
* main to worker: ``Hello`` first (the settings a worker needs, the ingest token among
  them: a socket pair is private to the two processes); ``Answers``, all the answers of
  one loop pass; ``Reload`` after a SIGHUP; ``Drain`` at shutdown.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Final, Literal

import msgspec

from .config import Secret, Settings
from .events import NewEvent

#: The bytes of one frame at most: far above what bodies under ``max_body_bytes`` make; a
#: longer length prefix means the channel is broken.
MAX_FRAME_BYTES: Final = 256 * 1024 * 1024

#: Why a submission was not stored (or may have been): ``queue_full``, ``conflict`` (an
#: idempotency key reused with another body) and ``store`` stored nothing; ``unknown`` and
#: ``internal`` (an unexpected failure) may have been committed.
FailureCode = Literal["queue_full", "conflict", "store", "unknown", "internal"]


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The settings an ingest worker reads, by the names ``Settings`` gives them.

    ``of`` copies each field from ``Settings`` by name and ``settings`` builds a
    ``Settings`` from them, so a field a worker needs is added here once; a test fails if
    the worker's code reads a setting this struct does not carry.
    """

    ingest_token: str | None
    listen: str
    allowed_origins: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    max_body_bytes: int
    client_timeout_s: float
    shutdown_grace_s: float
    log_level: Literal["debug", "info", "warning", "error"]
    log_format: Literal["auto", "json", "console"]
    access_log: bool

    @classmethod
    def of(cls, settings: Settings) -> WorkerSettings:
        values: dict[str, Any] = {name: getattr(settings, name) for name in cls.__struct_fields__}
        token = settings.ingest_token
        values["ingest_token"] = token.reveal() if token is not None else None
        return cls(**values)

    def settings(self) -> Settings:
        """The worker's ``Settings``: these fields, the defaults for the others."""
        values: dict[str, Any] = msgspec.structs.asdict(self)
        token = self.ingest_token
        values["ingest_token"] = Secret(token) if token else None
        return Settings(**values)


class Hello(msgspec.Struct, tag="hello", array_like=True, frozen=True):
    settings: WorkerSettings
    index: int
    ops_port: int


class Ready(msgspec.Struct, tag="ready", array_like=True, frozen=True):
    pass


class Submission(msgspec.Struct, array_like=True, frozen=True):
    """One request's events, all or nothing; ``rid`` pairs it with its answer."""

    rid: int
    events: list[NewEvent]


class Submit(msgspec.Struct, tag="submit", array_like=True, frozen=True):
    items: list[Submission]


class Refused(msgspec.Struct, tag="refused", array_like=True, frozen=True):
    """Requests refused by a worker since its last report, by error code."""

    counts: dict[str, int]


class Stored(msgspec.Struct, array_like=True, frozen=True):
    """One stored event: its id and receipt time; ``duplicate`` as in ``Accepted``."""

    id: str
    created_at: str
    duplicate: bool


class Ok(msgspec.Struct, tag="ok", array_like=True, frozen=True):
    rid: int
    stored: list[Stored]


class Failed(msgspec.Struct, tag="failed", array_like=True, frozen=True):
    """``message`` is the error's text (for ``conflict``: the idempotency key);
    ``retry_after_s`` is set for ``queue_full``."""

    rid: int
    code: FailureCode
    message: str
    retry_after_s: int = 0


class Answers(msgspec.Struct, tag="answers", array_like=True, frozen=True):
    items: list[Ok | Failed]


class Reload(msgspec.Struct, tag="reload", array_like=True, frozen=True):
    ingest_token: str | None
    log_level: Literal["debug", "info", "warning", "error"]


class Drain(msgspec.Struct, tag="drain", array_like=True, frozen=True):
    pass


Frame = Hello | Ready | Submit | Refused | Answers | Reload | Drain

_LENGTH: Final = struct.Struct("!I")
_encode: Final = msgspec.msgpack.Encoder().encode
_decode: Final = msgspec.msgpack.Decoder(Frame).decode


class ChannelClosedError(Exception):
    """The other process closed the channel (it stopped), or it carried garbage."""


def encode(frame: Frame) -> bytes:
    """``frame`` with its length prefix, as ``write_frame`` sends it."""
    data = _encode(frame)
    return _LENGTH.pack(len(data)) + data


def decode(data: bytes) -> Frame:
    """A frame's bytes (without the prefix) back into the frame."""
    return _decode(data)


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """The next frame; ``ChannelClosedError`` when the other end closed, or sent a frame
    that is not one (the channel is then of no further use)."""
    try:
        (n,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if n > MAX_FRAME_BYTES:
            raise ChannelClosedError(f"a frame of {n} bytes is over the limit")
        return _decode(await reader.readexactly(n))
    except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError) as exc:
        raise ChannelClosedError(str(exc)) from exc


def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> None:
    """Queue one frame; a closed channel drops it (its reader sees the end anyway)."""
    if writer.is_closing():
        return
    writer.write(encode(frame))


__all__ = [
    "MAX_FRAME_BYTES",
    "Answers",
    "ChannelClosedError",
    "Drain",
    "Failed",
    "FailureCode",
    "Frame",
    "Hello",
    "Ok",
    "Ready",
    "Refused",
    "Reload",
    "Stored",
    "Submission",
    "Submit",
    "WorkerSettings",
    "decode",
    "encode",
    "read_frame",
    "write_frame",
]
