"""Checkpoints: model, optimizer, schedule, progress and the config that produced them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..config import Config
from .backends import Backend


def save_checkpoint(
    path: str | Path,
    backend: Backend,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    step: int,
    epoch: int,
    config: Config,
    objective: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint; call on every rank (the backend decides who writes).

    The file is written beside ``path`` and renamed into place, so an interrupted run never
    leaves a truncated checkpoint where the last good one was. ``objective`` is what the
    training objective keeps besides the model (a diffusion model's moving average).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)  # every rank: on XLA, torch-xla picks the writer
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "epoch": epoch,
        "config": dataclasses.asdict(config),
        "objective": objective or {},
    }
    backend.save(state, tmp)
    if backend.is_master:
        os.replace(tmp, path)
    backend.barrier()  # no rank reads the file before it is in place


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    objective: Any = None,
) -> dict[str, Any]:
    """Restore what the checkpoint holds into ``model`` (and the optimizer, the schedule and
    the training objective's own state, e.g. a moving average of the weights).

    Load before :meth:`Backend.prepare` or after it alike: tensors are read onto the CPU and
    copied into the parameters wherever they live. Returns the whole checkpoint dict.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if objective is not None:
        objective.load_state_dict(state.get("objective", {}))
    return state
