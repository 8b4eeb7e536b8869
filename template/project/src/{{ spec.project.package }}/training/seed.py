"""One seed for every random number generator, so two runs with one seed match."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the CPU and every CUDA device).

    Every process of a distributed run uses the same seed, so all replicas start from the
    same weights; the data sampler shards the data by rank.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
