#!/usr/bin/env python3
"""A small agent that bills through the local valmi-sidecar, the way a real one should.

- It posts each billable event to the sidecar (``http://127.0.0.1:8787`` by default), not
  to Valmi: the sidecar answers ``202`` once the event is on disk and forwards it itself.
- It gives each event one ``Idempotency-Key`` and sends the same key on every retry, so
  an event is recorded once however many times it is sent.
- On ``503`` (the queue is full, the sidecar is draining or cannot write: nothing was
  stored) it waits as long as ``Retry-After`` says and sends again; after a connection
  error (the sidecar restarting) too. ``--max-wait-s`` caps one wait.
- Any other refusal (``400``, ``401``, ``413``, ``415``) cannot get better by sending
  again: it is reported and the agent goes on.
- SIGTERM or SIGINT stops it cleanly: a request under way finishes, an event still
  waiting for a retry is reported as not recorded, and it exits 0 (1 if something was
  refused).

One JSON line per thing that happened goes to stdout. Needs httpx (``pip install
httpx``); ``json=`` sends ``Content-Type: application/json``, which the sidecar requires.

    python examples/agent.py --events 10
    VALMI_SIDECAR_INGEST_TOKEN=... python examples/agent.py --sidecar http://sidecar:8787
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import uuid
from typing import Any

import httpx

DEFAULT_SIDECAR = "http://127.0.0.1:8787"
#: The wait before a retry when the answer gives no usable Retry-After, or none came.
DEFAULT_WAIT_S = 1.0


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)  # noqa: T201 - the example's output


def retry_after_s(response: httpx.Response) -> float:
    """``Retry-After`` in seconds (the sidecar sends whole seconds)."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return DEFAULT_WAIT_S


def error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}"


class Agent:
    def __init__(self, client: httpx.Client, stop: threading.Event, max_wait_s: float) -> None:
        self.client = client
        self.stop = stop
        self.max_wait_s = max_wait_s
        self.accepted = 0
        self.refused = 0
        self.not_recorded = 0

    def post(self, path: str, body: dict[str, Any]) -> None:
        """Post one event until the sidecar takes it or refuses it for good, or the agent
        is stopped."""
        key = str(uuid.uuid4())  # once per event: every retry repeats it
        while True:
            try:
                response = self.client.post(path, json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError as exc:
                status, reason, wait = None, type(exc).__name__, DEFAULT_WAIT_S
            else:
                if response.status_code == 202:
                    self.accepted += 1
                    emit(event="accepted", id=response.json()["id"], idempotency_key=key)
                    return
                if response.status_code != 503:
                    self.refused += 1
                    emit(
                        event="refused",
                        status=response.status_code,
                        code=error_code(response),
                        idempotency_key=key,
                    )
                    return
                status, reason, wait = 503, error_code(response), retry_after_s(response)
            wait_s = min(wait, self.max_wait_s)
            emit(
                event="retrying",
                status=status,
                reason=reason,
                retry_after_s=wait,
                wait_s=wait_s,
                idempotency_key=key,
            )
            if self.stop.wait(wait_s):
                self.not_recorded += 1
                emit(event="not_recorded", idempotency_key=key, reason="stopped")
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecar", default=os.environ.get("VALMI_SIDECAR_URL", DEFAULT_SIDECAR))
    parser.add_argument("--events", type=int, default=10, help="actions to post (default 10)")
    parser.add_argument("--interval-s", type=float, default=0.0, help="pause between events")
    parser.add_argument("--agent-key", default="agent_example")
    parser.add_argument(
        "--max-wait-s", type=float, default=60.0, help="longest wait before one retry"
    )
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # The handler only sets the flag: a request under way finishes first.
        signal.signal(sig, lambda _sig, _frame: stop.set())

    headers = {}
    token = os.environ.get("VALMI_SIDECAR_INGEST_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(base_url=args.sidecar, headers=headers, timeout=10.0) as client:
        agent = Agent(client, stop, args.max_wait_s)
        for step in range(args.events):
            if stop.is_set():
                break
            agent.post(
                "/v1/actions",
                {
                    "agent_key": args.agent_key,
                    "action_type": "llm_call",
                    "metadata": {"step": step, "model": "example"},
                },
            )
            if args.interval_s and stop.wait(args.interval_s):
                break
    emit(
        event="stopped",
        reason="signal" if stop.is_set() else "done",
        accepted=agent.accepted,
        refused=agent.refused,
        not_recorded=agent.not_recorded,
    )
    return 1 if agent.refused else 0


if __name__ == "__main__":
    sys.exit(main())
