"""sd_notify: real datagram sockets (a path and an abstract name) receive what we send."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from valmi_sidecar.sdnotify import Notifier, socket_address, watchdog_interval

from .conftest import ACTION, SidecarProcessFactory, wait_until


class Listener:
    """A bound Unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self, timeout: float = 5.0) -> str:
        """The next datagram, decoded; fails the test when none arrives by ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            pytest.fail(f"no datagram within {timeout} s")
        return data.decode()

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Listener(sock, str(path))


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"valmi-sidecar-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Listener(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def listener(
    request: pytest.FixtureRequest, path_listener: Listener, abstract_listener: Listener
) -> Listener:
    return path_listener if request.param == "path" else abstract_listener


def test_each_message_arrives_as_one_datagram(listener: Listener) -> None:
    """READY=1, STATUS=, STOPPING=1 and WATCHDOG=1 reach a path or abstract socket."""
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.env_value})
    assert n.enabled

    assert n.ready()
    assert "READY=1" == listener.receive()
    assert n.status("queued=3 delivered=10")
    assert "STATUS=queued=3 delivered=10" == listener.receive()
    assert n.watchdog()
    assert "WATCHDOG=1" == listener.receive()
    assert n.stopping("draining")
    assert "STOPPING=1\nSTATUS=draining" == listener.receive()
    assert n.extend_timeout(2.5)
    assert "EXTEND_TIMEOUT_USEC=2500000" == listener.receive()


def test_status_is_kept_on_one_line(path_listener: Listener) -> None:
    """A newline in a status text must not inject a second assignment."""
    n = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    n.status("queued=1\nREADY=1")
    assert "STATUS=queued=1 READY=1" == path_listener.receive()


def test_without_notify_socket_every_call_is_a_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No NOTIFY_SOCKET: nothing is sent, nothing fails, and there is no watchdog."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier.from_env({"WATCHDOG_USEC": "1000000"}), Notifier.from_env()):
        assert not n.enabled
        assert not n.ready()
        assert not n.status("x")
        assert not n.stopping()
        assert not n.watchdog()
        assert n.watchdog_interval_s() is None


def test_unsupported_address_disables_notifications() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert not n.ready()


def test_socket_address_forms() -> None:
    assert b"/run/systemd/notify" == socket_address("/run/systemd/notify")
    assert b"\0abc/def" == socket_address("@abc/def")
    assert socket_address("@") is None
    assert socket_address("relative/path") is None


def test_nobody_listening_is_reported_not_raised(tmp_path: Path) -> None:
    """A socket path with no listener: the send fails quietly and says so."""
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert not n.ready()
    assert not n.watchdog()


def test_a_full_socket_never_blocks(path_listener: Listener) -> None:
    """When the receiver does not read, sends are dropped at once instead of blocking."""
    n = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    started = time.monotonic()
    results = [n.status("x" * 1000) for _ in range(5000)]
    assert time.monotonic() - started < 5.0
    assert any(results)
    assert not all(results), "the receive queue should have filled up"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(
    env: dict[str, str], expected: float | None
) -> None:
    assert expected == watchdog_interval(env, pid=4242)


def test_from_env_checks_watchdog_pid_against_our_pid(path_listener: Listener) -> None:
    base = {"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "2000000"}
    ours = Notifier.from_env({**base, "WATCHDOG_PID": str(os.getpid())})
    assert 1.0 == ours.watchdog_interval_s()
    theirs = Notifier.from_env({**base, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert theirs.watchdog_interval_s() is None


async def test_watchdog_loop_pings_repeatedly(path_listener: Listener) -> None:
    """WATCHDOG_USEC=100 ms: a ping every 50 ms from the event loop."""
    n = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(n.watchdog_loop())
    try:
        pings = [await asyncio.to_thread(path_listener.receive) for _ in range(4)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ["WATCHDOG=1"] * 4 == pings


async def test_a_wedged_event_loop_stops_the_pings(path_listener: Listener) -> None:
    """While the loop is blocked no ping is sent, so systemd would see the hang."""
    n = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "40000"})
    task = asyncio.create_task(n.watchdog_loop())
    try:
        await asyncio.to_thread(path_listener.receive)  # the loop runs: it pings
        path_listener.pending()
        time.sleep(0.3)  # noqa: ASYNC251 - wedges the loop on purpose
        assert [] == path_listener.pending()
        assert "WATCHDOG=1" == await asyncio.to_thread(path_listener.receive)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_without_watchdog_waits_until_cancelled(
    path_listener: Listener,
) -> None:
    """No WATCHDOG_USEC: the loop sends nothing and does not end by itself."""
    n = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    task = asyncio.create_task(n.watchdog_loop())
    done, _ = await asyncio.wait({task}, timeout=0.2)
    assert set() == done
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [] == path_listener.pending()


# --- the sidecar as a subprocess, notifying a socket this test binds ---------------------


class Collector:
    """Every datagram the listener receives, gathered by a thread, in order."""

    def __init__(self, listener: Listener) -> None:
        self._sock = listener.sock
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._messages: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self._messages.append(data.decode())

    def messages(self) -> list[str]:
        with self._lock:
            return list(self._messages)

    def assignments(self) -> list[str]:
        return [a for m in self.messages() for a in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_sidecar_notifies_ready_watchdog_status_and_stopping(
    path_listener: Listener,
    sidecar_process: SidecarProcessFactory,
    client: httpx.AsyncClient,
) -> None:
    """READY=1 only once /readyz is 200, WATCHDOG=1 again and again, a STATUS= line,
    STOPPING=1 on SIGTERM, then exit 0."""
    collector = Collector(path_listener)
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        p = sidecar_process(
            NOTIFY_SOCKET=path_listener.env_value,
            WATCHDOG_USEC="200000",
            VALMI_SIDECAR_LISTEN=f"127.0.0.1:{port}",
        )
        await wait_until(lambda: "READY=1" in collector.assignments(), 20.0, "READY=1")
        # The moment READY=1 is in, the sidecar must already accept.
        assert 200 == (await client.get(url + "/readyz")).status_code
        assert url == await p.wait_ready()
        assert 202 == (await client.post(url + "/v1/actions", json=ACTION)).status_code

        await wait_until(
            lambda: collector.assignments().count("WATCHDOG=1") >= 3, 10.0, "3 x WATCHDOG=1"
        )
        await wait_until(
            lambda: any(a.startswith("STATUS=") for a in collector.assignments()), 10.0, "STATUS="
        )
        assert [] == [a for a in collector.assignments() if a == "STOPPING=1"]

        p.signal(signal.SIGTERM)
        await wait_until(lambda: "STOPPING=1" in collector.assignments(), 10.0, "STOPPING=1")
        assert 0 == await p.wait_exit()
        sent = collector.assignments()
        assert 1 == sent.count("READY=1")
        assert sent.index("READY=1") < sent.index("STOPPING=1")
        # `systemctl status` keeps the last STATUS= after the exit: it says stopped.
        statuses = [a for a in sent if a.startswith("STATUS=")]
        assert statuses[-1].startswith("STATUS=stopped: queued=1 ")
        assert sent.index("STOPPING=1") < len(sent) - 1 - sent[::-1].index(statuses[-1])
    finally:
        collector.close()


async def test_sidecar_without_notify_socket_runs_as_usual(
    sidecar_process: SidecarProcessFactory, client: httpx.AsyncClient
) -> None:
    """No NOTIFY_SOCKET (a terminal, a container): the sidecar starts, serves, exits 0."""
    p = sidecar_process(WATCHDOG_USEC="200000")
    url = await p.wait_ready()
    assert 200 == (await client.get(url + "/readyz")).status_code
    p.signal(signal.SIGTERM)
    assert 0 == await p.wait_exit()
