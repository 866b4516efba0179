"""Command line: ``valmi-sidecar run | fake-api | status | ledger | dead-letters | salvage | check
| healthcheck``.

Every ``run`` flag is generated from ``Settings`` and its help says the default and the
environment variable, so the three stay in step. Config problems exit 2 before anything
starts; the service and the fake API are imported only when they are about to run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import fcntl
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from . import __version__, health
from .admin import DEAD_LETTER_REASONS, ledger_totals, moved_aside_json, salvage_record
from .config import (
    ADDRESS_NAME,
    DEFAULT_TEXT,
    ENV_API_KEY,
    ENV_API_KEY_FILE,
    ENV_API_URL,
    ENV_CONFIG,
    ENV_INGEST_TOKEN,
    ENV_INGEST_TOKEN_FILE,
    PLAIN_FIELDS,
    ConfigError,
    Settings,
    default_data_dir,
    env_var,
    field_choices,
    field_default,
    field_kind,
    flag,
    load_settings,
    split_listen,
)
from .disk import data_dir_bytes
from .events import NewEvent
from .logs import configure_logging
from .store import (
    DB_NAME,
    LOCK_NAME,
    DeadLetterFilter,
    ReadOnlyDatabase,
    SalvageReport,
    Store,
    StoreError,
    counts_json,
    moved_aside_files,
)

_T = TypeVar("_T")

PROG = "valmi-sidecar"
FAKE_API_LISTEN = "127.0.0.1:8788"
FAKE_API_KEY = "sk_test_fake"

#: What each setting does; the flag's help adds the default and the environment variable.
DESCRIPTIONS: Mapping[str, str] = {
    "listen": "address for the local HTTP API, HOST:PORT; anything but loopback needs an ingest token",
    "ops_listen": "address of the ops listener, HOST:PORT: GET /metrics, /healthz and /readyz only (no events, status or operator routes), for probes and scraping; any address, no ingest token needed",
    "data_dir": "directory for the SQLite queue (created 0700)",
    "api_url": f"base URL of the Valmi API (also read from {ENV_API_URL})",
    "allowed_origins": "web page origins (scheme://host[:port], comma-separated) allowed to call the sidecar from a browser; by default every request with an Origin header is refused (403)",
    "allowed_hosts": "extra names accepted in the Host header besides localhost, 127.0.0.1, [::1] and the listen host (comma-separated; others get 403); with an ingest token the Host check is off unless this is set",
    "durability": "SQLite synchronous mode: 'full' survives power loss, 'normal' only process crashes",
    "max_queue_bytes": "disk budget in bytes: every file in the data directory (events, keys, dead letters, WAL); when reached, new events get 503 with Retry-After",
    "max_queue_events": "queue size limit in events; when reached, new events get 503 with Retry-After",
    "max_body_bytes": "largest request body accepted, in bytes (413 beyond)",
    "rate_limit_per_min": "upstream requests per minute; set it only when the key's budget differs from Valmi's documented one",
    "max_event_age_s": "seconds an event may wait in the queue before it is dead-lettered (once tried, never while paused)",
    "dedup_window_s": "seconds an Idempotency-Key is remembered for client retries",
    "backoff_base_s": "first retry delay in seconds after an upstream failure (exponential, full jitter)",
    "backoff_cap_s": "longest retry delay in seconds",
    "pause_after_refusals": "different events refused in a row with the same status (400, 413, 422), nothing delivered between, that pause forwarding as a configuration problem instead of dead-lettering them",
    "upstream_timeout_s": "timeout of one upstream request, in seconds",
    "upstream_concurrency": "upstream requests in flight at once",
    "proxy_from_env": "reach the Valmi API through the proxy named by HTTPS_PROXY (HTTP_PROXY for an http:// API_URL), except for hosts in NO_PROXY",
    "flush_batch_size": "events leased from the queue per flusher round",
    "final_flush_s": "seconds to keep forwarding after SIGTERM before exiting",
    "shutdown_grace_s": "seconds to let in-flight ingest requests finish on shutdown",
    "client_timeout_s": "seconds a client has to send its headers and body (or to stay idle between requests) before its connection is closed",
    "ingest_processes": "processes that serve the local API: 1 is the sidecar alone; N > 1 starts N worker processes for HTTP and validation, the main one keeps the queue and forwarding",
    "log_level": "lowest level logged",
    "log_format": "log lines: 'json' (one object per line), 'console', or 'auto' (console on a terminal)",
    "access_log": "log every HTTP request to the local API",
}

_METAVARS: Mapping[str, str] = {
    "listen": "HOST:PORT",
    "ops_listen": "HOST:PORT",
    "api_url": "URL",
    "allowed_origins": "ORIGIN[,ORIGIN...]",
    "allowed_hosts": "HOST[,HOST...]",
}

_SECRETS_EPILOG = f"""\
secrets (environment only, never flags or the config file):
  {ENV_API_KEY} / {ENV_API_KEY_FILE}
      the Valmi API key, or a file holding it (--api-key-file also works)
  {ENV_INGEST_TOKEN} / {ENV_INGEST_TOKEN_FILE}
      bearer token that clients must send; required to listen beyond loopback

config file (--config or {ENV_CONFIG}): TOML with the setting names as keys,
e.g. max_queue_events = 1_000_000; api_key_file and ingest_token_file are allowed.
Precedence: defaults < config file < environment < flags. Unknown keys are an error.
"""


def _show_default(name: str) -> str:
    if name == "data_dir":
        return "$STATE_DIRECTORY, else $XDG_STATE_HOME/valmi-sidecar"
    if name in DEFAULT_TEXT:
        return DEFAULT_TEXT[name]
    if name == "ops_listen":
        return "off"
    value = field_default(name)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _help(name: str) -> str:
    return f"{DESCRIPTIONS[name]} (default: {_show_default(name)}; env: {env_var(name)})"


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name in PLAIN_FIELDS:
        kind = field_kind(name)
        choices = field_choices(name)
        dest = name
        if kind is bool:
            parser.add_argument(
                flag(name),
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_help(name),
            )
        else:
            meta = _METAVARS.get(name) or {int: "N", float: "SECONDS", Path: "DIR"}.get(
                kind, name.upper()
            )
            parser.add_argument(
                flag(name),
                dest=dest,
                default=None,
                choices=choices,
                metavar=None if choices else meta,
                help=_help(name),
            )
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        default=None,
        help=f"file holding the Valmi API key (env: {ENV_API_KEY_FILE}; or set {ENV_API_KEY})",
    )
    parser.add_argument(
        "--ingest-token-file",
        metavar="FILE",
        default=None,
        help=f"file holding the ingest token (env: {ENV_INGEST_TOKEN_FILE}; or set {ENV_INGEST_TOKEN})",
    )


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=None,
        help=f"TOML config file (default: none; env: {ENV_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A local buffering agent for the Valmi metering API: agents post events "
        "to it on localhost; it stores each durably in SQLite before answering and forwards "
        "the queue to the Valmi API with rate limiting, backoff and stable idempotency keys.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.\n\n{_SECRETS_EPILOG}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the sidecar (receiver, queue and flusher) until SIGTERM",
        description="Run the sidecar until SIGINT/SIGTERM. Every option can also be set by "
        "its environment variable or in the config file; flags win.",
        epilog=_SECRETS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flag(run)
    _add_setting_flags(run)

    fake = sub.add_parser(
        "fake-api",
        help="run a Valmi API emulator for local development and tests",
        description="Run a Valmi API emulator (POST /v1/actions, /v1/outcomes) until "
        "SIGINT/SIGTERM. It takes no environment variables.",
    )
    fake.add_argument(
        "--listen",
        default=FAKE_API_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on (default: {FAKE_API_LISTEN})",
    )
    fake.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"an API key the fake accepts; repeat for several (default: {FAKE_API_KEY})",
    )
    fake.add_argument(
        "--rate-limit-per-min",
        type=int,
        default=None,
        metavar="N",
        help="answer 429 beyond N requests per minute per key (default: no limit)",
    )
    fake.add_argument(
        "--log-level",
        choices=field_choices("log_level"),
        default="info",
        help="lowest level logged (default: info)",
    )

    status = sub.add_parser(
        "status",
        help="show the queue, dead letters and upstream state (running or not)",
        description="Ask a running sidecar for GET /v1/status and print a summary; when none "
        "answers, read the data directory's database (read-only) instead. The address, the "
        "data directory and the ingest token come from the same config file and environment "
        f"as 'run' ({env_var('listen')}, {env_var('data_dir')}, {ENV_INGEST_TOKEN} / "
        f"{ENV_INGEST_TOKEN_FILE}).",
    )
    _add_target_flags(
        status,
        url_help=f"status URL (default: http://<listen>/v1/status, listen from "
        f"{env_var('listen')} or the config file, else 127.0.0.1:8787)",
    )
    status.add_argument(
        "--json", action="store_true", help="print the raw JSON (default: a readable summary)"
    )
    _add_operator_commands(sub)
    healthcheck = sub.add_parser(
        "healthcheck",
        help="exit 0 when the sidecar is ready (--live: alive), else 1 with the reason",
        description=health.DESCRIPTION,
    )
    health.add_arguments(healthcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _cmd_run,
        "fake-api": _cmd_fake_api,
        "status": _cmd_status,
        "healthcheck": health.run,
        **OPERATOR_COMMANDS,
    }
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "dead-letters":
            return DEAD_LETTER_COMMANDS[args.dl_command](args)
        return commands[args.command](args)
    except ConfigError as e:
        _error(str(e))
        return 2
    except CliError as e:
        _error(str(e))
        return 1


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)  # noqa: T201 - the CLI's output


def _out(text: str) -> None:
    print(text)  # noqa: T201 - the CLI's output


# --- run ----------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in PLAIN_FIELDS}
    overrides["api_key_file"] = args.api_key_file
    overrides["ingest_token_file"] = args.ingest_token_file

    def read_settings() -> Settings:
        # The same sources each time: a SIGHUP reads the config and secret files again.
        return load_settings(argv_overrides=overrides, config_file=args.config)

    settings = read_settings()

    # Imported here so that --help and config errors never depend on the service.
    from .service import run as run_service  # noqa: PLC0415

    return run_service(settings, read_settings)


# --- fake-api -----------------------------------------------------------------------------


def _cmd_fake_api(args: argparse.Namespace) -> int:
    host, port = split_listen(args.listen)
    keys: list[str] = args.api_key or [FAKE_API_KEY]
    if args.rate_limit_per_min is not None and args.rate_limit_per_min <= 0:
        raise ConfigError(f"--rate-limit-per-min: {args.rate_limit_per_min} must be greater than 0")

    from . import fake_api  # noqa: PLC0415 - only when it runs
    from .service import listen_error  # noqa: PLC0415 - only when it runs

    configure_logging(args.log_level)
    try:
        return run_until_signalled(
            lambda: fake_api.serve(
                host, port, api_keys=keys, rate_limit_per_min=args.rate_limit_per_min
            )
        )
    except OSError as e:
        problem = listen_error(e, args.listen, "--listen HOST:PORT")
        if problem is None:
            raise
        raise CliError(f"{problem}; {problem.action}") from e


def run_until_signalled(make: Callable[[], Coroutine[Any, Any, object]]) -> int:
    """Run ``make()`` on uvloop (if available) until it ends or SIGINT/SIGTERM cancels it.

    A signal is a clean exit: 0. Any other exception propagates.
    """
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if sys.platform == "linux":
        with suppress(ImportError):
            import uvloop  # noqa: PLC0415 - optional

            loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_cancel_on_signal(make))
    except KeyboardInterrupt:  # a platform without loop signal handlers
        pass
    return 0


async def _cancel_on_signal(make: Callable[[], Coroutine[Any, Any, object]]) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(make())
    signals = (signal.SIGINT, signal.SIGTERM)
    installed = []
    for sig in signals:
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
            installed.append(sig)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        # Cancelled by our signal handler: the clean way out.
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# --- status -------------------------------------------------------------------------------


def status_url(settings: Settings) -> str:
    """``http://HOST:PORT/v1/status`` for the sidecar that ``settings`` describe; a wildcard
    listen address is asked on loopback."""
    host, port = split_listen(settings.listen)
    if host in ("0.0.0.0", ""):  # noqa: S104 - mapping the wildcard to loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1/status"


_COUNTS = ("received", "queued", "in_flight", "delivered", "dead_lettered", "duplicates")


def _find(data: Mapping[str, Any], key: str) -> Any:
    """``key`` at the top level or one level down (``counts``, ``queue``, ``upstream``…)."""
    if key in data:
        return data[key]
    for value in data.values():
        if isinstance(value, Mapping) and key in value:
            return value[key]
    return None


def _age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def format_status(data: Mapping[str, Any]) -> str:
    """A readable summary of a ``/v1/status`` answer; missing fields show as ``-``."""
    width = max(len(k) for k in (*_COUNTS, "oldest queued", "upstream", "last error"))
    lines: list[str] = []
    if "ready" in data:
        ready = "draining" if data.get("draining") else "yes" if data["ready"] else "no"
        lines.append(f"{'ready':<{width}}  {ready}")
    for key in _COUNTS:
        value = _find(data, key)
        lines.append(f"{key.replace('_', ' '):<{width}}  {'-' if value is None else value}")
    age = _find(data, "oldest_queued_age_s")
    queue = data.get("queue")
    if isinstance(queue, Mapping) and isinstance(queue.get("bytes"), int):
        lines.append(f"{'queued bytes':<{width}}  {queue['bytes']} (bodies)")
    disk = data.get("disk")
    if isinstance(disk, Mapping) and isinstance(disk.get("bytes"), int):
        full = " (full: new events get 503)" if disk.get("full") else ""
        lines.append(f"{'disk':<{width}}  {disk['bytes']} of {disk.get('max_bytes')} bytes{full}")
        if disk.get("dead_letters_warning"):
            lines.append(f"{'':<{width}}  {disk['dead_letters_warning']}")
    lines.append(f"{'oldest queued':<{width}}  {_age(age) if age is not None else 'none'}")
    upstream = data.get("upstream")
    state = upstream.get("state") if isinstance(upstream, Mapping) else upstream
    if state is None:
        state = _find(data, "upstream_state")
    shown = str(state) if state is not None else "-"
    if isinstance(upstream, Mapping):
        if state == "ok" and upstream.get("answered_since_start") is False:
            shown = "ok (not tried yet since start)"
        wait = upstream.get("next_attempt_in_s")
        if isinstance(wait, int | float):
            shown += f", next attempt in {_age(wait)}"
    lines.append(f"{'upstream':<{width}}  {shown}")
    error = upstream.get("last_error") if isinstance(upstream, Mapping) else None
    if error is None:
        error = _find(data, "last_error")
    at = upstream.get("last_error_at") if isinstance(upstream, Mapping) else None
    when = f" (at {at})" if error and isinstance(at, str) else ""
    lines.append(f"{'last error':<{width}}  {error if error else 'none'}{when}")
    return "\n".join(lines)


# --- operator commands: shared ------------------------------------------------------------


class CliError(Exception):
    """A command failed; the message says why and what to do."""


@dataclass(frozen=True)
class _Target:
    """Where an operator command acts: the running sidecar's API, else the data directory."""

    settings: Settings
    base: str
    timeout: float
    #: Why ``base``: ``--url``, the address the running sidecar recorded, or ``listen``.
    why: str = "listen"
    #: No sidecar holds the data directory: read its database without asking any API
    #: (another sidecar may listen on the default address, with other numbers).
    offline: bool = False

    @property
    def db(self) -> Path:
        return self.settings.data_dir / DB_NAME

    def source(self, *, api: bool) -> str:
        """Whose numbers these are, for the output."""
        if api:
            return f"{self.base} ({self.why})"
        return f"{self.db} (no sidecar running)"

    def headers(self) -> dict[str, str]:
        token = self.settings.ingest_token
        return {} if token is None else {"Authorization": f"Bearer {token.reveal()}"}


def _add_target_flags(parser: argparse.ArgumentParser, url_help: str | None = None) -> None:
    _add_config_flag(parser)
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help=f"the sidecar's data directory, read when no sidecar answers (default: as for "
        f"'run': {env_var('data_dir')}, the config file, else $STATE_DIRECTORY or "
        "$XDG_STATE_HOME/valmi-sidecar)",
    )
    parser.add_argument(
        "--url",
        default=None,
        help=url_help
        or f"base URL of the running sidecar (default: http://<listen>, listen from "
        f"{env_var('listen')} or the config file, else 127.0.0.1:8787)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the sidecar's answer (default: 5)",
    )


#: Where the systemd unit keeps the queue (``StateDirectory=valmi-sidecar``).
SYSTEMD_DATA_DIR: Final = Path("/var/lib/valmi-sidecar")


def service_data_dir(
    settings: Settings, explicit: bool, system_dir: Path = SYSTEMD_DATA_DIR
) -> Path:
    """The data directory an operator command reads: the configured one, except that an
    admin on a VM who names none and has no queue of their own gets the systemd service's
    (the unit sets ``$STATE_DIRECTORY`` for the service alone, not for a login shell)."""
    data_dir = settings.data_dir
    if explicit or data_dir != default_data_dir() or (data_dir / DB_NAME).exists():
        return data_dir
    try:
        if (system_dir / DB_NAME).is_file():
            return system_dir
    except PermissionError:
        raise CliError(
            f"the service's data directory {system_dir} is readable by root only; run the "
            f"command as root (sudo {PROG} …), or pass --data-dir"
        ) from None
    return data_dir


def _target(args: argparse.Namespace) -> _Target:
    given = getattr(args, "data_dir", None)
    settings = load_settings(argv_overrides={"data_dir": given}, config_file=args.config)
    explicit = given is not None or bool(os.environ.get(env_var("data_dir")))
    data_dir = service_data_dir(settings, explicit)
    if data_dir != settings.data_dir:
        settings = dataclasses.replace(settings, data_dir=data_dir)
    url: str | None = args.url
    if url is not None:
        return _Target(settings, url.split("/v1/", 1)[0].rstrip("/"), args.timeout, "--url")
    default = status_url(settings).removesuffix("/v1/status")
    data_dir = settings.data_dir
    if _sidecar_holds(data_dir):
        recorded = recorded_url(data_dir)
        if recorded is not None:
            return _Target(settings, recorded, args.timeout, f"the sidecar holding {data_dir}")
        return _Target(settings, default, args.timeout)
    offline = (data_dir / DB_NAME).is_file()
    return _Target(settings, default, args.timeout, offline=offline)


def recorded_url(data_dir: Path) -> str | None:
    """The URL the sidecar holding ``data_dir`` recorded there (``ADDRESS_NAME``)."""
    try:
        record = json.loads((data_dir / ADDRESS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    url = record.get("url") if isinstance(record, dict) else None
    return url if isinstance(url, str) and url.startswith("http") else None


_announced: list[str] = []


def _announce(text: str) -> None:
    """Say once, on stderr (stdout stays the data), whose answers the command shows."""
    if text not in _announced:
        _announced.append(text)
        print(f"source: {text}", file=sys.stderr)  # noqa: T201 - the CLI's output


def _call(
    t: _Target,
    method: str,
    path: str,
    *,
    params: Mapping[str, Any] | None = None,
    body: object = None,
    announce: bool = True,
) -> Any:
    """The JSON answer of the running sidecar, or ``None`` when nothing listens there
    (or none holds the data directory: ``t.offline``)."""
    if t.offline:
        return None
    # Imported here: only the commands that ask a running sidecar need it, and ``run``
    # stays 2.7 MB smaller without it (idle resident memory is a target).
    import httpx  # noqa: PLC0415

    url = t.base + path
    try:
        response = httpx.request(
            method,
            url,
            params={k: v for k, v in (params or {}).items() if v is not None},
            json=body,
            headers=t.headers(),
            timeout=t.timeout,
        )
    except httpx.ConnectError:
        return None
    except httpx.TimeoutException:
        raise CliError(f"the sidecar at {url} did not answer within {t.timeout:g} s") from None
    except httpx.HTTPError as e:
        raise CliError(f"cannot ask {url}: {type(e).__name__}: {e}") from e
    if response.status_code >= 400:
        hint = ""
        if response.status_code == 401:
            hint = f"; set {ENV_INGEST_TOKEN} or {ENV_INGEST_TOKEN_FILE} to the sidecar's token"
        elif response.status_code == 413:
            hint = (
                "; the sidecar takes smaller bodies than this command's configuration says:"
                " give it the sidecar's configuration (--config, VALMI_SIDECAR_MAX_BODY_BYTES)"
            )
        raise CliError(f"{url} answered HTTP {response.status_code}: {response.text[:500]}{hint}")
    try:
        answer = response.json()
    except ValueError:
        raise CliError(
            f"{url} answered with something that is not JSON: {response.text[:200]!r}"
        ) from None
    if announce:
        _announce(t.source(api=True))
    return answer


def _sidecar_holds(data_dir: Path) -> bool:
    """Whether a sidecar holds the data directory's lock (it runs, wherever it listens)."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CliError(f"cannot read {data_dir / LOCK_NAME}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _offline(
    t: _Target, url_path: str = "", *, announce: bool = True, create: bool = False
) -> Path:
    """The database to use directly, after no sidecar answered at ``t.base`` (or none
    holds the data directory); ``create`` when the command may be the first to write it."""
    data_dir = t.settings.data_dir
    if _sidecar_holds(data_dir):
        raise CliError(
            f"a sidecar holds {data_dir} but nothing answers at {t.base}{url_path}; "
            "pass --url with its listen address"
        )
    if not create and not t.db.is_file():
        raise CliError(
            f"no sidecar answering at {t.base}{url_path}; is `{PROG} run` running? "
            f"(and no database at {t.db} to read instead; pass --data-dir)"
        )
    if announce:
        _announce(t.source(api=False))
    return t.db


def _read_only(path: Path, *, untouched: bool = False) -> ReadOnlyDatabase:
    try:
        return ReadOnlyDatabase(path, untouched=untouched)
    except StoreError as e:
        raise CliError(str(e)) from e


def _read_file(t: _Target, path: Path) -> ReadOnlyDatabase:
    """A database named on the command line (a moved-aside one, usually), read without
    creating anything beside it; a live one (a sidecar may be writing it) read as usual."""
    live = path.resolve() == t.db.resolve() or (
        path.name == DB_NAME and _sidecar_holds(path.parent)
    )
    return _read_only(path, untouched=not live)


async def _with_store(t: _Target, work: Callable[[Store], Coroutine[Any, Any, _T]]) -> _T:
    """Run ``work`` on the data directory's store (its lock held, so no sidecar starts)."""
    try:
        store = await Store.open(
            t.settings.data_dir,
            durability=t.settings.durability,
            max_queue_bytes=t.settings.max_queue_bytes,
            max_queue_events=t.settings.max_queue_events,
            max_body_bytes=t.settings.max_body_bytes,
            dedup_window_s=t.settings.dedup_window_s,
            prune_interval_s=None,
        )
    except StoreError as e:
        raise CliError(str(e)) from e
    try:
        return await work(store)
    except StoreError as e:
        raise CliError(str(e)) from e
    finally:
        await store.close()


def _quiet_logs() -> None:
    """Store logs go to stderr, warnings and worse only: stdout is the command's output."""
    configure_logging("warning", "console")


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"\r{text}", end="", file=sys.stderr, flush=True)  # noqa: T201 - progress


def _progress_done() -> None:
    if sys.stderr.isatty():
        print(file=sys.stderr)  # noqa: T201 - progress


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, tty: bool) -> str:
    """Aligned columns on a terminal (numbers right-aligned); tab-separated when piped."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not tty:
        return "\n".join("\t".join(r) for r in [list(headers), *cells])
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in [list(headers), *cells])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS: Mapping[str, float] = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 2h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _utc_day(text: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a UTC day, YYYY-MM-DD")
    return text


def _add_from_flag(parser: argparse.ArgumentParser, what: str = "the dead letters") -> None:
    parser.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help=f"read {what} of this database file instead, read-only (such as a moved-aside "
        "queue.db.corrupt-…: salvage queues its queued events again, not the rest)",
    )


def _add_filter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reason", choices=DEAD_LETTER_REASONS, help="only this reason (rejected, expired)"
    )
    parser.add_argument("--agent-key", help="only events of this agent key")
    parser.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="only those dead-lettered more than DURATION ago (90s, 15m, 2h, 7d)",
    )
    parser.add_argument(
        "--newer-than",
        type=parse_duration,
        metavar="DURATION",
        help="only those dead-lettered less than DURATION ago",
    )
    parser.add_argument(
        "--id", action="append", dest="ids", metavar="ID", help="only this event id (repeat)"
    )


def _filter_fields(args: argparse.Namespace, started: float | None = None) -> dict[str, Any]:
    """The filter as the admin API takes it. With ``started``, only dead letters that were
    dead-lettered before the command started (so a retry never chases its own tail)."""
    older: float | None = args.older_than
    if started is not None:
        older = max(older or 0.0, time.time() - started)
    return {
        "reason": args.reason,
        "agent_key": args.agent_key,
        "older_than_s": older,
        "newer_than_s": args.newer_than,
        "ids": args.ids,
    }


def _filter(fields: Mapping[str, Any], after_seq: int = 0) -> DeadLetterFilter:
    now = time.time()
    older, newer = fields.get("older_than_s"), fields.get("newer_than_s")
    ids = fields.get("ids")
    return DeadLetterFilter(
        reason=fields.get("reason"),
        agent_key=fields.get("agent_key"),
        dead_before=None if older is None else now - older,
        dead_after=None if newer is None else now - newer,
        ids=None if ids is None else tuple(ids),
        after_seq=after_seq,
    )


def _query(fields: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if out.get("ids") is not None:
        out["ids"] = ",".join(out["ids"])
    return out


# --- status (read-only from the data directory) --------------------------------------------


def offline_status(settings: Settings, db: ReadOnlyDatabase) -> dict[str, Any]:
    """What ``/v1/status`` would say, read from the database of a stopped sidecar."""
    c = db.counts()
    now = time.time()
    return {
        "running": False,
        "data_dir": str(settings.data_dir),
        **counts_json(
            c,
            in_flight=0,
            max_events=settings.max_queue_events,
            max_bytes=settings.max_queue_bytes,
        ),
        "oldest_queued_age_s": (
            None if c.oldest_queued_at is None else round(now - c.oldest_queued_at, 3)
        ),
        "disk": {
            "bytes": data_dir_bytes(settings.data_dir),
            "max_bytes": settings.max_queue_bytes,
        },
        "upstream": {"state": "stopped", "last_error": None},
        "dead_letters": {"reasons": db.dead_letter_summary(), **db.operator_counts()},
        "moved_aside": moved_aside_json(moved_aside_files(settings.data_dir)),
    }


#: The label column of ``format_status``.
_WIDTH = len("oldest queued")


_DRAIN_BASES: Final = {
    "observed": "delivery rate of the last minute",
    "rate_limit": "at best: the rate limit",
    "stalled": "stalled",
}


def format_status_details(data: Mapping[str, Any]) -> str:
    """The lines after ``format_status``: where it was read, rates, dead letters by reason."""
    lines: list[str] = []
    if data.get("running") is False:
        lines.append(f"{'running':<{_WIDTH}}  no (read from {data.get('data_dir')})")
    if data.get("source"):
        lines.append(f"{'source':<{_WIDTH}}  {data['source']}")
    rates = data.get("rates_per_s")
    if isinstance(rates, Mapping) and rates.get("received") is not None:
        lines.append(
            f"{'rates':<{_WIDTH}}  {rates['received']:g}/s received, {rates['delivered']:g}/s "
            f"delivered, {rates['dead_lettered']:g}/s dead-lettered (last minute)"
        )
    drain = data.get("drain")
    if isinstance(drain, Mapping) and drain.get("basis") in _DRAIN_BASES:
        forecast = drain.get("forecast_s")
        if forecast is None:
            text = "never at this rate: nothing is delivered (see upstream)"
        else:
            text = f"{_age(forecast)} at {drain.get('rate_per_s', 0):g}/s ({_DRAIN_BASES[drain['basis']]})"
        lines.append(f"{'drains in':<{_WIDTH}}  {text}")
    dead = data.get("dead_letters")
    if isinstance(dead, Mapping):
        for r in dead.get("reasons") or []:
            age = _age(time.time() - r["last_dead_at"]) if r.get("last_dead_at") else "-"
            lines.append(f"{'dead letters':<{_WIDTH}}  {r['count']} {r['reason']} (last {age} ago)")
    for moved in data.get("moved_aside") or []:
        if isinstance(moved, Mapping):
            lines.append(
                f"{'moved aside':<{_WIDTH}}  {moved.get('path')} ({moved.get('bytes')} bytes; "
                f"recover its events: {moved.get('salvage')})"
            )
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    t = _target(args)
    data = _call(t, "GET", "/v1/status", announce=False)
    if data is None:
        with _read_only(_offline(t, "/v1/status", announce=False)) as db:
            try:
                data = offline_status(t.settings, db)
            except StoreError as e:
                raise CliError(str(e)) from e
        data["source"] = t.source(api=False)
    elif isinstance(data, dict):
        data["source"] = t.source(api=True)
        if not args.json:
            with suppress(CliError):
                summary = _call(t, "GET", "/v1/dead-letters/summary", announce=False)
                if isinstance(summary, dict):
                    data = {**data, "dead_letters": summary}
    if args.json or not isinstance(data, dict):
        _out(json.dumps(data, indent=2, sort_keys=True))
        return 0
    details = format_status_details(data)
    _out(format_status(data) + ("\n" + details if details else ""))
    return 0


# --- ledger -------------------------------------------------------------------------------

_LEDGER_HEADERS = (
    "day", "agent_key", "kind", "event_type", "received", "queued", "delivered",
    "dead_lettered", "value",
)  # fmt: skip


def _ledger_line(row: Mapping[str, Any]) -> list[object]:
    value = row.get("value")
    return [
        row["day"] or "(before ledger)",
        row["agent_key"] or "-",
        row["kind"] or "-",
        row["event_type"] or "-",
        row["received"],
        row["queued"],
        row["delivered"],
        row["dead_lettered"],
        value["received"] if isinstance(value, Mapping) else None,
    ]


def _cmd_ledger(args: argparse.Namespace) -> int:
    t = _target(args)
    params = {"agent_key": args.agent_key, "since": args.since, "until": args.until}
    data = None if args.from_file else _call(t, "GET", "/v1/ledger", params=params)
    if data is None:
        source = Path(args.from_file) if args.from_file else _offline(t, "/v1/ledger")
        if args.from_file:
            _announce(f"{source} (--from)")
        with _read_file(t, source) if args.from_file else _read_only(source) as db:
            try:
                rows = db.ledger(args.agent_key, args.since, args.until)
            except StoreError as e:
                raise CliError(str(e)) from e
        data = {"rows": [r.as_dict() for r in rows], "totals": ledger_totals(rows)}
    if args.json:
        _out(json.dumps(data, indent=2))
        return 0
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(
            [
                *_LEDGER_HEADERS[:-1],
                "value_received",
                "value_queued",
                "value_delivered",
                "value_dead_lettered",
            ]
        )
        for row in data["rows"]:
            value = row.get("value") or {}
            writer.writerow(
                [
                    *(row[h] for h in _LEDGER_HEADERS[:-1]),
                    *(
                        value.get(k, "")
                        for k in ("received", "queued", "delivered", "dead_lettered")
                    ),
                ]
            )
        return 0
    totals = data["totals"]
    lines = [_ledger_line(r) for r in data["rows"]]
    lines.append(
        ["total", "", "", "", totals["received"], totals["queued"], totals["delivered"],
         totals["dead_lettered"], totals["outcome_value"]["received"]]
    )  # fmt: skip
    _out(format_table(_LEDGER_HEADERS, lines, tty=sys.stdout.isatty()))
    return 0


# --- dead letters -------------------------------------------------------------------------


def _iter_dead_letters(
    t: _Target, fields: Mapping[str, Any], limit: int | None, source: str | None = None
) -> Iterator[dict[str, Any]]:
    """Matching dead letters as JSON objects, oldest first, from the API or the database;
    from the database file ``source`` when given (``--from``: a moved-aside one)."""
    remaining = limit if limit is not None else 2**62
    after = 0
    offline_db = None if source is None else _read_file(t, Path(source))
    if source is not None:
        _announce(f"{source} (--from)")
    try:
        while remaining > 0:
            page = min(remaining, 1_000)
            if offline_db is None:
                data = _call(
                    t,
                    "GET",
                    "/v1/dead-letters",
                    params={**_query(fields), "after_seq": after, "limit": page},
                )
                if data is None:
                    offline_db = _read_only(_offline(t, "/v1/dead-letters"))
            if offline_db is not None:
                try:
                    records = offline_db.dead_letters(page, _filter(fields, after))
                except StoreError as e:
                    raise CliError(str(e)) from e
                items = [r.as_dict() for r in records]
                after = records[-1].seq if records else after
                more = len(records) == page
            else:
                items = data["dead_letters"]
                more = data["next_after_seq"] is not None
                after = data["next_after_seq"] or after
            yield from items
            remaining -= len(items)
            if not more:
                return
    finally:
        if offline_db is not None:
            offline_db.close()


def _dead_letters(n: int) -> str:
    return f"{n} dead letter" if n == 1 else f"{n} dead letters"


def _with_times(record: Mapping[str, Any]) -> dict[str, Any]:
    """A dead letter for people: Unix times (``…_at`` numbers) as RFC 3339 UTC."""
    out = dict(record)
    for key, value in record.items():
        if key.endswith("_at") and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = (
                datetime.fromtimestamp(value, UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )
    return out


def _cmd_dl_list(args: argparse.Namespace) -> int:
    t = _target(args)
    items = list(_iter_dead_letters(t, _filter_fields(args), args.limit, args.from_file))
    if args.json:
        _out(json.dumps([_with_times(d) for d in items], indent=2))
        return 0
    now = time.time()
    tty = sys.stdout.isatty()
    rows = [
        [
            d["id"], d["kind"], d["agent_key"], d["event_type"], d["reason"], d["status"],
            _age(now - d["dead_at"]), d["detail"][:60] if tty else d["detail"],
        ]
        for d in items
    ]  # fmt: skip
    headers = ("id", "kind", "agent_key", "event_type", "reason", "status", "dead_for", "detail")
    # Cut to fit a terminal only: piped, every byte of the detail goes to the next program.
    _out(format_table(headers, rows, tty=tty))
    return 0


def _cmd_dl_show(args: argparse.Namespace) -> int:
    t = _target(args)
    items = list(_iter_dead_letters(t, {"ids": [args.event_id]}, 1, args.from_file))
    if not items:
        raise CliError(f"no dead letter with id {args.event_id}")
    _out(json.dumps(_with_times(items[0]), indent=2))
    return 0


def _cmd_dl_export(args: argparse.Namespace) -> int:
    t = _target(args)
    out_path: str = args.output
    n = 0
    stream = sys.stdout if out_path == "-" else open(out_path, "w", encoding="utf-8")  # noqa: SIM115
    try:
        for item in _iter_dead_letters(t, _filter_fields(args), args.limit, args.from_file):
            stream.write(json.dumps(item, separators=(",", ":")) + "\n")
            n += 1
            if n % 1000 == 0:
                _progress(f"exported {_dead_letters(n)}…")
    finally:
        if stream is not sys.stdout:
            stream.close()
    _progress_done()
    if out_path != "-":
        _out(f"exported {_dead_letters(n)} to {out_path}")
    return 0


def _change_dead_letters(t: _Target, args: argparse.Namespace, action: str) -> int:
    """Retry or purge in chunks, through the API or on the database; returns how many."""
    started = time.time()
    limit: int | None = args.limit
    done = 0
    verb = "re-queued" if action == "retry" else "purged"
    key = "requeued" if action == "retry" else "purged"
    while limit is None or done < limit:
        chunk = min(1_000, (limit - done) if limit is not None else 1_000)
        fields = _filter_fields(args, started)
        data = _call(t, "POST", f"/v1/dead-letters/{action}", body={**fields, "limit": chunk})
        if data is None:
            _offline(t, f"/v1/dead-letters/{action}")
            _quiet_logs()
            return done + asyncio.run(
                _change_offline(t, args, action, started=started, limit=limit, done=done)
            )
        n = int(data[key])
        done += n
        _progress(f"{verb} {_dead_letters(done)}…")
        if n < chunk:
            break
    _progress_done()
    return done


async def _change_offline(
    t: _Target,
    args: argparse.Namespace,
    action: str,
    *,
    started: float,
    limit: int | None,
    done: int,
) -> int:
    async def work(store: Store) -> int:
        n_total = 0
        while limit is None or done + n_total < limit:
            chunk = min(1_000, (limit - done - n_total) if limit is not None else 1_000)
            flt = _filter(_filter_fields(args, started))
            if action == "retry":
                n = await store.requeue_dead_letters(flt, chunk)
            else:
                n = await store.purge_dead_letters(flt, chunk)
            n_total += n
            _progress(
                f"{'re-queued' if action == 'retry' else 'purged'} {_dead_letters(done + n_total)}…"
            )
            if n < chunk:
                break
        _progress_done()
        return n_total

    return await _with_store(t, work)


def _cmd_dl_retry(args: argparse.Namespace) -> int:
    t = _target(args)
    n = _change_dead_letters(t, args, "retry")
    _out(f"re-queued {_dead_letters(n)} (original ids and idempotency keys)")
    return 0


def _count_matching(t: _Target, fields: Mapping[str, Any]) -> int:
    data = _call(t, "GET", "/v1/dead-letters/count", params=_query(fields))
    if data is not None:
        return int(data["count"])
    with _read_only(_offline(t, "/v1/dead-letters/count")) as db:
        try:
            return db.count_dead_letters(_filter(fields))
        except StoreError as e:
            raise CliError(str(e)) from e


def _cmd_dl_purge(args: argparse.Namespace) -> int:
    t = _target(args)
    matching = _count_matching(t, _filter_fields(args))
    if matching == 0:
        _out("no dead letters match; nothing purged")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(
                f"{_dead_letters(matching)} match; pass --yes to purge them without a prompt"
            )
        answer = input(f"Delete {_dead_letters(matching)} for good (their counts stay)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            _out("nothing purged")
            return 1
    n = _change_dead_letters(t, args, "purge")
    _out(f"purged {_dead_letters(n)} (still counted as dead-lettered)")
    return 0


# --- salvage and check --------------------------------------------------------------------


def _cmd_salvage(args: argparse.Namespace) -> int:
    t = _target(args)
    source = Path(args.file)
    if source.resolve() == t.db.resolve():
        raise CliError(f"{source} is the live database; salvage a moved-aside copy")
    report = SalvageReport()
    totals = {"imported": 0, "duplicates": 0, "conflicts": 0}
    offline = False
    with _read_file(t, source) as db:
        try:
            dead: int | None = db.count_dead_letters(DeadLetterFilter())
        except StoreError:
            dead = None  # a damaged table: said below
        chunks = db.salvage(report)
        for chunk in chunks:
            bodies = _salvage_bodies(chunk, t.settings.max_body_bytes)
            for i, records in enumerate(bodies):
                too_big = _too_big_to_post(records, t.settings.max_body_bytes)
                if too_big is not None:
                    _progress_done()
                    raise CliError(f"{too_big} ({totals['imported']} salvaged before it)")
                data = _call(t, "POST", "/v1/salvage", body={"events": records})
                if data is None:  # nothing listens (any more): import the rest directly
                    _offline(t, "/v1/salvage", create=True)
                    _quiet_logs()
                    rest = chunk[sum(len(r) for r in bodies[:i]) :]
                    data = asyncio.run(_salvage_offline(t, rest, chunks))
                    offline = True
                for k in totals:
                    totals[k] += int(data[k])
                if offline:
                    break
            if offline:
                break
            _progress(f"salvaged {totals['imported']} events…")
    _progress_done()
    _out(
        f"salvaged {totals['imported']} events from {source} "
        f"({totals['duplicates']} already queued, {totals['conflicts']} with a reused key skipped, "
        f"{len(report.unreadable)} unreadable rows skipped)"
    )
    damage = format_salvage_damage(report)
    if damage:
        _out(damage)
    if dead != 0:
        # Salvage queues only what was queued: the file's dead letters (refused by Valmi or
        # expired) are not sent again unasked, and would go with the file.
        held = "its dead letters could not be counted" if dead is None else _dead_letters(dead)
        _out(
            f"{held} stay in {source}, not queued again: see them with `{PROG} dead-letters "
            f"list --from {source}` and keep them with `{PROG} dead-letters export --from "
            f"{source} -o FILE` before deleting it"
        )
    return 0


def format_salvage_damage(report: SalvageReport) -> str:
    """What salvage could not queue again, row by row, and where the file is damaged."""
    lines = []
    for row in report.unreadable:
        where = " ".join(
            part
            for part in (row.id or "", f"(seq {row.seq})" if row.seq is not None else "")
            if part
        )
        lines.append(f"unreadable: {where or 'a row'}: {row.reason}")
    for first, last in report.damaged:
        seqs = f"seq {first}" if first == last else f"seqs {first}-{last}"
        lines.append(
            f"damaged: no row with {seqs} could be read (rows there, if any, cannot be salvaged)"
        )
    if report.unchecked:
        lines.append(
            f"unchecked: {report.unchecked} of the events queued again had no key row left "
            "to check their idempotency key, id and body against (only the rest of their "
            "row vouched for them)"
        )
    if report.gave_up:
        lines.append(
            "damaged: the events table could not be walked to its end; rows after the last "
            "one read may be missing"
        )
    if report.errors:
        lines.append("SQLite said: " + "; ".join(sorted(report.errors)))
    return "\n".join(lines)


#: ``{"events": []}`` around the records of one POST /v1/salvage body.
_SALVAGE_WRAPPER_BYTES: Final = len(json.dumps({"events": []}))


def _salvage_bodies(events: list[NewEvent], limit: int) -> list[list[dict[str, Any]]]:
    """The records of ``events`` in POST bodies of at most ``limit`` bytes (the sidecar's
    ``max_body_bytes``), in order; a record too big for any body is alone in its own.
    Sizes are measured as ``json.dumps`` writes them (ASCII escapes, spaced separators):
    never smaller than what the client sends."""
    bodies: list[list[dict[str, Any]]] = []
    records: list[dict[str, Any]] = []
    size = _SALVAGE_WRAPPER_BYTES
    for event in events:
        record = salvage_record(event)
        n = len(json.dumps(record)) + 2  # and ", " before the next one
        if records and size + n > limit:
            bodies.append(records)
            records, size = [], _SALVAGE_WRAPPER_BYTES
        records.append(record)
        size += n
    if records:
        bodies.append(records)
    return bodies


def _too_big_to_post(records: list[dict[str, Any]], limit: int) -> CliError | None:
    if len(records) > 1 or _SALVAGE_WRAPPER_BYTES + len(json.dumps(records[0])) <= limit:
        return None
    return CliError(
        f"event {records[0]['id']} is too big to salvage through the sidecar's API "
        f"(more than max_body_bytes={limit} allows in one request); stop the sidecar and "
        f"run `{PROG} salvage` again: it then writes the database directly, and the events "
        "already salvaged are recognised by their keys and not stored twice"
    )


async def _salvage_offline(
    t: _Target, first: list[NewEvent], rest: Iterator[list[NewEvent]]
) -> dict[str, int]:
    async def work(store: Store) -> dict[str, int]:
        totals = {"imported": 0, "duplicates": 0, "conflicts": 0}
        chunk: list[NewEvent] | None = first
        while chunk is not None:
            result = await store.import_events(chunk)
            totals["imported"] += result.imported
            totals["duplicates"] += result.duplicates
            totals["conflicts"] += result.conflicts
            _progress(f"salvaged {totals['imported']} events…")
            chunk = await asyncio.to_thread(next, rest, None)
        return totals

    return await _with_store(t, work)


def _cmd_check(args: argparse.Namespace) -> int:
    t = _target(args)
    path = Path(args.file) if args.file else t.db
    with _read_file(t, path) if args.file else _read_only(path) as db:
        try:
            problems = db.integrity_check()
        except StoreError as e:
            raise CliError(f"{path} is damaged: {e}") from e
    if problems:
        for p in problems:
            _out(p)
        _error(
            f"{path} failed the integrity check ({len(problems)} problems); stop the sidecar, "
            f"move the file aside (or restart: the sidecar does it) and run `{PROG} salvage` on it"
        )
        return 1
    _out(f"{path}: ok")
    return 0


def _add_operator_commands(sub: Any) -> None:
    ledger = sub.add_parser(
        "ledger",
        help="events per agent key, event type and UTC day: received, queued, delivered, dead-lettered",
        description="The billing ledger: per agent key, event type and UTC day of receipt, the "
        "events received, still queued, delivered and dead-lettered, and for outcomes the "
        "summed value. Totals reconcile with the event counts of `status`.",
    )
    _add_target_flags(ledger)
    _add_from_flag(ledger, "the ledger")
    ledger.add_argument("--agent-key", help="only this agent key")
    ledger.add_argument("--since", type=_utc_day, metavar="YYYY-MM-DD", help="from this UTC day")
    ledger.add_argument(
        "--until", type=_utc_day, metavar="YYYY-MM-DD", help="to this UTC day (inclusive)"
    )
    form = ledger.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON (rows and totals)")
    form.add_argument("--csv", action="store_true", help="print CSV")

    dl = sub.add_parser(
        "dead-letters",
        help="list, show, retry, purge or export the dead letters",
        description="Dead letters: events upstream refused for good (reason 'rejected') or that "
        "waited longer than max_event_age_s ('expired'). Through the running sidecar's API, "
        "else on the data directory's database.",
    )
    dls = dl.add_subparsers(dest="dl_command", metavar="ACTION", required=True)
    p = dls.add_parser("list", help="list dead letters (a table, or --json)")
    _add_target_flags(p)
    _add_from_flag(p)
    _add_filter_flags(p)
    p.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (default: 100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = dls.add_parser("show", help="one dead letter, with its body, as JSON")
    _add_target_flags(p)
    _add_from_flag(p)
    p.add_argument("event_id", metavar="ID", help="the event id (evt_…)")
    p = dls.add_parser(
        "retry",
        help="re-queue dead letters with their original idempotency keys",
        description="Re-queue matching dead letters: each keeps its id and idempotency key "
        "and moves from dead-lettered to queued (received is unchanged, so the counts "
        "reconcile). Only those dead-lettered before the command started.",
    )
    _add_target_flags(p)
    _add_filter_flags(p)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N (default: all)")
    p = dls.add_parser(
        "purge",
        help="delete dead letters for good (asks first unless --yes)",
        description="Delete matching dead letters. They stay counted as dead-lettered (in "
        "status, metrics and the ledger); only the stored events go.",
    )
    _add_target_flags(p)
    _add_filter_flags(p)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N (default: all)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = dls.add_parser("export", help="write dead letters as NDJSON (one JSON object a line)")
    _add_target_flags(p)
    _add_from_flag(p)
    _add_filter_flags(p)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N (default: all)")
    p.add_argument(
        "--output", "-o", default="-", metavar="FILE", help="file to write (default: stdout)"
    )

    salvage = sub.add_parser(
        "salvage",
        help="re-queue every readable event of a moved-aside database",
        description="Read a damaged database that the sidecar moved aside "
        "(queue.db.corrupt-<time>) and queue every readable event again with its original "
        "id and idempotency key, through the running sidecar or on the data directory.",
    )
    _add_target_flags(salvage)
    salvage.add_argument("file", metavar="FILE", help="the moved-aside database")

    check = sub.add_parser(
        "check",
        help="run SQLite's integrity check on the database (read-only)",
        description="PRAGMA integrity_check on the data directory's database (or FILE), "
        "read-only: safe while the sidecar runs. Exit 0 when ok, 1 with the problems.",
    )
    _add_target_flags(check)
    check.add_argument(
        "file", metavar="FILE", nargs="?", help="a database file (default: the data directory's)"
    )


OPERATOR_COMMANDS: Mapping[str, Callable[[argparse.Namespace], int]] = {
    "ledger": _cmd_ledger,
    "salvage": _cmd_salvage,
    "check": _cmd_check,
}
DEAD_LETTER_COMMANDS: Mapping[str, Callable[[argparse.Namespace], int]] = {
    "list": _cmd_dl_list,
    "show": _cmd_dl_show,
    "retry": _cmd_dl_retry,
    "purge": _cmd_dl_purge,
    "export": _cmd_dl_export,
}
