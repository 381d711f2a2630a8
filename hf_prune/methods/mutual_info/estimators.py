"""Pairwise mutual information between neurons, from their activations on calibration tokens.

Every estimator takes activations ``x`` of shape ``(tokens, neurons)`` and returns a
``(neurons, neurons)`` matrix of mutual information in nats, all pairs at once; the
diagonal is meaningless and left to the caller to mask.

- ``gaussian_mutual_information``: if two neurons are jointly Gaussian, ``I = -½ log(1 - ρ²)``
  with ``ρ`` their correlation. One Gram matrix of the centered activations gives all pairs.
- ``renyi_mutual_information``: matrix-based Rényi α-entropy (Sánchez Giraldo, Rao and
  Príncipe). Each neuron ``i`` gets a Gaussian-kernel Gram matrix ``K_i`` over the tokens,
  normalized to unit trace, ``A_i = K_i / n``; ``S_α(A) = log(tr(A^α)) / (1 - α)``, the joint
  entropy uses the normalized Hadamard product ``A_i ∘ A_j``, and
  ``I(i; j) = S(A_i) + S(A_j) - S(A_ij)``. The bandwidth of neuron ``i`` follows a rule of
  thumb on its own spread (Silverman's or Scott's), so scaling a neuron scales its
  bandwidth alike and leaves every estimate unchanged. For ``α = 2``,
  ``tr(A²) = Σ_ab A_ab²`` and all joint entropies come from one matrix product over token
  pairs; other ``α`` need the eigenvalues of every pair's ``n × n`` matrix, computed in
  batches (``O(neurons² · n³)``: only for small widths or subsamples).

A neuron whose activation is constant over the tokens carries no information; the
estimators report it in ``constant_neurons`` and give it zero mutual information, and the
pruner treats it as the most redundant of all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...engine.statistics import add_upper_gram, mirror_upper

#: ``ρ²`` is clamped below 1 so that exact copies get a large finite mutual information.
MAX_SQUARED_CORRELATION = 1.0 - 1e-6
#: A neuron whose variance is below this share of the largest variance counts as constant.
CONSTANT_RELATIVE_VARIANCE = 1e-12
BANDWIDTH_RULES = ("silverman", "scott")
#: Elements per chunk of the token-pair (or pair-of-neurons) tensors, to bound memory.
CHUNK_ELEMENTS = 1 << 24


@dataclass
class Moments:
    """Mean and covariance of the activations over ``count`` tokens (float32)."""

    mean: torch.Tensor
    covariance: torch.Tensor
    count: int

    @property
    def second(self) -> torch.Tensor:
        """Uncentered second moments ``E[h hᵀ]``."""
        return self.covariance + torch.outer(self.mean, self.mean)


def activation_moments(x: torch.Tensor) -> Moments:
    """Mean and (population) covariance of ``x`` ``(tokens, neurons)``, computed centered."""
    x = x.float()
    count = x.shape[0]
    if count == 0:
        raise ValueError("no activations were collected: the estimator needs at least two calibration tokens")
    mean = x.mean(dim=0)
    covariance = symmetric_gram(x - mean) * (1.0 / count)  # exactly symmetric: ties between pairs stay ties
    return Moments(mean, covariance, count)


def symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀ x``, exactly symmetric, computed on and above the diagonal only."""
    out = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    add_upper_gram(out, x)
    return mirror_upper(out)


def constant_neurons(variance: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the neurons whose variance is zero (or negligible against the largest)."""
    top = variance.max() if variance.numel() else variance.new_zeros(())
    return variance <= top * CONSTANT_RELATIVE_VARIANCE


def gaussian_mutual_information(moments: Moments) -> torch.Tensor:
    """``-½ log(1 - ρ_ij²)`` for every pair of neurons; zero where a neuron is constant."""
    variance = moments.covariance.diagonal().clamp_min(0)
    constant = constant_neurons(variance)
    scale = torch.where(constant, 1.0, variance.rsqrt())
    rho = moments.covariance * torch.outer(scale, scale)  # exactly symmetric, as the covariance is
    squared = rho.square().clamp_(max=MAX_SQUARED_CORRELATION)
    mi = torch.log1p(-squared).mul_(-0.5)
    mi[constant, :] = 0.0
    mi[:, constant] = 0.0
    return mi


def bandwidths(x: torch.Tensor, rule: str = "silverman") -> torch.Tensor:
    """Gaussian-kernel bandwidth of each neuron (column of ``x``) by a rule of thumb.

    ``"silverman"``: ``0.9 · min(σ, IQR / 1.34) · n^(-1/5)`` (``1.06 · σ · n^(-1/5)`` where the
    interquartile range is zero); ``"scott"``: ``σ · n^(-1/5)``. Constant neurons get 1 (any
    value gives them an all-ones kernel).
    """
    if rule not in BANDWIDTH_RULES:
        raise ValueError(f"bandwidth rule must be one of {BANDWIDTH_RULES}, got {rule!r}")
    x = x.float()
    n = x.shape[0]
    std = x.std(dim=0, unbiased=n > 1)
    factor = n ** -0.2
    if rule == "scott":
        width = std * factor
    else:
        quartiles = torch.quantile(x, torch.tensor([0.25, 0.75], device=x.device), dim=0)
        spread = torch.minimum(std, (quartiles[1] - quartiles[0]) / 1.34)
        width = torch.where(spread > 0, 0.9 * spread, 1.06 * std) * factor
    constant = constant_neurons(std.square())
    return torch.where(constant | (width <= 0), torch.ones_like(width), width)


def _standardized(x: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations divided by their bandwidths (constant neurons zeroed), and the constant mask."""
    x = x.float()
    constant = constant_neurons(x.var(dim=0, unbiased=False)) if x.shape[0] > 1 else torch.ones(
        x.shape[1], dtype=torch.bool, device=x.device)
    z = (x - x.mean(dim=0)) / bandwidths(x, rule)
    z[:, constant] = 0.0
    return z, constant


def renyi_mutual_information(x: torch.Tensor, alpha: float = 2.0, rule: str = "silverman") -> torch.Tensor:
    """Matrix-based Rényi α mutual information of every pair of neurons, in nats.

    Kernel ``κ(a, b) = exp(-(a - b)² / (2 h²))`` with ``h`` from ``bandwidths(x, rule)``.
    """
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"the Rényi estimator needs at least 2 tokens, got {n}")
    z, constant = _standardized(x, rule)
    if alpha == 2.0:
        mi = _renyi2(z)
    else:
        mi = _renyi_spectral(z, float(alpha))
    mi[constant, :] = 0.0
    mi[:, constant] = 0.0
    return mi


def _renyi2(z: torch.Tensor) -> torch.Tensor:
    """α = 2: ``S(A) = -log Σ_ab A_ab²``, all joint entropies from one product over token pairs.

    With unit-diagonal kernels, ``Σ_ab K_ab² = n + 2 Σ_{a<b} K_ab²`` and for a pair of neurons
    ``Σ_ab K_i,ab² K_j,ab² = n + 2 Σ_{a<b} G_i,ab G_j,ab`` with ``G = K²``: a Gram matrix of ``G``.
    """
    n, width = z.shape
    first, second = torch.triu_indices(n, n, offset=1, device=z.device)
    gram = torch.zeros(width, width, dtype=torch.float64, device=z.device)
    marginal = torch.zeros(width, dtype=torch.float64, device=z.device)
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, first.numel(), step):
        # G = K² = exp(-Δ² / h²) for the token pairs of this chunk, all neurons at once
        g = (z[first[start:start + step]] - z[second[start:start + step]]).square_().neg_().exp_()
        gram += (g.T @ g).double()
        marginal += g.sum(dim=0, dtype=torch.float64)
    gram = (gram + gram.T) * 0.5
    joint_power = (n + 2.0 * gram) / (n * n)  # tr(A_ij²)
    power = (n + 2.0 * marginal) / (n * n)  # tr(A_i²)
    entropy = -torch.log(power)
    joint = -torch.log(joint_power)
    return (entropy[:, None] + entropy[None, :] - joint).float()


def _entropy_from_eigenvalues(eigenvalues: torch.Tensor, alpha: float) -> torch.Tensor:
    values = eigenvalues.clamp_min(0)
    values = values / values.sum(dim=-1, keepdim=True)
    if abs(alpha - 1.0) < 1e-9:  # the limit α → 1: von Neumann entropy
        return -(values * torch.log(values.clamp_min(1e-30))).sum(dim=-1)
    return torch.log(values.pow(alpha).sum(dim=-1)) / (1.0 - alpha)


def _kernels(z: torch.Tensor) -> torch.Tensor:
    """``(neurons, n, n)`` Gaussian Gram matrices of the standardized activations."""
    columns = z.T
    return (columns[:, :, None] - columns[:, None, :]).square_().mul_(-0.5).exp_()


def _renyi_spectral(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """Any α: eigenvalues of every neuron's and every pair's normalized Gram matrix, in batches."""
    n, width = z.shape
    batch = max(1, CHUNK_ELEMENTS // (n * n))
    entropy = torch.empty(width, dtype=torch.float64, device=z.device)
    for start in range(0, width, batch):
        kernels = _kernels(z[:, start:start + batch]).double()
        entropy[start:start + batch] = _entropy_from_eigenvalues(torch.linalg.eigvalsh(kernels / n), alpha)
    mi = torch.zeros(width, width, dtype=torch.float64, device=z.device)
    rows, cols = torch.triu_indices(width, width, offset=1, device=z.device)
    for start in range(0, rows.numel(), batch):
        i, j = rows[start:start + batch], cols[start:start + batch]
        joint = (_kernels(z[:, i]) * _kernels(z[:, j])).double() / n
        values = entropy[i] + entropy[j] - _entropy_from_eigenvalues(torch.linalg.eigvalsh(joint), alpha)
        mi[i, j] = values
        mi[j, i] = values
    return mi.float()
