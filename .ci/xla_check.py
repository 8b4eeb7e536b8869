"""Train a generated repository on XLA:CPU and check torch_xla's metrics, phase by phase.

Runs in the XLA environment (torch + torch-xla, ``PJRT_DEVICE=CPU``), in one process: XLA:CPU
has no collectives across processes. It imports the generated package, wraps a few of its
functions to snapshot ``torch_xla.debug.metrics`` at phase boundaries, runs
``<package>.train.main`` in-process (``--device xla``) and checks:

- **training compiles at most** ``--max-train-compiles`` **graphs** in the first epoch. The
  default is 2 (the first update, which also creates the optimizer state, and the update every
  later step runs), one more with ``grad_accum_steps: 2`` (a window's first micro-batch, which
  creates the gradients) and two more from ``grad_accum_steps: 3`` (the middle micro-batches
  add to them);
- **nothing compiles after the first epoch**: training, evaluation and checkpointing;
- **one graph execution per training step**, plus at most one per epoch (an epoch-level
  graph such as a mean loss): lazy tensors are not forced in the middle of a step;
- **host reads of one per logging interval**: per epoch, the training phase may read from the
  device (``TransferFromDeviceTime`` samples) once per ``log_every`` updates (the loss, in a
  step closure) and at most once more (an epoch-level read such as the epoch's loss). The
  ideal count is exact, since transfers do not depend on timing; the +1 admits one read per
  epoch but no read per step, which would add one per step (16 in the smoke run);
- the trainer's JSONL metrics log holds one ``step`` record per logging interval.

Evaluation (or sampling) is counted separately: its first-epoch compiles are reported and
bounded by ``--max-eval-compiles`` (default 2: e.g. a teacher-forced pass with the metrics, and
one greedy-decoding step run for every position).

Then, apart from the run, **a learning rate decayed to 0 compiles nothing new**: the
repository's own ``build_optimizer`` and ``build_scheduler`` (AdamW, weight decay 0.01, linear
decay to 0, the way the trainer builds them on XLA) update a small model for
``--lr-decay-steps``; a rate held as a Python float makes ``1 - lr * weight_decay`` a new
special value (1.0) late in the decay, and a rate of exactly 0 shares the device value of the
graph's other zeros, each of which compiles the update again.

Phases, following the trainer (``MpDeviceLoader`` syncs whenever it hands out a batch):

- ``train``: from ``Trainer.run_epoch`` until ``evaluate`` is called. On entering
  ``evaluate`` the probe syncs, so the epoch's last update (which no next batch ends) is
  counted with training. Where the trainer ends that step itself, this sync has nothing to
  run; where it does not, it runs the same graph the evaluation loader's first sync would.
- ``eval``: ``evaluate`` (forward passes, greedy decoding, the metric reads).
- ``end``: the rest of the epoch (the epoch's loss read, the checkpoint).

The probe waits for the device (``xm.wait_device_ops``) before every snapshot, because graphs
execute asynchronously; that changes timing only, never which graphs are built. It imports
torch_xla only once training has started, so the trainer's backend imports it first, with
whatever ``XLA_*`` settings it makes.

    PJRT_DEVICE=CPU python .ci/xla_check.py /path/to/generated/repo --epochs 2

Prints what it measured; exits 1 when a check fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Tracked number -> torch_xla metric whose sample count it is.
METRICS = {
    "compiles": "CompileTime",
    "executions": "ExecuteTime",
    "transfers": "TransferFromDeviceTime",
}
#: Tracked number -> torch_xla counter.
COUNTERS = {
    "cached": "CachedCompile",
    "syncs": "MarkStep",
    "item_calls": "aten::_local_scalar_dense",
}
KEYS = (*METRICS, *COUNTERS)
Counts = dict[str, int]


class UsageError(Exception):
    """A repository or option this script cannot work with (reported without a traceback)."""


@dataclass
class Phase:
    """Metric deltas over one phase of one epoch; ``steps`` for the training phase."""

    epoch: int
    name: str
    delta: Counts
    steps: int = 0
    updates: tuple[int, int] = (0, 0)  # optimizer updates done before and after the phase


@dataclass
class Probe:
    """Snapshots of torch_xla's metrics at the trainer's phase boundaries.

    torch_xla is imported on the first snapshot, i.e. after the trainer's backend imported it:
    settings the backend makes before that import (``XLA_*`` variables) then take effect.
    """

    phases: list[Phase] = field(default_factory=list)
    steps: list[Counts] = field(default_factory=list)  # per training step: epoch, step, deltas
    _current: Phase | None = None
    _start: Counts = field(default_factory=dict)
    _train_loader: Any = None
    _last_batch: Counts | None = None

    @staticmethod
    def sync() -> None:
        """End the pending graph (``torch_xla.sync``)."""
        import torch_xla

        torch_xla.sync()

    @staticmethod
    def snapshot() -> Counts:
        """Totals of every tracked number once the device is idle (0 if not created yet)."""
        import torch_xla.core.xla_model as xm
        import torch_xla.debug.metrics as met

        xm.wait_device_ops()  # graphs run asynchronously: count the ones launched so far
        metric_names, counter_names = set(met.metric_names()), set(met.counter_names())
        snap = {}
        for key, name in METRICS.items():
            snap[key] = int(met.metric_data(name)[0]) if name in metric_names else 0
        for key, name in COUNTERS.items():
            snap[key] = int(met.counter_value(name)) if name in counter_names else 0
        return snap

    @staticmethod
    def diff(after: Counts, before: Counts) -> Counts:
        return {k: after[k] - before[k] for k in KEYS}

    def begin(self, epoch: int, name: str, updates: int) -> Counts:
        """End the phase in progress and start ``name``; returns the snapshot taken."""
        now = self.snapshot()
        self.finish(updates, now)
        self._current = Phase(epoch, name, {}, updates=(updates, updates))
        self._start = now
        return now

    def finish(self, updates: int, now: Counts | None = None) -> None:
        """End the phase in progress (if any) after ``updates`` optimizer updates in all."""
        if self._current is None:
            return
        now = now or self.snapshot()
        self._current.delta = self.diff(now, self._start)
        self._current.updates = (self._current.updates[0], updates)
        self.phases.append(self._current)
        self._current = None

    # -- training steps ---------------------------------------------------------------------
    def start_epoch(self, epoch: int, train_loader: Any, updates: int) -> None:
        self._train_loader = train_loader
        self._last_batch = self.begin(epoch, "train", updates)

    def step_ended(self) -> None:
        """A training step's graph has run (the sync of the next batch, or the final one)."""
        if self._current is None or self._last_batch is None:
            return
        now = self.snapshot()
        if self._current.steps > 0:  # before the first batch nothing of a step has run
            self.steps.append(
                {"epoch": self._current.epoch, "step": self._current.steps}
                | self.diff(now, self._last_batch)
            )
        self._last_batch = now

    def wrap_loader(self, original: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """``Backend.loader`` that snapshots after each training batch is handed out."""
        probe = self

        def loader(backend: Any, data_loader: Any) -> Iterator[Any]:
            training = data_loader is probe._train_loader
            for batch in original(backend, data_loader):
                if training and probe._current is not None:
                    probe.step_ended()
                    probe._current.steps += 1
                yield batch

        return loader


def install_probe(package: str, probe: Probe) -> None:
    """Wrap the phase boundaries of ``package``'s trainer with ``probe``'s snapshots."""
    backends = importlib.import_module(f"{package}.training.backends")
    trainer_mod = importlib.import_module(f"{package}.training.trainer")
    trainer_cls = trainer_mod.Trainer
    backends.XlaBackend.loader = probe.wrap_loader(backends.XlaBackend.loader)
    run_epoch, finish = trainer_cls.run_epoch, trainer_cls._finish_epoch
    evaluate = trainer_mod.evaluate  # the name the trainer calls
    current: list[Any] = []  # the trainer whose epoch is running

    def probed_run_epoch(self: Any) -> Any:
        current[:] = [self]
        probe.start_epoch(self.epoch, self.train_loader, self.step)
        return run_epoch(self)

    def probed_evaluate(*args: Any, **kwargs: Any) -> Any:
        probe.sync()  # ends the last training step, if the trainer left it pending
        probe.step_ended()
        updates = current[0].step if current else 0
        epoch = current[0].epoch if current else 0
        probe.begin(epoch, "eval", updates)
        result = evaluate(*args, **kwargs)
        probe.begin(epoch, "end", updates)
        return result

    def probed_finish(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = finish(self, *args, **kwargs)
        probe.finish(self.step)
        return result

    trainer_cls.run_epoch = probed_run_epoch
    trainer_cls._finish_epoch = probed_finish
    trainer_mod.evaluate = probed_evaluate


def find_package(repo: Path, package: str | None) -> str:
    """``package``, or the one package under ``src/`` that has a ``train.py``."""
    if package:
        return package
    found = sorted(p.parent.name for p in (repo / "src").glob("*/train.py"))
    if len(found) != 1:
        raise UsageError(f"expected one package with train.py under {repo / 'src'}, found {found}")
    return found[0]


def read_training_config(repo: Path, package: str, config: str) -> dict[str, Any]:
    """The ``training`` section of ``repo/config``, merged over the file it ``extends`` by the
    repository's own ``config.read_config`` (``configs/smoke.yaml`` holds only overrides)."""
    sys.path.insert(0, str(repo / "src"))
    read_config = importlib.import_module(f"{package}.config").read_config
    path = repo / config
    try:
        raw = read_config(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw.get("training"), dict):
        raise UsageError(f"{path} has no training section")
    return raw["training"]


def step_records(metrics_file: Path) -> int:
    """``step`` records of the last run (since the last ``start``) in a JSONL metrics log."""
    if not metrics_file.is_file():
        return 0
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    return sum(1 for r in records[starts[-1] if starts else 0 :] if r.get("event") == "step")


def non_finite_values(metrics_file: Path) -> list[str]:
    """The numbers of the last run's ``epoch`` records that are NaN or infinite, named
    ``epoch E: name`` (validation metrics as ``val.name``)."""
    if not metrics_file.is_file():
        return []
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    bad = []
    for r in records[starts[-1] if starts else 0 :]:
        if r.get("event") != "epoch":
            continue
        values = {k: v for k, v in r.items() if k not in ("event", "val")}
        values |= {f"val.{k}": v for k, v in (r.get("val") or {}).items()}
        bad += [
            f"epoch {r.get('epoch')}: {k}"
            for k, v in values.items()
            if isinstance(v, float) and not math.isfinite(v)
        ]
    return bad


def logs_between(before: int, after: int, log_every: int) -> int:
    """Updates ``u`` in ``(before, after]`` that log (``u % log_every == 0``)."""
    return after // log_every - before // log_every


def check(probe: Probe, *, log_every: int, max_train: int, max_eval: int) -> tuple[list[str], int]:
    """Print the measurements; returns the failed checks and the step records to expect."""
    failures: list[str] = []
    print(f"\n{'epoch':>5} {'phase':<6} {'steps':>5} " + " ".join(f"{k:>10}" for k in KEYS))
    for p in probe.phases:
        steps = str(p.steps) if p.name == "train" else ""
        print(f"{p.epoch:>5} {p.name:<6} {steps:>5} " + " ".join(f"{p.delta[k]:>10}" for k in KEYS))
    for s in probe.steps:
        if s["compiles"]:
            print(f"  epoch {s['epoch']} step {s['step']} compiled {s['compiles']} graph(s)")

    def phase(epoch: int, name: str) -> Phase | None:
        return next((p for p in probe.phases if p.epoch == epoch and p.name == name), None)

    epochs = sorted({p.epoch for p in probe.phases})
    if len(epochs) < 2 or any(phase(e, n) is None for e in epochs for n in ("train", "eval")):
        return [f"expected at least 2 epochs, each with train and eval phases; saw {epochs}"], 0

    first = epochs[0]
    counts = {
        n: (p.delta["compiles"] if (p := phase(first, n)) else 0) for n in ("train", "eval", "end")
    }
    print(
        f"\nfirst epoch compiles: train {counts['train']} (max {max_train}), "
        f"eval {counts['eval']} (max {max_eval}), end {counts['end']}"
    )
    if counts["train"] > max_train:
        failures.append(
            f"training compiled {counts['train']} graphs in epoch {first} (max {max_train})"
        )
    if counts["eval"] > max_eval:
        failures.append(
            f"evaluation compiled {counts['eval']} graphs in epoch {first} (max {max_eval})"
        )
    for e in epochs[1:]:
        later = {p.name: p.delta["compiles"] for p in probe.phases if p.epoch == e}
        print(f"epoch {e} compiles: {later}")
        if any(later.values()):
            failures.append(f"epoch {e} compiled after the first epoch: {later}")

    expected_records = 0
    for e in epochs:
        train = phase(e, "train")
        assert train is not None
        logs = logs_between(*train.updates, log_every)
        expected_records += logs
        execs, transfers = train.delta["executions"], train.delta["transfers"]
        print(
            f"epoch {e} training: {train.steps} steps, {execs} executions "
            f"(allowed {train.steps}..{train.steps + 1}), {transfers} host transfers "
            f"(allowed {logs}..{logs + 1}: {logs} logged step(s), log_every {log_every})"
        )
        if not train.steps <= execs <= train.steps + 1:
            failures.append(f"epoch {e}: {execs} graph executions for {train.steps} training steps")
        if not logs <= transfers <= logs + 1:
            failures.append(
                f"epoch {e}: {transfers} host transfers in training, expected {logs} (+1)"
            )
    return failures, expected_records


def lr_decay_compiles(package: str, repo: Path, config: str, steps: int) -> tuple[int, bool]:
    """Graphs compiled by ``steps`` AdamW updates of a small model whose learning rate decays
    linearly to 0, with the repository's optimizer and schedule, the trainer's way on XLA; and
    whether every weight is still finite after the last update (at rate 0), an embedding row
    that no input reads (zero gradients, zero moments) included."""
    import dataclasses

    import torch
    import torch_xla

    optim = importlib.import_module(f"{package}.training.optim")
    backends = importlib.import_module(f"{package}.training.backends")
    load_config = importlib.import_module(f"{package}.config").load_config
    tc = dataclasses.replace(
        load_config(repo / config).training,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.01,
        schedule="linear",
        warmup_steps=0,
        min_lr=0.0,
    )
    device = torch_xla.device()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(3, 8), torch.nn.Linear(8, 4)).to(device)
    x = torch.randint(0, 2, (16,)).to(device)  # row 2 of the embedding is never read
    if getattr(backends.XlaBackend, "tensor_lr", False):
        optimizer = optim.build_optimizer(model.parameters(), tc, lr_device=device)
    else:  # a repository rendered before the learning rate could live on the device
        optimizer = optim.build_optimizer(model.parameters(), tc)
    scheduler = optim.build_scheduler(optimizer, tc, total_steps=steps, steps_per_epoch=steps)
    torch_xla.sync()
    before = Probe.snapshot()["compiles"]
    for _ in range(steps):
        # clamp: a 0.0 in the graph, as real models have, which a rate of exactly 0 would share
        model(x).clamp(min=0.0).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        torch_xla.sync()
    compiles = Probe.snapshot()["compiles"] - before
    return compiles, all(bool(torch.isfinite(p).all().cpu()) for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "repo", type=Path, help="a generated repository (runs and checkpoints go in it)"
    )
    parser.add_argument("--package", help="its Python package (default: found under src/)")
    parser.add_argument("--config", default="configs/smoke.yaml", help="relative to the repo")
    parser.add_argument("--epochs", type=int, default=2, help="at least 2")
    parser.add_argument(
        "--max-train-compiles",
        type=int,
        help="default: 2, plus 1 per grad_accum_steps above 1, up to 4",
    )
    parser.add_argument("--max-eval-compiles", type=int, default=2)
    parser.add_argument(
        "--lr-decay-steps", type=int, default=32, help="AdamW updates to 0 (0: no such check)"
    )
    parser.add_argument("--json", type=Path, help="also write the measurements to this file")
    args = parser.parse_args(argv)

    repo = args.repo.resolve()
    try:
        if args.epochs < 2:
            raise UsageError("--epochs must be at least 2: the second epoch must not compile")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("run one process: XLA:CPU has no collectives across processes")
        package = find_package(repo, args.package)
        tc = read_training_config(repo, package, args.config)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_every, accum = int(tc.get("log_every", 100)), int(tc.get("grad_accum_steps") or 1)
    max_train = args.max_train_compiles or 2 + min(accum - 1, 2)

    os.environ.setdefault("PJRT_DEVICE", "CPU")  # before torch_xla is imported
    os.chdir(repo)  # the config's checkpoint_dir and log_dir are relative to the repository
    probe = Probe()
    install_probe(package, probe)
    train = importlib.import_module(f"{package}.train")
    print(
        f"training {package} on XLA ({os.environ['PJRT_DEVICE']}): "
        f"{args.config}, {args.epochs} epochs"
    )
    rc = train.main(["--config", args.config, "--device", "xla", "--epochs", str(args.epochs)])
    if rc != 0:
        print(f"FAIL: training exited with status {rc}")
        return 1

    failures, expected = check(
        probe, log_every=log_every, max_train=max_train, max_eval=args.max_eval_compiles
    )
    metrics_file = Path(tc.get("log_dir", "runs")) / "metrics.jsonl"
    logged = step_records(metrics_file)
    print(f"step records in {metrics_file}: {logged} (expected {expected})")
    if logged != expected:
        failures.append(f"{logged} step records in {metrics_file}, expected {expected}")
    bad = non_finite_values(metrics_file)
    print(f"non-finite losses or metrics in {metrics_file}: {', '.join(bad) or 'none'}")
    if bad:
        failures.append(f"non-finite values in {metrics_file}: {', '.join(bad)}")
    decay_compiles = None
    if args.lr_decay_steps:
        decay_compiles, finite = lr_decay_compiles(package, repo, args.config, args.lr_decay_steps)
        print(
            f"AdamW with the learning rate decayed to 0 over {args.lr_decay_steps} updates: "
            f"{decay_compiles} compile(s) (max 2), weights {'finite' if finite else 'NOT finite'}"
        )
        if not finite:
            failures.append("AdamW's update at learning rate 0 left non-finite weights")
        if decay_compiles > 2:
            failures.append(
                f"AdamW compiled {decay_compiles} graphs as its learning rate decayed (max 2)"
            )
    if args.json:
        measured = {
            "phases": [asdict(p) for p in probe.phases],
            "steps": probe.steps,
            "lr_decay_compiles": decay_compiles,
        }
        args.json.write_text(json.dumps(measured, indent=1) + "\n", encoding="utf-8")
    if failures:
        print("\nFAIL (rerun with PT_XLA_DEBUG_LEVEL=1 to see why each graph compiled):")
        print("  " + "\n  ".join(failures))
        return 1
    print("\nOK: training compiles its graphs in the first epoch, then only runs them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
