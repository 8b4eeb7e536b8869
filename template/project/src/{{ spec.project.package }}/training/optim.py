"""Optimizers and learning-rate schedules, chosen by the ``training`` section of the config.

Every schedule is a multiplier of ``training.lr`` applied with ``LambdaLR`` and stepped once
per optimizer update (not per micro-batch, not per epoch).

On a lazy (XLA) device a learning rate held as a Python float is a scalar in the graph, new
at every update; where it, or an expression of it, takes a value that is special to XLA (AdamW's
``1 - lr * weight_decay`` rounds to 1.0 late in a decay; a rate of exactly 0 shares its device
value with the graph's other zeros) the step graph changes and compiles again. There Adam and
AdamW run ``capturable`` (step count and bias corrections on the device, no host read) with the
learning rate a ``[1]`` tensor on the device (``lr_device``), which :class:`Schedule` replaces
after every update with the next rate copied from the host: data, never a graph constant.
:func:`scheduled_lr` is the rate read on the host, for logs. Capturable Adam divides by the
rate, so a device rate is never exactly 0 (see :data:`MIN_DEVICE_LR`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainingConfig

#: The least learning rate held on a device. Capturable Adam computes its step from
#: ``bias_correction / lr``: a rate of exactly 0 (the last update of a decay to 0) gives 0/0 = NaN
#: in every parameter whose moments are still 0, such as an embedding row never read. A rate of
#: 1e-30 keeps every term finite in float32 and moves no weight by a representable amount.
MIN_DEVICE_LR = 1e-30


def build_optimizer(
    params: Iterable[nn.Parameter], cfg: TrainingConfig, *, lr_device: torch.device | None = None
) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` with the config's settings.

    With ``lr_device``, Adam and AdamW hold the learning rate as a tensor on that device (see
    the module docstring); the other optimizers read it as a number in every update.
    """
    params = list(params)
    if cfg.optimizer in ("adam", "adamw"):
        adam = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        optimizer = adam(
            params,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            # On the device the whole update stays there; the CPU has no capturable mode and
            # reads a CPU tensor rate at no cost.
            capturable=lr_device is not None and lr_device.type != "cpu",
        )
        if lr_device is not None:
            _lr_on_device(optimizer, lr_device)
            optimizer.register_load_state_dict_post_hook(partial(_lr_on_device, device=lr_device))
        return optimizer
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


def _lr_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every group's learning rate a ``[1]`` float32 tensor on ``device``, copied from the
    host (also after a checkpoint is loaded, which brings it back as a float or a CPU tensor).
    Not 0-d: XLA takes a 0-d value copied to the device for a scalar of the graph."""
    for group in optimizer.param_groups:
        rate = max(float(group["lr"]), MIN_DEVICE_LR)
        group["lr"] = torch.tensor([rate], dtype=torch.float32).to(device)


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


class Schedule(LambdaLR):
    """``LambdaLR`` that copies each rate to the device where the optimizer keeps it there.

    LambdaLR fills a tensor learning rate in place with a number, which on XLA is a scalar of
    the step graph; each step here replaces that tensor with the rate copied from the host.
    """

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        for group, base_lr, factor in zip(
            self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True
        ):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                rate = max(base_lr * factor(self.last_epoch), MIN_DEVICE_LR)
                group["lr"] = torch.tensor([rate]).to(lr.device)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, *, total_steps: int, steps_per_epoch: int
) -> Schedule:
    """A :class:`Schedule` following :func:`lr_factor`; call ``step()`` after each update.

    ``LambdaLR`` evaluates the factor once on construction, so a bad schedule fails here. The
    base rate is ``cfg.lr`` as a number, also where the optimizer holds a tensor.
    """
    if cfg.schedule == "noam" and cfg.schedule_d_model <= 0:
        raise ValueError("the noam schedule needs training.schedule_d_model > 0")
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", cfg.lr)

    def factor(updates_done: int) -> float:  # LambdaLR counts from 0; updates from 1
        return lr_factor(
            cfg, updates_done + 1, total_steps=total_steps, steps_per_epoch=steps_per_epoch
        )

    return Schedule(optimizer, factor)


def scheduled_lr(scheduler: LambdaLR) -> float:
    """The learning rate of the next update, computed on the host (reading the optimizer's own,
    a tensor on a lazy device, would wait for the device)."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)
