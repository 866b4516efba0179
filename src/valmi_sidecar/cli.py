"""Command line: ``valmi-sidecar run | fake-api | status``.

Every ``run`` flag is generated from ``Settings`` and its help says the default and the
environment variable, so the three stay in step. Config problems exit 2 before anything
starts; the service and the fake API are imported only when they are about to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx

from . import __version__
from .config import (
    ENV_API_KEY,
    ENV_API_KEY_FILE,
    ENV_API_URL,
    ENV_CONFIG,
    ENV_INGEST_TOKEN,
    ENV_INGEST_TOKEN_FILE,
    PLAIN_FIELDS,
    ConfigError,
    Settings,
    env_var,
    field_choices,
    field_default,
    field_kind,
    flag,
    load_settings,
    split_listen,
)
from .logs import configure_logging

PROG = "valmi-sidecar"
FAKE_API_LISTEN = "127.0.0.1:8788"
FAKE_API_KEY = "sk_test_fake"

#: What each setting does; the flag's help adds the default and the environment variable.
DESCRIPTIONS: Mapping[str, str] = {
    "listen": "address for the local HTTP API, HOST:PORT; anything but loopback needs an ingest token",
    "data_dir": "directory for the SQLite queue (created 0700)",
    "api_url": f"base URL of the Valmi API (also read from {ENV_API_URL})",
    "durability": "SQLite synchronous mode: 'full' survives power loss, 'normal' only process crashes",
    "max_queue_bytes": "queue size limit in bytes; when reached, new events get 503 with Retry-After",
    "max_queue_events": "queue size limit in events; when reached, new events get 503 with Retry-After",
    "max_body_bytes": "largest request body accepted, in bytes (413 beyond)",
    "rate_limit_per_min": "upstream requests per minute, the API key's budget",
    "max_event_age_s": "seconds an event may wait in the queue before it is dead-lettered",
    "dedup_window_s": "seconds an Idempotency-Key is remembered for client retries",
    "backoff_base_s": "first retry delay in seconds after an upstream failure (exponential, full jitter)",
    "backoff_cap_s": "longest retry delay in seconds",
    "upstream_timeout_s": "timeout of one upstream request, in seconds",
    "upstream_concurrency": "upstream requests in flight at once",
    "flush_batch_size": "events leased from the queue per flusher round",
    "final_flush_s": "seconds to keep forwarding after SIGTERM before exiting",
    "shutdown_grace_s": "seconds to let in-flight ingest requests finish on shutdown",
    "client_timeout_s": "seconds a client has to send its headers and body (or to stay idle between requests) before its connection is closed",
    "log_level": "lowest level logged",
    "log_format": "log lines: 'json' (one object per line), 'console', or 'auto' (console on a terminal)",
    "access_log": "log every HTTP request to the local API",
}

_METAVARS: Mapping[str, str] = {"listen": "HOST:PORT", "api_url": "URL"}

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
    value = field_default(name)
    if isinstance(value, bool):
        return "on" if value else "off"
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
        help="show the queue and upstream state of a running sidecar",
        description="Ask a running sidecar for GET /v1/status and print a summary. The "
        f"address and the ingest token come from the same config file and environment "
        f"as 'run' ({env_var('listen')}, {ENV_INGEST_TOKEN} / {ENV_INGEST_TOKEN_FILE}).",
    )
    _add_config_flag(status)
    status.add_argument(
        "--url",
        default=None,
        help=f"status URL (default: http://<listen>/v1/status, listen from {env_var('listen')} "
        "or the config file, else 127.0.0.1:8787)",
    )
    status.add_argument(
        "--json", action="store_true", help="print the raw JSON (default: a readable summary)"
    )
    status.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for an answer (default: 5)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _cmd_run,
        "fake-api": _cmd_fake_api,
        "status": _cmd_status,
    }
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return commands[args.command](args)
    except ConfigError as e:
        _error(str(e))
        return 2


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)  # noqa: T201 - the CLI's output


def _out(text: str) -> None:
    print(text)  # noqa: T201 - the CLI's output


# --- run ----------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in PLAIN_FIELDS}
    overrides["api_key_file"] = args.api_key_file
    overrides["ingest_token_file"] = args.ingest_token_file
    settings = load_settings(argv_overrides=overrides, config_file=args.config)

    # Imported here so that --help and config errors never depend on the service.
    from .service import run as run_service  # noqa: PLC0415

    return run_service(settings)


# --- fake-api -----------------------------------------------------------------------------


def _cmd_fake_api(args: argparse.Namespace) -> int:
    host, port = split_listen(args.listen)
    keys: list[str] = args.api_key or [FAKE_API_KEY]
    if args.rate_limit_per_min is not None and args.rate_limit_per_min <= 0:
        raise ConfigError(f"--rate-limit-per-min: {args.rate_limit_per_min} must be greater than 0")

    from . import fake_api  # noqa: PLC0415 - only when it runs

    configure_logging(args.log_level)
    return run_until_signalled(
        lambda: fake_api.serve(
            host, port, api_keys=keys, rate_limit_per_min=args.rate_limit_per_min
        )
    )


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


def _cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings(config_file=args.config)
    url: str = args.url or status_url(settings)

    headers = {}
    if settings.ingest_token is not None:
        headers["Authorization"] = f"Bearer {settings.ingest_token.reveal()}"
    try:
        response = httpx.get(url, headers=headers, timeout=args.timeout)
    except httpx.ConnectError:
        _error(f"no sidecar answering at {url}; is `{PROG} run` running?")
        return 1
    except httpx.TimeoutException:
        _error(f"the sidecar at {url} did not answer within {args.timeout:g} s")
        return 1
    except httpx.HTTPError as e:
        _error(f"cannot ask {url}: {type(e).__name__}: {e}")
        return 1
    if response.status_code != 200:
        hint = ""
        if response.status_code == 401:
            hint = f"; set {ENV_INGEST_TOKEN} or {ENV_INGEST_TOKEN_FILE} to the sidecar's token"
        _error(f"{url} answered HTTP {response.status_code}: {response.text[:500]}{hint}")
        return 1
    try:
        data = response.json()
    except ValueError:
        _error(f"{url} answered with something that is not JSON: {response.text[:200]!r}")
        return 1
    if args.json or not isinstance(data, dict):
        _out(json.dumps(data, indent=2, sort_keys=True))
    else:
        _out(format_status(data))
    return 0


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
        limit = queue.get("max_bytes")
        of = f" of {limit}" if isinstance(limit, int) else ""
        lines.append(f"{'queued bytes':<{width}}  {queue['bytes']}{of}")
    lines.append(f"{'oldest queued':<{width}}  {_age(age) if age is not None else 'none'}")
    upstream = data.get("upstream")
    state = upstream.get("state") if isinstance(upstream, Mapping) else upstream
    if state is None:
        state = _find(data, "upstream_state")
    lines.append(f"{'upstream':<{width}}  {state if state is not None else '-'}")
    error = upstream.get("last_error") if isinstance(upstream, Mapping) else None
    if error is None:
        error = _find(data, "last_error")
    lines.append(f"{'last error':<{width}}  {error if error else 'none'}")
    return "\n".join(lines)
