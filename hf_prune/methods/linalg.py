"""Linear algebra shared by the methods that solve with the input Gram matrix (SparseGPT, FISTAPruner)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

#: the dampening is raised tenfold this many times more before giving up
DAMPENING_RETRIES = 3


def dead_inputs(gram: torch.Tensor) -> torch.Tensor:
    """Inputs that are never active on the calibration data (zero Gram diagonal)."""
    return torch.diagonal(gram) <= 0


def damped_cholesky_factors(gram: torch.Tensor, dampening: float, dead: torch.Tensor) -> Iterator[torch.Tensor]:
    """Lower Cholesky factors of ``G + δI``, ``δ = dampening · mean(diag G) · 10^k`` for ``k = 0..3``.

    ``dead`` inputs get a unit diagonal first. Only the damping levels whose factorization
    succeeds are yielded, in increasing order, so a caller takes the first factor that serves
    it (``break``/``return``) and raises its own error when the loop ends. One damped copy of
    ``gram`` is alive at a time.
    """
    diagonal = torch.diagonal(gram).masked_fill(dead, 1.0)
    mean = diagonal.mean()
    for attempt in range(DAMPENING_RETRIES + 1):
        damped = gram.clone()
        damped.diagonal().copy_(diagonal + dampening * (10**attempt) * mean)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            yield factor
        del factor
