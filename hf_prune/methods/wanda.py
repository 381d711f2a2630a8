"""Wanda (arXiv 2306.11695): weight magnitude times input activation norm, per output row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import PruningConfig
from ..engine.statistics import InputStatistics, StatKind
from .base import LayerPruner
from .patterns import mask_from_scores, parse_pattern


@dataclass
class WandaConfig(PruningConfig):
    """Wanda: keep the largest ``|W_ij| * ||X_j||`` of each row. No weight update.

    ``true_sequential`` (see ``PruningConfig``) defaults to True for unstructured sparsity
    and to False for N:M patterns, as measured on SmolLM2-135M (64 x 512 C4 tokens, wiki
    perplexity): at 50% the pruned in-layer inputs are slightly better (49.71 against 49.99 from
    the dense layer), at 2:4 the dense layer is clearly better (156.00 against 163.93), and
    equals llm-compressor's Wanda on the same tokens.
    """

    method: ClassVar[str] = "wanda"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.11695"

    def default_true_sequential(self) -> bool:
        return not parse_pattern(self.pattern).is_nm



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
