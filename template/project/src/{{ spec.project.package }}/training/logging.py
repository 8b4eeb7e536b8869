"""Plain logging to stdout and a JSON-lines metrics file, both from the master process only."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record comes (redirections, test capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def get_logger(name: str, *, is_master: bool = True) -> logging.Logger:
    """A stdout logger with one line per record; other ranks only report warnings."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_master else logging.WARNING)
    return logger


class MetricsFile:
    """Appends one JSON object per event to ``<log_dir>/metrics.jsonl``.

    Each record has ``event`` (``start``, ``step``, ``epoch``, ``end``) and ``time`` (Unix
    seconds); a new run starts with a ``start`` record, so resumed runs append.
    """

    def __init__(self, log_dir: str | Path, *, enabled: bool = True) -> None:
        self.path = Path(log_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
