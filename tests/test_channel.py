"""The worker channel's frames: one tagged union, one encoder and one decoder, and a hello
that carries every setting a worker reads."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
import msgspec
import pytest

from valmi_sidecar.channel import (
    Answers,
    ChannelClosedError,
    Drain,
    Failed,
    Frame,
    Hello,
    Ok,
    Ready,
    Refused,
    Reload,
    Stored,
    Submission,
    Submit,
    WorkerSettings,
    decode,
    encode,
    read_frame,
)
from valmi_sidecar.config import Secret, Settings
from valmi_sidecar.events import NewEvent, parse_one
from valmi_sidecar.store import Accepted
from valmi_sidecar.workers import worker_app

from .conftest import ACTION, serving

SETTINGS_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))
#: Read by a worker and withheld on purpose: a worker never holds the API key (it is
#: ``None`` there, and ``secrets()`` looks at it for the log redactor).
WITHHELD = frozenset({"api_key"})


def _event(i: int) -> NewEvent:
    return parse_one("action", f'{{"agent_key": "a", "action_type": "t{i}"}}'.encode())


def _unlike_the_defaults() -> Settings:
    """Settings whose every field a worker gets differs from its default."""
    return Settings(
        listen="127.0.0.1:0",
        ingest_token=Secret("tok-channel"),
        allowed_origins=("https://app.example",),
        allowed_hosts=("sidecar.internal",),
        max_body_bytes=4096,
        client_timeout_s=7.5,
        shutdown_grace_s=3.25,
        log_level="debug",
        log_format="json",
        access_log=True,
    )


@pytest.mark.parametrize(
    "frame",
    [
        Hello(WorkerSettings.of(_unlike_the_defaults()), index=3, ops_port=41234),
        Ready(),
        Submit([Submission(0, [_event(0)]), Submission(1, [_event(1), _event(2)])]),
        Refused({"unauthorized": 2, "bad_request": 1}),
        Answers(
            [
                Ok(0, [Stored("evt_1", "2024-01-15T10:30:00.123Z", duplicate=True)]),
                Failed(1, "queue_full", "the queue is full", 5),
                Failed(2, "conflict", "order-7"),
            ]
        ),
        Reload("tok-new", "warning"),
        Reload(None, "info"),
        Drain(),
    ],
    ids=lambda frame: type(frame).__name__,
)
def test_every_frame_comes_back_as_it_was_sent(frame: Frame) -> None:
    data = encode(frame)
    assert len(data) - 4 == struct.unpack("!I", data[:4])[0]
    assert frame == decode(data[4:])


def test_an_event_travels_as_the_array_of_its_fields_in_order() -> None:
    event = _event(0)
    [tag, [[rid, [fields]]]] = msgspec.msgpack.decode(encode(Submit([Submission(7, [event])]))[4:])
    assert ("submit", 7) == (tag, rid)
    assert [getattr(event, name) for name in NewEvent.__struct_fields__] == fields


def test_the_hello_gives_the_worker_the_main_process_s_values() -> None:
    main = _unlike_the_defaults()
    hello = decode(encode(Hello(WorkerSettings.of(main), index=1, ops_port=9))[4:])
    assert isinstance(hello, Hello)
    worker = hello.settings.settings()
    for name in WorkerSettings.__struct_fields__:
        assert getattr(main, name) == getattr(worker, name), name
    assert worker.ingest_token is not None
    assert "tok-channel" == worker.ingest_token.reveal()


class _Recording(Settings):
    """Settings that note every field read from them."""

    reads: ClassVar[set[str]] = set()

    def __getattribute__(self, name: str) -> Any:
        if name in SETTINGS_FIELDS:
            _Recording.reads.add(name)
        return object.__getattribute__(self, name)


class _Link:
    def submit_soon(self, events: Sequence[NewEvent]) -> asyncio.Future[list[Accepted]]:
        future: asyncio.Future[list[Accepted]] = asyncio.get_running_loop().create_future()
        future.set_result([Accepted(e.id, e.created_at, duplicate=False) for e in events])
        return future


async def test_a_worker_reads_no_setting_that_the_hello_does_not_carry() -> None:
    """A setting added to ``Settings`` and read by a worker's code is in ``WorkerSettings``
    too: else the worker would silently run on its default."""
    sent = WorkerSettings.of(_unlike_the_defaults())
    fields = {f: getattr(sent.settings(), f) for f in SETTINGS_FIELDS}
    _Recording.reads = set()
    settings = _Recording(**fields)
    app = worker_app(settings, 9, _Link())
    auth = {"Authorization": "Bearer tok-channel"}
    async with serving(app, settings) as url, httpx.AsyncClient(timeout=10.0) as client:
        posted = await client.post(url + "/v1/actions", json=ACTION, headers=auth)
        refused = await client.post(url + "/v1/actions", json={}, headers=auth)
    settings.secrets()
    assert 202 == posted.status_code, posted.text
    assert 400 == refused.status_code
    assert _Recording.reads, "the worker read no setting: the recording is broken"
    assert set() == _Recording.reads - set(WorkerSettings.__struct_fields__) - WITHHELD


async def test_a_frame_that_is_not_one_closes_the_channel() -> None:
    mine, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=mine)
    try:
        garbage = b"\x93\xa4nope\x01\x02"
        theirs.sendall(struct.pack("!I", len(garbage)) + garbage)
        with pytest.raises(ChannelClosedError):
            await asyncio.wait_for(read_frame(reader), 10)
    finally:
        theirs.close()
        writer.close()
        await writer.wait_closed()
