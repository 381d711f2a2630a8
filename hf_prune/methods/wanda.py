"""Wanda (arXiv 2306.11695): weight magnitude times input activation norm, per output row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import PruningConfig
from ..engine.statistics import InputStatistics, StatKind
from .base import LayerPruner
from .patterns import mask_from_scores


@dataclass
class WandaConfig(PruningConfig):
    """Wanda: keep the largest ``|W_ij| * ||X_j||`` of each row. No weight update."""

    method: ClassVar[str] = "wanda"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.11695"



def wanda_scores(weight: torch.Tensor, stats: InputStatistics) -> torch.Tensor:
    """``|W_ij| * ||X_j||₂`` for an ``(out, in)`` weight."""
    return weight.abs() * stats.column_norms.to(weight.device).unsqueeze(0)


class WandaPruner(LayerPruner):
    """Zeroes the lowest ``|W_ij| * ||X_j||`` of each row (or N:M group) from the inputs' column norms."""

    def statistics_kind(self, op) -> StatKind:
        return StatKind.NORMS

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        if stats is None:
            raise ValueError("Wanda needs calibration statistics for every operator")
        mask = mask_from_scores(wanda_scores(weight, stats), self.pattern, sparsity)
        return weight.masked_fill_(mask, 0.0)
