"""SparseGPT (arXiv 2301.00774): OBS-style mask selection with weight reconstruction.

Columns are processed left to right in blocks. Within a block, the pruned entries are
chosen by ``w² / [H⁻¹]_jj²`` and the error of each removed weight is spread over the
columns still to come through the upper Cholesky factor of ``H⁻¹``. Unstructured masks
give each row the same number of pruned weights, so the requested sparsity holds per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import PruningConfig
from ..patterns import Pattern, lowest_per_group, prune_count
from ..statistics import InputStatistics, StatKind
from .base import LayerPruner


@dataclass
class SparseGPTConfig(PruningConfig):
    """SparseGPT. ``block_size``: columns per lazy update (a multiple of M for N:M);
    ``dampening``: added to the Hessian diagonal as a share of its mean."""

    method: ClassVar[str] = "sparsegpt"
    paper: ClassVar[str] = "https://arxiv.org/abs/2301.00774"

    block_size: int = 128
    dampening: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        pattern = self.parsed_pattern
        if pattern.is_nm and self.block_size % pattern.m:
            raise ValueError(
                f"block_size={self.block_size} must be a multiple of M={pattern.m} for pattern {pattern}: "
                f"try block_size={pattern.m * max(1, self.block_size // pattern.m)}"
            )
        if not self.dampening > 0:
            raise ValueError(f"dampening must be > 0 (a share of the mean Hessian diagonal), got {self.dampening}")

    def make_pruner(self) -> LayerPruner:
        return SparseGPTPruner(self)


def inverse_hessian_factor(gram: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` and the mask of dead (never active) inputs.

    If the damped Hessian is still not positive definite (near-singular inputs), the
    dampening is raised tenfold up to three times before giving up with a clear error.
    """
    hessian = gram.clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    mean_diag = torch.diagonal(hessian).mean()
    for attempt in range(4):
        damped = hessian.clone()
        damped.diagonal().add_(dampening * (10**attempt) * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, dead
    raise ValueError(
        "SparseGPT could not factor the input Hessian even with 1000x dampening; the calibration "
        "inputs are degenerate (all zero or NaN?). Use more or different calibration text, or Wanda"
    )


def _block_mask(weight: torch.Tensor, upper: torch.Tensor, start: int, end: int,
                remaining: torch.Tensor) -> torch.Tensor:
    """Pruned entries of columns ``start:end`` for an unstructured pattern.

    Each row still owes ``remaining`` pruned weights. They are placed where the OBS
    saliency ``w² / [U]_jj²`` of the current (already updated) weights is lowest among all
    columns not yet processed, and those that fall inside this block are pruned now. Rows
    thus spend their quota where it costs least, not a fixed share per block, and every
    row ends with exactly its quota (the last block takes whatever is left).
    """
    ahead = weight[:, start:]
    saliency = ahead.square() / torch.diagonal(upper)[start:].square()
    most = int(remaining.max()) if remaining.numel() else 0
    chosen = torch.zeros_like(saliency, dtype=torch.bool)
    if most > 0:  # the `most` lowest of each row, in order; a row takes the first `remaining` of them
        lowest = saliency.topk(most, dim=1, largest=False, sorted=True).indices
        owed = torch.arange(most, device=weight.device).unsqueeze(0) < remaining.unsqueeze(1)
        chosen.scatter_(1, lowest, owed)
    return chosen[:, : end - start]


def sparsegpt_prune(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float, pattern: Pattern, block_size: int, dampening: float
) -> torch.Tensor:
    """Prune an ``(out, in)`` fp32 weight in place with SparseGPT and return it."""
    upper, dead = inverse_hessian_factor(gram, dampening)
    weight[:, dead] = 0.0
    cols = weight.shape[1]
    remaining = torch.full((weight.shape[0],), prune_count(sparsity, cols), device=weight.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = weight[:, start:end].clone()
        factor = upper[start:end, start:end]
        diag = torch.diagonal(factor)
        errors = torch.zeros_like(block)
        if pattern.is_nm:
            mask = torch.zeros_like(block, dtype=torch.bool)
            error_scale = torch.zeros_like(block)
        else:
            mask = _block_mask(weight, upper, start, end, remaining)
            remaining -= mask.sum(dim=1)
            error_scale = mask / diag  # 1/[U]_jj where pruned, 0 where kept
        for j in range(end - start):
            if pattern.is_nm and j % pattern.m == 0:
                group = slice(j, j + pattern.m)
                mask[:, group] = lowest_per_group(block[:, group].square() / diag[group].square(), pattern.n, pattern.m)
                error_scale[:, group] = mask[:, group] / diag[group]
            # OBS: a pruned weight's error, spread over the columns not yet processed (a kept
            # weight has no error: its column only changes by the updates of earlier ones)
            torch.mul(block[:, j], error_scale[:, j], out=errors[:, j])
            block[:, j:].addr_(errors[:, j], factor[j, j:], alpha=-1.0)
        weight[:, start:end] = block.masked_fill_(mask, 0.0)
        weight[:, end:].addmm_(errors, upper[start:end, end:], alpha=-1.0)
    return weight


class SparseGPTPruner(LayerPruner):
    def statistics_kind(self, op) -> StatKind:
        return StatKind.GRAM

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        if stats is None:
            raise ValueError("SparseGPT needs calibration statistics for every operator")
        return sparsegpt_prune(
            weight, stats.gram.to(weight.device), sparsity, self.pattern, self.config.block_size, self.config.dampening
        )
