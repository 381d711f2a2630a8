"""Magnitude pruning: keep the largest ``|W|`` of each row (or of each N:M group)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import PruningConfig
from ..engine.statistics import InputStatistics
from .base import LayerPruner
from .patterns import mask_from_scores


@dataclass
class MagnitudeConfig(PruningConfig):
    """Keep the largest ``|W|`` of each row. Needs no calibration data (unless ``owl`` is on)."""

    method: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False



class MagnitudePruner(LayerPruner):
    """Zeroes the smallest ``|W_ij|`` of each row (or of each N:M group); needs no calibration data."""

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        mask = mask_from_scores(weight.abs(), self.pattern, sparsity)
        return weight.masked_fill_(mask, 0.0)
