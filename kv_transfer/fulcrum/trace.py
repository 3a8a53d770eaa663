"""Per-transfer timestamps for latency breakdowns (off unless ``FULCRUM_KV_TRACE`` is set).

With ``FULCRUM_KV_TRACE=/path/file.jsonl`` every vLLM process that loads the connector
(engine core: scheduler side; worker: transfers) appends one JSON line per event:
``{"t": wall-clock seconds, "ev": name, "pid": ..., "req": vLLM request id, "tid":
transfer id, ...}``. Wall-clock time so events of different processes on one host line up.
Lines are short single ``write`` calls on an ``O_APPEND`` descriptor, so processes do not
interleave within a line. ``benchmarks/pd_breakdown.py`` reads them.

Events: ``admit`` (the scheduler first considers a request), ``prefill_done`` (a producer's
request finished and its blocks are held), ``hold`` (the producer worker registered the
lease), ``serve_start`` / ``serve_end`` (producer answers a read), ``pull_submit`` (the
consumer worker got the pull job), ``pull_start`` (a pull thread picked it up),
``pull_reply`` (the producer accepted the read: first byte), ``pull_done`` (bytes landed),
``pull_reported`` (the engine learned the pull is over).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

ENV = "FULCRUM_KV_TRACE"


class Tracer:
    """Appends events to a file; a disabled tracer costs one attribute check per event."""

    def __init__(self, path: str | None) -> None:
        self.path = path or None
        self._fd: int | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def event(self, ev: str, **fields: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"t": time.time(), "ev": ev, "pid": os.getpid(), **fields},
                          separators=(",", ":")) + "\n"
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(self._fd, line.encode())


TRACE = Tracer(os.environ.get(ENV))


def read_events(path: str) -> list[dict[str, Any]]:
    """All events of a trace file, in time order (torn or foreign lines skipped)."""
    out: list[dict[str, Any]] = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and "t" in event and "ev" in event:
                    out.append(event)
    except FileNotFoundError:
        return []
    out.sort(key=lambda e: e["t"])
    return out
