"""Facts about a dataset that the model needs to size itself, and what a loader returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor
from torch.utils.data import Dataset


@dataclass(frozen=True)
class DataInfo:
    """Sizes read off the loaded data; 0 where a field does not apply to the task.

    Spec params written ``data.<field>`` (e.g. ``data.vocab_size``) are read from here.
    """

    num_classes: int = 0
    vocab_size: int = 0
    in_channels: int = 0
    image_size: int = 0
    in_features: int = 0
    seq_len: int = 0
    pad_id: int = 0
    bos_id: int = 0
    eos_id: int = 0
    mask_id: int = 0  # [MASK] of a masked language model; ids above it are words
    num_actions: int = 0  # an environment's discrete actions, or its action dimensions
    answer_marker: tuple[int, ...] = ()  # self-consistency: the ids before a final answer
    condition_features: int = 0  # the observation a posterior is conditioned on


class Splits(NamedTuple):
    """A loader module's result: training and validation examples, and their sizes."""

    train: Dataset[tuple[Tensor, ...]]
    val: Dataset[tuple[Tensor, ...]]
    info: DataInfo
