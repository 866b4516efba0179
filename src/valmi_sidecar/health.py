"""``valmi-sidecar healthcheck``: exit 0 when the sidecar is ready, 1 with one line saying
why not; ``--live`` asks only whether it is alive.

For a container's ``HEALTHCHECK`` and exec probes, which run it every few seconds: it
imports the standard library and the settings only (``entry.py`` sends the command here
before the rest of the command line is imported), so a check costs what a Python one-liner
does. It asks the ops listener when ``ops_listen`` is set (no Host check there), else the
local API; a wildcard address is asked on loopback. It never sends the ingest token:
``/readyz`` and ``/healthz`` need none.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from .config import ENV_CONFIG, ConfigError, Settings, load_settings, split_listen

__all__ = ["add_arguments", "check", "main", "probe_url", "run"]

PROG: Final = "valmi-sidecar healthcheck"
#: Docker reads 1 as unhealthy (2 is reserved), Kubernetes any non-zero as a failure.
UNHEALTHY: Final = 1
DEFAULT_TIMEOUT_S: Final = 4.0
#: More than any answer of /readyz or /healthz; the rest is not read.
MAX_ANSWER_BYTES: Final = 65536
DESCRIPTION: Final = (
    "Exit 0 when the sidecar is ready (GET /readyz answers 200), else 1 with one line "
    "saying why; --live: when it is alive (GET /healthz). For container health checks and "
    "exec probes. Asks ops_listen if set, else listen."
)
_WILDCARDS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--live",
        action="store_true",
        help="check only that the sidecar is alive (GET /healthz), not that it can accept "
        "(GET /readyz): a full queue or a drain is then not a failure",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=None,
        help=f"TOML config file, as for 'run' (default: none; env: {ENV_CONFIG})",
    )
    parser.add_argument(
        "--url",
        default=None,
        help="base URL to ask (default: http://<ops_listen>, else http://<listen>, from the "
        "same config file and environment as 'run')",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for the answer (default: {DEFAULT_TIMEOUT_S:g})",
    )


def probe_url(settings: Settings, path: str) -> str:
    """``http://HOST:PORT{path}`` of the ops listener if there is one, else the local API."""
    host, port = split_listen(settings.ops_listen or settings.listen)
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def check(url: str, timeout_s: float) -> str | None:
    """``None`` when ``GET url`` answers 200, else why not, in one line.

    HTTP/1.0 over a plain socket: the answer is the status line and a small JSON body, and
    http.client would import ssl and the email package for it."""
    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError as e:
        return f"{url}: {e}"
    if parts.scheme != "http" or not parts.hostname:
        return f"{url} is not an http:// URL"
    request = (
        f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {parts.netloc}\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode("ascii", "replace")
    deadline = time.monotonic() + timeout_s
    answer = bytearray()
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s) as sock:
            sock.sendall(request)
            while len(answer) < MAX_ANSWER_BYTES:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except TimeoutError:
        return f"{url} did not answer within {timeout_s:g} s"
    except OSError as e:
        return f"no sidecar answers at {url}: {e.strerror or e}"
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        return f"{url} answered something that is not HTTP: {status_line[:80]!r}"
    if fields[1] == "200":
        return None
    return f"{url} answered HTTP {fields[1]}: {_reasons(body)}"


def _reasons(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:200] or "(no body)"
    if isinstance(data, dict):
        if isinstance(data.get("reasons"), list):
            return "; ".join(str(r) for r in data["reasons"])
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
    return json.dumps(data)[:200]


def run(args: argparse.Namespace) -> int:
    """The command, from parsed arguments: its exit code."""
    path = "/healthz" if args.live else "/readyz"
    if args.url is not None:
        url = args.url.rstrip("/") + path
    else:
        try:
            url = probe_url(load_settings(config_file=args.config), path)
        except ConfigError as e:
            print(f"{PROG}: {e}", file=sys.stderr)  # noqa: T201 - the command's output
            return UNHEALTHY
    problem = check(url, args.timeout)
    if problem is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)  # noqa: T201 - the command's output
        return UNHEALTHY
    print(f"{'alive' if args.live else 'ready'}: {url}")  # noqa: T201 - the command's output
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
