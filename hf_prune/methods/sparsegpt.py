"""SparseGPT (arXiv 2301.00774): OBS-style mask selection with weight reconstruction.

Columns are processed left to right in blocks. Within a block, the pruned entries are
chosen by ``w² / [H⁻¹]_jj²`` and the error of each removed weight is spread over the
columns still to come through the upper Cholesky factor of ``H⁻¹``. Unstructured masks
give each row the same number of pruned weights, so the requested sparsity holds per row.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import PruningConfig
from ..engine.statistics import InputStatistics, StatKind
from ..errors import PruningConfigError
from .base import LayerPruner
from .linalg import damped_cholesky_factors, dead_inputs
from .patterns import Pattern, lowest_per_group, prune_count


@dataclass
class SparseGPTConfig(PruningConfig):
    """SparseGPT: prune column by column, updating the remaining weights to compensate (OBS).

    Args:
        block_size: columns per lazy update (a multiple of M for N:M patterns).
        dampening: added to the Hessian diagonal, as a share of its mean.
    """

    method: ClassVar[str] = "sparsegpt"
    paper: ClassVar[str] = "https://arxiv.org/abs/2301.00774"

    block_size: int = 128
    dampening: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise PruningConfigError("block_size", f"block_size must be a positive integer, got {self.block_size!r}")
        pattern = self.parsed_pattern
        if pattern.is_nm and self.block_size % pattern.m:
            raise PruningConfigError(
                "block_size", f"block_size={self.block_size} must be a multiple of M={pattern.m} for pattern "
                f"{pattern}: try block_size={pattern.m * max(1, self.block_size // pattern.m)}"
            )
        if not self.dampening > 0:
            raise PruningConfigError(
                "dampening", f"dampening must be > 0 (a share of the mean Hessian diagonal), got {self.dampening}"
            )


def inverse_hessian_factor(gram: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` and the mask of dead (never active) inputs.

    If the damped Hessian is still not positive definite (near-singular inputs), the
    dampening is raised tenfold up to three times before giving up with a clear error.
    Each intermediate is freed as soon as the next exists: no more than two ``in x in``
    matrices besides ``gram`` are alive at once.
    """
    dead = dead_inputs(gram)
    for factor in damped_cholesky_factors(gram, dampening, dead):
        inverse = torch.cholesky_inverse(factor)
        del factor
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if int(info) == 0:
            return upper, dead
    raise ValueError(
        "SparseGPT could not factor the input Hessian even with 1000x dampening; the calibration "
        "inputs are degenerate (all zero or NaN?). Use more or different calibration text, or Wanda"
    )


def _block_mask(columns: torch.Tensor, upper: torch.Tensor, start: int, end: int,
                remaining: torch.Tensor) -> torch.Tensor:
    """Pruned entries of weight columns ``start:end`` for an unstructured pattern, as rows of
    ``columns`` (the transposed weight, one row per input column).

    Each weight row still owes ``remaining`` pruned weights. They are placed where the OBS
    saliency ``w² / [U]_jj²`` of the current (already updated) weights is lowest among all
    columns not yet processed, and those that fall inside this block are pruned now. Rows
    thus spend their quota where it costs least, not a fixed share per block, and every
    row ends with exactly its quota (the last block takes whatever is left).
    """
    saliency = (columns[start:] / torch.diagonal(upper)[start:].unsqueeze(1)).square_().t()
    most = int(remaining.max()) if remaining.numel() else 0
    chosen = torch.zeros_like(saliency, dtype=torch.bool)
    if most > 0:  # the `most` lowest of each row, in order; a row takes the first `remaining` of them
        lowest = saliency.topk(most, dim=1, largest=False, sorted=True).indices
        owed = torch.arange(most, device=columns.device).unsqueeze(0) < remaining.unsqueeze(1)
        chosen.scatter_(1, lowest, owed)
    return chosen[:, : end - start].t()


def _group_scale(block: torch.Tensor, inverse_diag: torch.Tensor, pattern: Pattern, out: torch.Tensor) -> None:
    """N:M choice for one group of ``m`` weight columns (rows of ``block``): ``out`` gets
    ``1/[U]_jj`` where a weight is pruned (its OBS saliency among the group's lowest ``m - n``)
    and 0 where it is kept."""
    saliency = (block * inverse_diag).square_()
    torch.mul(lowest_per_group(saliency.t(), pattern.n, pattern.m).t(), inverse_diag, out=out)


def prune_with_factor(weight: torch.Tensor, upper: torch.Tensor, dead: torch.Tensor, sparsity: float,
                      pattern: Pattern, block_size: int) -> torch.Tensor:
    """SparseGPT on an ``(out, in)`` fp32 weight, in place, given ``inverse_hessian_factor``'s result.

    The work runs on the transposed weight, so that a weight column is a contiguous row: the
    per-column error step and its rank-1 update then touch contiguous memory (2x faster on
    CPU than strided columns), and N:M groups are chosen on whole rows.
    """
    weight[:, dead] = 0.0
    columns = weight.t().contiguous()  # (in, out): row j holds weight column j
    width = columns.shape[0]
    inverse_diag = torch.diagonal(upper).reciprocal().unsqueeze(1)
    remaining = torch.full((weight.shape[0],), prune_count(sparsity, width), device=weight.device)
    for start in range(0, width, block_size):
        end = min(start + block_size, width)
        block = columns[start:end]
        factor = upper[start:end, start:end]
        if pattern.is_nm:
            scale = torch.empty_like(block)  # filled group by group below
        else:
            mask = _block_mask(columns, upper, start, end, remaining)
            remaining -= mask.sum(dim=0)
            scale = mask * inverse_diag[start:end]  # 1/[U]_jj where pruned, 0 where kept
        errors = torch.empty_like(block)
        rows, scale_rows, error_rows = block.unbind(0), scale.unbind(0), errors.unbind(0)
        for j in range(end - start):
            if pattern.is_nm and j % pattern.m == 0:
                group = slice(j, j + pattern.m)
                _group_scale(block[group], inverse_diag[start + j:start + j + pattern.m], pattern, scale[group])
            # OBS: a pruned weight's error, spread over the columns not yet processed (a kept
            # weight has no error: its column only changes by the updates of earlier ones)
            torch.mul(rows[j], scale_rows[j], out=error_rows[j])
            block[j + 1:].addr_(factor[j, j + 1:], error_rows[j], alpha=-1.0)
        block.masked_fill_(scale != 0, 0.0)
        columns[end:].addmm_(upper[start:end, end:].t(), errors, alpha=-1.0)
    return weight.copy_(columns.t())


def sparsegpt_prune(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float, pattern: Pattern, block_size: int, dampening: float
) -> torch.Tensor:
    """Prune an ``(out, in)`` fp32 weight in place with SparseGPT and return it."""
    upper, dead = inverse_hessian_factor(gram, dampening)
    return prune_with_factor(weight, upper, dead, sparsity, pattern, block_size)


class SparseGPTPruner(LayerPruner):
    """OBS-style pruning column by column with the inverse Hessian of the inputs, updating the kept
    weights to compensate; one Hessian factor per distinct input (q/k/v share one)."""

    def __init__(self, config: SparseGPTConfig) -> None:
        super().__init__(config)
        # operators fed the same input (q/k/v, gate/up) share one statistics object: its
        # factor is computed once for all of them (and dropped with the statistics)
        self._factors: weakref.WeakKeyDictionary[InputStatistics, tuple[int, torch.device, tuple]] = (
            weakref.WeakKeyDictionary()
        )

    def statistics_kind(self, op) -> StatKind:
        return StatKind.GRAM

    def _factor(self, stats: InputStatistics, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._factors.get(stats)
        if cached is not None and cached[0] == stats.tokens and cached[1] == device:
            return cached[2]
        factor = inverse_hessian_factor(stats.gram.to(device), self.config.dampening)
        self._factors[stats] = (stats.tokens, device, factor)
        return factor

    def prune_weight(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float) -> torch.Tensor:
        if stats is None:
            raise ValueError("SparseGPT needs calibration statistics for every operator")
        upper, dead = self._factor(stats, weight.device)
        return prune_with_factor(weight, upper, dead, sparsity, self.pattern, self.config.block_size)
