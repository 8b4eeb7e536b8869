"""The training loop: one for every device.

One optimizer update takes ``grad_accum_steps`` micro-batches. Each micro-batch runs forward
(under autocast), the loss and backward; the last one of a window also clips, updates the
weights and advances the learning-rate schedule. Everything that differs between devices is
behind :class:`~.backends.Backend`. The loop keeps to the rules that make lazy (XLA) devices
fast, and that cost nothing elsewhere:

- fixed shapes: the loaders drop the last partial batch, so the step compiles once;
- no host reads in the step: the loss stays on the device, is read every ``log_every`` updates
  through ``backend.on_host`` (a step closure on XLA), and once per epoch;
- one sync per step, made by the backend's loader (``MpDeviceLoader`` on XLA).

The master process logs what it has read to ``metrics.jsonl``, TensorBoard and, with
``training.wandb``, Weights & Biases (see :mod:`.logging`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from logging import Logger
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import Config, TrainingConfig
from ..data.info import DataInfo
from ..evaluation.evaluator import evaluate
from .backends import Backend, Batch
from .checkpoint import load_checkpoint, save_checkpoint
from .logging import MetricsFile, MetricsLog, TensorBoardLog, WandbLog, get_logger
from .losses import build_loss, rank_weight
from .objective import build_objective
from .optim import build_optimizer, build_scheduler, scheduled_lr


@dataclass(frozen=True)
class EpochResult:
    """What one epoch did; ``train_loss`` is the mean over its micro-batches and ranks."""

    epoch: int
    step: int
    train_loss: float
    val: dict[str, float]
    lr: float
    seconds: float


def planned_steps(cfg: TrainingConfig, steps_per_epoch: int) -> int:
    """Optimizer updates in the run: ``max_steps`` or ``epochs`` worth, whichever is fewer."""
    limits = [n for n in (cfg.max_steps, cfg.epochs and cfg.epochs * steps_per_epoch) if n]
    if not limits:
        raise ValueError("set training.epochs or training.max_steps")
    return min(limits)


class Trainer:
    """Trains ``model`` on ``train_loader``, evaluating and checkpointing after every epoch."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader,
        info: DataInfo,
        backend: Backend,
        *,
        logger: Logger | None = None,
    ) -> None:
        self.cfg, self.tc = cfg, cfg.training
        self.backend = backend
        self.model = model  # unwrapped: evaluation and checkpoints use it
        self.step_model = backend.prepare(model)  # what the step calls (DDP, compiled)
        self.train_loader, self.val_loader, self.info = train_loader, val_loader, info
        self.loss_fn = build_loss(self.tc, info)
        self.objective = build_objective(cfg, info, self.model)  # batch -> inputs, target
        lr_device = backend.device if backend.tensor_lr else None
        self.optimizer = build_optimizer(model.parameters(), self.tc, lr_device=lr_device)
        self.accum = self.tc.grad_accum_steps
        self.steps_per_epoch = len(train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(train_loader)} batches per epoch are fewer than grad_accum_steps "
                f"({self.accum}); lower data.batch_size or training.grad_accum_steps"
            )
        self.total_steps = planned_steps(self.tc, self.steps_per_epoch)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.scheduler = build_scheduler(
            self.optimizer,
            self.tc,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.step = 0  # optimizer updates done
        self.epoch = 0  # epochs done
        self.log = logger or get_logger(__name__, is_master=backend.is_master)
        self.metrics = MetricsFile(self.tc.log_dir, enabled=backend.is_master)
        self.logs: list[MetricsLog] = [self.metrics]  # fit() adds the dashboards
        self.checkpoint_path = Path(self.tc.checkpoint_dir) / "last.pt"

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> list[EpochResult]:
        """Train until ``total_steps`` updates are done; returns one result per epoch."""
        with self._dashboards():
            return self._fit()

    @contextlib.contextmanager
    def _dashboards(self) -> Iterator[None]:
        """TensorBoard and Weights & Biases logs for the length of a run, on the master."""
        opened: list[MetricsLog] = []
        if self.backend.is_master and self.tc.tensorboard:
            opened.append(TensorBoardLog(self.tc.log_dir))
        if self.backend.is_master and self.tc.wandb:
            config = dataclasses.asdict(self.cfg)
            opened.append(WandbLog(self.tc.log_dir, __name__.split(".")[0], config))
        self.logs += opened
        try:
            yield
        finally:
            for log in opened:
                log.close()
                self.logs.remove(log)

    def evaluate_only(self) -> list[EpochResult]:
        """Evaluate the model as loaded, with no optimizer step: the procedure of a paper whose
        method acts at inference time (a decoding rule on a pretrained model). The evaluation
        is :meth:`fit`'s own; the one result has step 0 and no training loss."""
        self._write("start", config=dataclasses.asdict(self.cfg), backend=self.backend.describe())
        self.log.info(
            "no training: inference-time method; evaluating on %s", self.backend.describe()
        )
        start = time.perf_counter()
        model = self.objective.eval_model(self.model)
        val = evaluate(
            model, self.val_loader, self.loss_fn, self.backend, self.info, self.objective
        )
        result = EpochResult(0, 0, math.nan, val, 0.0, time.perf_counter() - start)
        self.log.info("evaluation  %s", "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
        self._write("evaluation", step=0, **val)
        self._write("end", step=0)
        self.backend.barrier()  # every rank is done before any closes the process group
        return [result]

    def _fit(self) -> list[EpochResult]:
        self._write("start", config=dataclasses.asdict(self.cfg), backend=self.backend.describe())
        self.log.info(
            "training on %s: %d epoch(s), %d updates of %d micro-batch(es)",
            self.backend.describe(),
            self.epochs - self.epoch,
            self.total_steps - self.step,
            self.accum,
        )
        history = []
        while self.step < self.total_steps:
            self.epoch += 1
            history.append(self.run_epoch())
        self._write("end", step=self.step)
        return history

    def run_epoch(self) -> EpochResult:
        """One pass over the training data (cut short at ``total_steps``), then evaluation."""
        start = time.perf_counter()
        self.model.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)  # a new shuffle each epoch, the same on every rank
        micro_batches = min(self.steps_per_epoch, self.total_steps - self.step) * self.accum
        batches = itertools.islice(self.backend.loader(self.train_loader), micro_batches)
        # The epoch's loss sum stays on the device and is summed in the step. It starts as
        # data copied to the device, so on XLA every step after the very first runs one and the
        # same graph and the epoch needs no reduction graph of its own. (Shape [1], not a
        # scalar: XLA bakes a 0-d zero into the graph as a constant.)
        loss_sum = torch.zeros(1, dtype=torch.float32).to(self.backend.device)
        count = 0
        lr = scheduled_lr(self.scheduler)
        for i, batch in enumerate(batches):
            boundary = (i + 1) % self.accum == 0
            # Under DDP, gradients are averaged across ranks only at the window's end.
            with self.backend.no_sync(self.step_model, sync=boundary):
                loss = self.train_step(self.objective.prepare(batch))
            loss_sum = loss_sum + loss.float()
            count += 1
            if boundary:
                lr = self.update()
                if self.step % self.tc.log_every == 0 and self._reads_values:
                    self.backend.on_host(self._log_step, loss, self.step, lr)
        # Lazy devices: run the last update now, so it is not fused into evaluation's graphs.
        self.backend.mark_step()
        return self._finish_epoch(loss_sum, count, lr, start)

    def train_step(self, batch: Batch) -> Tensor:
        """Forward and backward on one micro-batch; the loss comes back detached, on device."""
        *inputs, target = batch
        with self.backend.autocast():
            output = self.step_model(*inputs)
        loss = self.loss_fn(output, target)
        # Dividing by the window makes the accumulated gradient the window's mean; under DDP
        # a token loss is weighted by this rank's share of the tokens (see rank_weight).
        weight = rank_weight(target, self.info, self.backend)
        self.backend.backward(loss * weight / self.accum)
        return loss.detach()

    def update(self) -> float:
        """One optimizer update; returns the learning rate it used."""
        lr = scheduled_lr(self.scheduler)
        self.backend.optimizer_step(self.optimizer, self.model.parameters(), self.tc.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.after_update(self.model)
        self.scheduler.step()
        self.step += 1
        return lr

    # -- host side: after the step has run ------------------------------------------------
    @property
    def _reads_values(self) -> bool:
        """Whether this process reads losses: the master, unless only graphs are extracted."""
        return self.backend.is_master and not self.backend.graphs_only

    def _log_step(self, loss: Tensor, step: int, lr: float) -> None:
        value = loss.item()
        self.log.info("step %d/%d  loss %.4f  lr %.3e", step, self.total_steps, value, lr)
        self._write("step", step=step, epoch=self.epoch, loss=value, lr=lr)

    def _finish_epoch(self, loss_sum: Tensor, count: int, lr: float, start: float) -> EpochResult:
        model = self.objective.eval_model(self.model)
        val = evaluate(
            model, self.val_loader, self.loss_fn, self.backend, self.info, self.objective
        )
        if self.backend.graphs_only:
            # neuron_parallel_compile: the values are placeholders; the graphs are what counts.
            self.log.info("epoch %d: graphs extracted", self.epoch)
            return EpochResult(self.epoch, self.step, math.nan, {}, lr, time.perf_counter() - start)
        ranks = self.backend.gather(loss_sum.item() / max(count, 1))
        train_loss = sum(ranks) / len(ranks)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"training loss is {train_loss} in epoch {self.epoch}; "
                "lower training.lr or set training.grad_clip"
            )
        self.save(self.checkpoint_path)
        seconds = time.perf_counter() - start
        result = EpochResult(self.epoch, self.step, train_loss, val, lr, seconds)
        shown = "  ".join(f"val {k} {v:.4f}" for k, v in val.items())
        self.log.info(
            "epoch %d/%d  step %d  train loss %.4f  %s  lr %.3e  %.1fs",
            self.epoch,
            self.epochs,
            self.step,
            train_loss,
            shown,
            lr,
            seconds,
        )
        self._write("epoch", **dataclasses.asdict(result))
        return result

    def _write(self, event: str, **fields: object) -> None:
        """One event to every metrics log (on the master; the others have none but a disabled
        ``metrics.jsonl``)."""
        for log in self.logs:
            log.write(event, **fields)

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        save_checkpoint(
            path,
            self.backend,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            step=self.step,
            epoch=self.epoch,
            config=self.cfg,
            objective=self.objective.state_dict(),
        )

    def resume(self, path: str | Path) -> None:
        """Continue a run from a checkpoint: weights, optimizer, schedule, the objective's state
        (a moving average of the weights) and progress."""
        state = load_checkpoint(
            path, self.model, self.optimizer, self.scheduler, objective=self.objective
        )
        self.step, self.epoch = state["step"], state["epoch"]
