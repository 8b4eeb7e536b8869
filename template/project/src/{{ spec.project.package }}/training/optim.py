"""Optimizers and learning-rate schedules, chosen by the ``training`` section of the config.

Every schedule is a multiplier of ``training.lr`` applied with ``LambdaLR`` and stepped once
per optimizer update (not per micro-batch, not per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainingConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` with the config's settings."""
    params = list(params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=cfg.lr, eps=cfg.eps, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(cfg: TrainingConfig, step: int, *, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` for optimizer update number ``step`` (counted from 1).

    - ``constant``: 1.
    - ``noam`` (Vaswani et al., 2017, eq. 3):
      ``schedule_d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)``; ``lr`` is the
      factor in front (1 in the paper).
    - ``inverse_sqrt``: ``sqrt(warmup_steps / step)`` after warm-up, i.e. noam's decay scaled
      to peak at ``lr``.
    - ``cosine`` / ``linear``: from 1 down to ``min_lr / lr`` at ``total_steps``.
    - ``step``: times ``gamma`` every ``step_size`` epochs.

    Every schedule but noam (which has its own) starts with ``warmup_steps`` of linear warm-up.
    """
    warmup = cfg.warmup_steps
    if cfg.schedule == "noam":
        decay = step**-0.5 if warmup == 0 else min(step**-0.5, step * warmup**-1.5)
        return cfg.schedule_d_model**-0.5 * decay
    if step <= warmup:
        return step / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / step)
    if cfg.schedule == "step":
        return cfg.gamma ** ((step - 1) // (cfg.step_size * steps_per_epoch))
    floor = cfg.min_lr / cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, *, total_steps: int, steps_per_epoch: int
) -> LambdaLR:
    """``LambdaLR`` following :func:`lr_factor`; call ``step()`` after each optimizer update.

    ``LambdaLR`` evaluates the factor once on construction, so a bad schedule fails here.
    """
    if cfg.schedule == "noam" and cfg.schedule_d_model <= 0:
        raise ValueError("the noam schedule needs training.schedule_d_model > 0")

    def factor(updates_done: int) -> float:  # LambdaLR counts from 0; updates from 1
        return lr_factor(
            cfg, updates_done + 1, total_steps=total_steps, steps_per_epoch=steps_per_epoch
        )

    return LambdaLR(optimizer, factor)
