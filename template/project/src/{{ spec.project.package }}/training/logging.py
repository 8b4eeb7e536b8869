"""Logging from the master process only: plain lines on stdout, and every metric to the
JSON-lines file ``metrics.jsonl``, TensorBoard event files and, when asked, Weights & Biases.

The three metric logs share one interface, ``write(event, **fields)`` and ``close()``, and
receive the same events from the trainer: values it has already read on the host, so logging
never reads the device mid-step (which would cut an XLA graph in two).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol


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

    def close(self) -> None:
        """Nothing to do: each record is written and closed at once."""


class MetricsLog(Protocol):
    """Where the trainer's events go: :class:`MetricsFile`, :class:`TensorBoardLog`,
    :class:`WandbLog`."""

    def write(self, event: str, **fields: Any) -> None: ...

    def close(self) -> None: ...


def scalars(event: str, fields: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``step`` or ``epoch`` event under their dashboard tags."""
    if event == "step":
        return {"train/loss": fields["loss"], "train/lr": fields["lr"]}
    if event == "epoch":
        val = {f"val/{name}": value for name, value in fields["val"].items()}
        return {"epoch/train_loss": fields["train_loss"], "epoch/lr": fields["lr"], **val}
    if event in ("iteration", "evaluation"):  # reinforcement learning (training/ppo.py)
        return {
            f"{event}/{k}": float(v) for k, v in fields.items() if k != "step" and v is not None
        }
    return {}


#: What each dashboard imports, and what to do when it is missing.
TENSORBOARD = (
    "torch.utils.tensorboard",
    "pip install tensorboard, or set training.tensorboard: false",
)
WANDB = ("wandb", "pip install '.[wandb]', or leave out --wandb (training.wandb)")


def require(module: str, install: str) -> ModuleType:
    """``module`` imported, or an ImportError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} cannot be imported ({exc}): {install}") from None


def check_dashboards(*, tensorboard: bool, wandb: bool) -> None:
    """Import the dashboards' packages now, so that a missing one stops a run before it starts."""
    for wanted, (module, install) in ((tensorboard, TENSORBOARD), (wandb, WANDB)):
        if wanted:
            require(module, install)


class TensorBoardLog:
    """The scalars of each step and epoch as TensorBoard event files in ``<log_dir>/tensorboard``
    (``tensorboard --logdir runs``)."""

    def __init__(self, log_dir: str | Path) -> None:
        board = require(*TENSORBOARD)
        self.path = Path(log_dir) / "tensorboard"
        self.writer = board.SummaryWriter(str(self.path))

    def write(self, event: str, **fields: Any) -> None:
        for tag, value in scalars(event, fields).items():
            self.writer.add_scalar(tag, value, fields["step"])

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """The same scalars in a Weights & Biases run (project ``$WANDB_PROJECT``, default
    ``project``; ``WANDB_MODE=offline`` keeps it on disk), its files under ``log_dir``."""

    def __init__(self, log_dir: str | Path, project: str, config: dict[str, Any]) -> None:
        wandb = require(*WANDB)
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        project = os.environ.get("WANDB_PROJECT", project)
        self.run = wandb.init(project=project, dir=str(log_dir), config=config)

    def write(self, event: str, **fields: Any) -> None:
        values = scalars(event, fields)
        if values:
            self.run.log(values, step=fields["step"])

    def close(self) -> None:
        self.run.finish()
