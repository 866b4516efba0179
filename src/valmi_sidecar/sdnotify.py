"""The systemd notification protocol (``sd_notify``), with the standard library only.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: the address of a Unix
datagram socket, either a path (``/run/systemd/notify``) or, when it starts with ``@``, a
name in the abstract namespace (the ``@`` stands for a leading NUL byte). Each message is
one datagram of newline-separated ``KEY=VALUE`` assignments: ``READY=1``, ``STOPPING=1``,
``STATUS=...``, ``WATCHDOG=1``. Without ``NOTIFY_SOCKET`` every call does nothing, so the
same code runs under systemd, in a container and in a terminal.

Sending never blocks the event loop: each message goes out on a non-blocking socket, and
a message that cannot be sent at once (systemd gone, its queue full) is dropped and
reported by the return value; a missed notification must not stop the sidecar.

With ``WatchdogSec=`` systemd also sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process
it expects pings from). ``watchdog_loop`` pings at half that interval from the event loop
itself, so a wedged loop stops pinging and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from typing import Final

import structlog

log = structlog.get_logger("valmi_sidecar.sdnotify")

ENV_NOTIFY_SOCKET: Final = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC: Final = "WATCHDOG_USEC"
ENV_WATCHDOG_PID: Final = "WATCHDOG_PID"


def socket_address(value: str) -> bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or None if it is unusable.

    ``/path`` is a socket file; ``@name`` is the abstract name ``\\0name``. Other forms
    (``vsock:``, relative paths) are not supported here and give None.
    """
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, or None when the
    watchdog is off or meant for another process (``WATCHDOG_PID`` set to another pid)."""
    raw_usec = env.get(ENV_WATCHDOG_USEC, "").strip()
    if not raw_usec:
        return None
    raw_pid = env.get(ENV_WATCHDOG_PID, "").strip()
    if raw_pid:
        try:
            if int(raw_pid) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2


def _one_line(text: str) -> str:
    """A STATUS= value must be one line: newlines would start new assignments."""
    return " ".join(text.splitlines())


class Notifier:
    """Tells systemd how the service is doing; every method is a no-op when disabled.

    Build it with ``from_env()``. ``ready()``, ``stopping()``, ``status(text)`` and
    ``watchdog()`` return True if the datagram was sent, False if disabled or dropped.
    """

    def __init__(self, address: bytes | None, watchdog_interval_s: float | None = None) -> None:
        self._address = address
        self._watchdog_interval_s = watchdog_interval_s if address is not None else None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """From ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` in ``env``
        (default ``os.environ``); ``pid`` (default ours) is checked against ``WATCHDOG_PID``."""
        if env is None:
            env = os.environ
        if pid is None:
            pid = os.getpid()
        raw = env.get(ENV_NOTIFY_SOCKET, "")
        if not raw:
            return cls(None)
        address = socket_address(raw)
        if address is None:
            log.warning(
                "sd_notify_unsupported_socket",
                notify_socket=raw,
                hint="only /path and @abstract addresses are supported; notifications are off",
            )
            return cls(None)
        return cls(address, watchdog_interval(env, pid))

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to send to."""
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was sent."""
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self._address)
        except OSError as exc:
            # systemd not listening, or its queue is full (EAGAIN): drop this message.
            if not self._warned:
                self._warned = True
                log.warning("sd_notify_failed", error=exc.strerror or type(exc).__name__)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up finished and the service accepts work."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the service has begun to shut down."""
        if status is None:
            return self.send("STOPPING=1")
        return self.send("STOPPING=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``."""
        return self.send(f"STATUS={_one_line(text)}")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more before the start or stop
        timeout fires (for a drain that is still making progress)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive."""
        return self.send("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """Seconds between pings (half of ``WATCHDOG_USEC``), or None when there is no
        watchdog for this process."""
        return self._watchdog_interval_s

    async def watchdog_loop(self) -> None:
        """Ping ``WATCHDOG=1`` at ``watchdog_interval_s()`` from the event loop, until
        cancelled. With no watchdog it just waits to be cancelled, so it can always be
        started as an owned task and never ends by itself."""
        interval = self._watchdog_interval_s
        if interval is None:
            await asyncio.Event().wait()
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)


__all__ = [
    "ENV_NOTIFY_SOCKET",
    "ENV_WATCHDOG_PID",
    "ENV_WATCHDOG_USEC",
    "Notifier",
    "socket_address",
    "watchdog_interval",
]
