"""Mutual-information pruning of redundant MLP neurons (arXiv 2406.00030), structured.

A neuron whose activation carries the same information as another neuron's is redundant.
For each decoder layer the activations of the MLP neurons (the input of ``down_proj``) are
sampled on ``num_tokens`` calibration tokens, the mutual information of every pair of
neurons is estimated at once (``estimators``), and neurons are removed greedily: each
step removes the kept neuron with the highest mutual information to another kept neuron,
until the layer's target count is reached. Of a tied pair, the neuron with the larger total
mutual information to the kept neurons goes. Constant neurons (no information) go first.

Unlike the paper, which tests random pairs of neurons against a threshold, the selection
here is a deterministic greedy pass over all pairs, and the share removed is fixed per layer
(``amount``, as for the other structured methods).

Mutual information is blind to scale, and real models have a few neurons with activations
thousands of times larger than the rest (massive activations, on a handful of tokens).
Those neurons are strongly dependent on each other, so ranking by mutual information alone
removes them first, which wrecks a real model (the README gives the measurements on
SmolLM2-135M). ``selection="weighted"`` (the
default, beyond the paper) therefore removes the neuron whose loss the information does not
cover: for jointly Gaussian neurons the least-squares residual of ``h_r`` given its most
dependent kept neuron is ``E[h_r²] · exp(-2 I)``, so the cost of removing ``r`` is
``‖W_out[:, r]‖² · E[h_r²] · exp(-2 max_p I(r; p))``; the greedy pass removes the cheapest.
``selection="redundancy"`` is the paper's criterion (highest mutual information first).

With ``compensate`` (beyond the paper),
the contribution of each removed neuron ``r`` is folded into the kept neuron ``p`` it
duplicates (its highest mutual information among the kept ones): ``h_r ≈ β h_p (+ γ)`` by
least squares on the sampled activations, then ``W_out[:, p] += β W_out[:, r]`` (and the
output bias, when there is one, ``+= γ W_out[:, r]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.utils import logging

from ...errors import PruningConfigError
from ...surgery.geometry import operator
from ..base import LayerContext
from ..structured.base import StructuredConfig, StructuredPruner, kept_count
from ..structured.scores import column_squares
from .estimators import (
    BANDWIDTH_RULES,
    Moments,
    activation_moments,
    constant_neurons,
    gaussian_mutual_information,
    renyi_mutual_information,
)

logger = logging.get_logger(__name__)

ESTIMATORS = ("gaussian", "renyi")
SELECTIONS = ("weighted", "redundancy")
#: calibration tokens sampled per layer when ``num_tokens`` is not given
DEFAULT_TOKENS = {"gaussian": 16384, "renyi": 256}
#: relative tolerance under which two redundancies count as tied
TIE_TOLERANCE = 1e-6


@dataclass
class MutualInfoConfig(StructuredConfig):
    """Remove the MLP neurons most redundant with the others, by mutual information of activations.

    Args:
        amount: share of MLP neurons removed in every layer (see ``StructuredConfig``; kept
            counts are rounded to a multiple of ``round_to``).
        estimator: ``"gaussian"``: ``-½ log(1 - ρ²)`` from the correlation matrix (fast, all
            pairs from one matrix product; captures linear dependence); ``"renyi"``:
            matrix-based Rényi α-entropy with a Gaussian kernel per neuron (captures
            non-linear dependence; costs a product over token pairs, so use a few hundred tokens).
        alpha: order α of the Rényi entropy (``"renyi"`` only). ``2`` has a closed form over all
            pairs; any other value (``1`` is the von Neumann limit) needs an eigendecomposition
            per pair of neurons, which is only practical for narrow MLPs or few tokens.
        num_tokens: calibration tokens sampled (uniformly, seeded by ``seed``) per layer for the
            estimator and for ``compensate``; default 16384 for ``"gaussian"``, 256 for ``"renyi"``.
            All tokens are used when the calibration set has fewer.
        bandwidth: rule for each neuron's kernel bandwidth (``"renyi"`` only): ``"silverman"``
            (``0.9 · min(σ, IQR/1.34) · n^(-1/5)``) or ``"scott"`` (``σ · n^(-1/5)``). Both scale
            with the neuron, so the estimate does not change when a neuron is scaled.
        compensate: fold each removed neuron's contribution into the kept neuron it duplicates
            (least-squares update of the down projection's columns; see the module docstring).
        selection: ``"weighted"`` (default): remove the neuron with the smallest output energy left
            uncovered, ``‖W_out[:, r]‖² · E[h_r²] · exp(-2 I)``; ``"redundancy"``: the paper's
            order, highest mutual information first, whatever the neuron's scale (removes
            massive-activation neurons on real LLMs; see the module docstring).

    Only MLP neurons are scored: ``heads=True`` is refused (remove heads first with
    ``LLMRankConfig`` or ``L1NormStructuredConfig``).
    """

    method: ClassVar[str] = "mutual-info"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.00030"

    estimator: str = "gaussian"
    alpha: float = 2.0
    num_tokens: int | None = None
    bandwidth: str = "silverman"
    compensate: bool = True
    selection: str = "weighted"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            raise PruningConfigError(
                "estimator", f"estimator must be 'gaussian' (correlation-based, fast) or 'renyi' (matrix-based Rényi "
                f"α-entropy with a Gaussian kernel), got {self.estimator!r}"
            )
        if self.alpha <= 0:
            raise PruningConfigError(
                "alpha", f"alpha must be a positive number (the Rényi entropy order, e.g. 2), got {self.alpha!r}"
            )
        if self.num_tokens is None:
            self.num_tokens = DEFAULT_TOKENS[self.estimator]
        if self.num_tokens < 2:
            raise PruningConfigError(
                "num_tokens", f"num_tokens must be an integer >= 2 (tokens sampled per layer), got {self.num_tokens!r}"
            )
        if self.bandwidth not in BANDWIDTH_RULES:
            raise PruningConfigError("bandwidth", f"bandwidth must be one of {BANDWIDTH_RULES}, got "
                                     f"{self.bandwidth!r}")
        if self.selection not in SELECTIONS:
            raise PruningConfigError(
                "selection", f"selection must be 'weighted' (mutual information weighted by each neuron's output "
                f"energy) or 'redundancy' (the paper's order: highest mutual information first), got "
                f"{self.selection!r}"
            )
        if self.heads:
            raise PruningConfigError(
                "heads", "MutualInfoConfig scores MLP neurons only; to remove attention heads too, prune them first "
                "with LLMRankConfig(heads=True, ...) or L1NormStructuredConfig(heads=True, ...), then run this with "
                "heads=False"
            )


def estimate_mutual_information(x: torch.Tensor, config: MutualInfoConfig,
                                moments: Moments | None = None) -> torch.Tensor:
    """The ``(neurons, neurons)`` mutual information the configured estimator gives for activations ``x``."""
    if config.estimator == "gaussian":
        return gaussian_mutual_information(moments if moments is not None else activation_moments(x))
    return renyi_mutual_information(x, config.alpha, config.bandwidth)


def redundancy(mi: torch.Tensor, constant: torch.Tensor, energy: torch.Tensor | None = None) -> torch.Tensor:
    """The matrix the greedy pass reads: ``mi`` with the diagonal at ``-inf`` and constant rows above all.

    With ``energy`` (each neuron's output energy ``‖W_out[:, r]‖² · E[h_r²]``), row ``r`` is
    shifted by ``-½ log energy[r]``: the row maximum then orders neurons by
    ``energy · exp(-2 I)`` (smallest first) while each row's best partner stays the same.
    """
    out = mi.clone()
    if energy is not None:
        tiny = torch.finfo(torch.float32).tiny
        out -= 0.5 * energy.to(out).clamp_min(tiny).log()[:, None]
    if constant.any():
        finite = out[torch.isfinite(out)]
        ceiling = (finite.max() if finite.numel() else out.new_zeros(())) + 1.0
        out[constant, :] = ceiling
    out.fill_diagonal_(float("-inf"))
    return out


def greedy_removal(redundancy: torch.Tensor, count: int) -> torch.Tensor:
    """Neurons to remove, in order: each step the kept neuron with the highest redundancy to another kept one.

    ``redundancy[i, j]`` is how much of neuron ``i`` neuron ``j`` duplicates (``-inf`` on the
    diagonal). Ties (a pair's two neurons always tie) go to the neuron with the larger total
    redundancy to the kept neurons, then to the lower index. Each step updates a running
    row maximum with masked tensor operations; only the rows whose best partner was just
    removed are recomputed.
    """
    width = redundancy.shape[0]
    count = max(0, min(count, width))
    device = redundancy.device
    kept = torch.ones(width, dtype=torch.bool, device=device)
    best, partner = redundancy.max(dim=1) if width > 1 else (
        torch.full((width,), float("-inf"), device=device), torch.zeros(width, dtype=torch.long, device=device))
    finite = torch.where(torch.isfinite(redundancy), redundancy, 0.0).double()
    totals = finite.sum(dim=1)
    order = torch.empty(count, dtype=torch.long, device=device)
    minus_inf = torch.tensor(float("-inf"), device=device)
    for step in range(count):
        score = torch.where(kept, best, minus_inf)
        top = score.max()
        tolerance = TIE_TOLERANCE * top.abs().clamp_min(1.0) if torch.isfinite(top) else 0.0
        candidates = kept & (score >= top - tolerance)
        chosen = torch.where(candidates, totals, float("-inf")).argmax()
        order[step] = chosen
        kept[chosen] = False
        totals -= finite[:, chosen]
        stale = torch.nonzero(kept & (partner == chosen)).squeeze(1)
        if stale.numel():
            rows = redundancy[stale].masked_fill(~kept, float("-inf"))
            best[stale], partner[stale] = rows.max(dim=1)
    return order


def removal_scores(order: torch.Tensor, width: int) -> torch.Tensor:
    """Scores for ``StructuredPruner``: 0 for kept neurons, ``step - count`` for the one removed at ``step``."""
    scores = torch.zeros(width, dtype=torch.float32, device=order.device)
    scores[order] = torch.arange(order.numel(), dtype=torch.float32, device=order.device) - order.numel()
    return scores


def compensate_removed(down: nn.Module, weight: torch.Tensor, moments: Moments, mi: torch.Tensor,
                       removed: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Fold each removed neuron into its most redundant kept neuron; return the new ``(out, in)`` weight.

    ``h_r ≈ β h_p`` (``+ γ`` when ``down`` has a bias) by least squares on the sampled
    activations, so ``W[:, p] += β W[:, r]`` (bias ``+= γ W[:, r]``). The partner ``p`` is the
    kept neuron with the highest mutual information to ``r``; a constant neuron, which has
    none, goes to the kept neuron that fits it best.
    """
    if not removed.numel() or not kept.numel():
        return weight
    has_bias = getattr(down, "bias", None) is not None
    second = moments.second
    fit = moments.covariance if has_bias else second
    diagonal = fit.diagonal()
    constant = constant_neurons(moments.covariance.diagonal().clamp_min(0))
    choice = mi[removed][:, kept].clone()
    reduction = second[removed][:, kept].square() / second.diagonal()[kept].clamp_min(1e-30)
    choice = torch.where(constant[removed, None], reduction, choice)
    partner = kept[choice.argmax(dim=1)]
    denominator = diagonal[partner]
    beta = torch.where(denominator > 0, fit[removed, partner] / denominator.clamp_min(1e-30), 0.0)
    columns = weight[:, removed]
    weight = weight.index_add(1, partner, columns * beta)
    if has_bias:
        gamma = moments.mean[removed] - beta * moments.mean[partner]
        bias = down.bias
        bias.data += (columns @ gamma).to(dtype=bias.dtype, device=bias.device)
    return weight


def output_energy(moments: Moments, weight: torch.Tensor) -> torch.Tensor:
    """Each neuron's share of the MLP output energy: ``‖W_out[:, r]‖² · E[h_r²]`` (``weight`` is ``(out, in)``)."""
    second = moments.covariance.diagonal() + moments.mean.square()
    return column_squares(weight).to(second) * second


def select_redundant(activations: torch.Tensor, config: MutualInfoConfig, count: int,
                     down_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, Moments, torch.Tensor]:
    """Score one layer: the ``count`` neurons to remove in greedy order, the moments and the mutual information.

    ``activations`` are ``(tokens, neurons)``; everything runs on their device.
    ``down_weight`` (``(out, neurons)``) is needed for ``selection="weighted"``.
    """
    moments = activation_moments(activations)
    mi = estimate_mutual_information(activations, config, moments)
    constant = constant_neurons(moments.covariance.diagonal().clamp_min(0))
    energy = None
    if config.selection == "weighted":
        if down_weight is None:
            raise ValueError("selection='weighted' needs the down projection's weight (down_weight=)")
        energy = output_energy(moments, down_weight.to(activations.device))
    return greedy_removal(redundancy(mi, constant, energy), count), moments, mi


class TokenSample:
    """Forward pre-hook on the down projection that keeps its inputs at chosen token positions."""

    def __init__(self, module: nn.Module, positions: torch.Tensor, width: int, device: torch.device) -> None:
        self.positions = positions.to(device)  # sorted global token positions to keep
        self.values = torch.zeros(positions.numel(), width, dtype=torch.float32, device=device)
        self.filled = 0
        self.offset = 0
        self.handle = module.register_forward_pre_hook(self._take)

    def _take(self, module: nn.Module, args: tuple) -> None:
        flat = args[0].detach().flatten(0, -2)
        end = self.offset + flat.shape[0]
        lo = int(torch.searchsorted(self.positions, self.offset))
        hi = int(torch.searchsorted(self.positions, end))
        if hi > lo:
            rows = (self.positions[lo:hi] - self.offset).to(flat.device)
            self.values[lo:hi] = flat.index_select(0, rows).to(self.values)
            self.filled = max(self.filled, hi)
        self.offset = end

    def remove(self) -> None:
        self.handle.remove()

    def activations(self) -> torch.Tensor:
        if self.filled < self.values.shape[0]:
            raise RuntimeError(
                f"the MLP saw {self.offset} calibration tokens but {self.values.shape[0]} were expected; "
                "the layer's forward pass did not reach its down projection for every token"
            )
        return self.values


class MutualInfoPruner(StructuredPruner):
    """Samples each layer's neuron activations, scores redundancy once, removes greedily."""

    uses_activations = False  # the engine's norm statistics are not needed: ``TokenSample`` keeps the activations

    def __init__(self, config: MutualInfoConfig) -> None:
        super().__init__(config)
        self.config: MutualInfoConfig = config
        self.sample: TokenSample | None = None

    def start_layer(self, context: LayerContext) -> None:
        super().start_layer(context)
        self._drop_sample()
        if context.inputs is None:
            raise ValueError("mutual-info needs calibration data: pass calibration_data= or a tokenizer")
        total = context.inputs.shape[0] * context.inputs.shape[1]
        down = operator(context.layout, context.index, context.layout.spec.mlp_out)
        generator = torch.Generator().manual_seed((self.config.seed * 1_000_003 + context.index) % 2**63)
        count = min(self.config.num_tokens, total)
        positions = torch.randperm(total, generator=generator)[:count].sort().values
        self.sample = TokenSample(down.module, positions, down.in_features, context.device)

    def _drop_sample(self) -> None:
        if self.sample is not None:
            self.sample.remove()
            self.sample = None

    def score_neurons(self, context: LayerContext) -> torch.Tensor:
        """Greedy removal order as scores; with ``compensate``, also folds the removed neurons' columns."""
        if self.sample is None:
            raise RuntimeError("score_neurons was called without start_layer: no activations were sampled")
        activations = self.sample.activations()
        self._drop_sample()
        layout, index = context.layout, context.index
        width = activations.shape[1]
        count = width - kept_count(width, self.config.amount, self.config.neuron_multiple)
        if count == 0:
            return torch.zeros(width)
        down = operator(layout, index, layout.spec.mlp_out)
        weight = down.read_weight().detach().to(device=activations.device, dtype=torch.float32)
        order, moments, mi = select_redundant(activations, self.config, count, weight)
        del activations
        if self.config.compensate:
            kept = torch.ones(width, dtype=torch.bool, device=order.device)
            kept[order] = False
            new = compensate_removed(down.module, weight, moments, mi, order.sort().values,
                                     torch.nonzero(kept).squeeze(1))
            down.write_weight(new)
        logger.debug("layer %d: removing %d of %d neurons by %s mutual information", index, count, width,
                     self.config.estimator)
        return removal_scores(order, width)

    def score_groups(self, context: LayerContext) -> torch.Tensor:
        raise TypeError("MutualInfoConfig scores MLP neurons only (heads=True is refused at configuration)")

    def finish_layer(self, context: LayerContext) -> bool:
        try:
            return super().finish_layer(context)
        finally:
            self._drop_sample()
