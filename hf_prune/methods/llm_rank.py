"""LLM-Rank / MLP-Rank (arXiv 2410.13299): weighted-PageRank centrality of MLP neurons.

The MLPs are seen as a weighted directed acyclic graph: hidden channels feed neurons
through ``|W_in|`` (gate and up rows), neurons feed hidden channels through ``|W_out|``.
A node's importance mixes what flows in from the nodes before it with its own activation
norm on calibration data::

    c = γ · normalize(M c_prev) + (1 - γ) · normalize(‖activation‖),   c normalized to sum 1
    M = θ · |W| / colsum|W| + (1 - θ) · A / colsum A                  (A: non-zero edges)

With ``scope="chained"`` (LLM-Rank) the importance of the hidden channels leaving one MLP
(through ``|W_out|`` of its kept neurons, mixed with the norm of its output) is what enters
the next MLP, through the residual stream; the first MLP starts from its input's channel
norms. With ``scope="isolated"`` (MLP-Rank) every MLP starts from its own input's norms.
The same fraction of the lowest-ranked neurons is removed in every layer, physically.

Unlike the authors' code, which zeroes rows of both ``up_proj`` and ``down_proj`` (the
latter are residual-stream channels), only intermediate neurons are removed here.

Defaults beyond the paper. The flow term is nearly flat: each input channel hands its
importance to the neurons in shares of its column of ``|W|``, which is blind to how much a
neuron actually outputs, and ranking by incoming weight alone (L1 norm) is what wrecks a real
model. With the paper's ``γ = 0.9`` that flow decides the ranking; on SmolLM2-135M it loses to
the activation norm (one of its own ingredients) at every amount measured (the README gives
the numbers). No single γ is best in every layer, so by default (``gamma="auto"``) each layer
takes, among ``gamma_candidates``, the γ whose kept neurons lose the least MLP output on the
calibration tokens: ``‖W_out[:, R] H_R‖²`` for the removed neurons ``R``, computed exactly
from the Gram matrix of ``down_proj``'s input. ``γ = 0`` (plain activation norm) is among the
candidates, so no layer does worse on that objective than the activation-norm baseline.
``score="energy"`` also weights the centrality by each neuron's output norm
``‖W_out[:, j]‖·‖h_j‖`` (the square root of the output energy its removal loses), which keeps
neurons that read weakly but write strongly. ``LLMRankConfig(gamma=0.9)`` is the paper's setting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers.utils import logging

from ..engine.statistics import StatKind
from ..errors import PruningConfigError
from ..surgery.geometry import attention_geometry, attention_input_names, mlp_input_magnitude, operator
from ..walker.layout import Operator
from .base import LayerContext
from .structured.base import StructuredConfig, StructuredPruner, kept_count, kept_groups, top_units
from .structured.scores import (
    attention_input_magnitude,
    complement,
    group_activation_norms,
    neuron_activation_norms,
    neuron_output_norms,
    normalize,
    propagate,
    removal_loss,
    statistics,
    sum_by_group,
)

logger = logging.get_logger(__name__)

SCOPES = ("chained", "isolated")
SCORES = ("centrality", "energy")
#: The γ values ``gamma="auto"`` chooses from, per layer: plain activation norm (0) up to the paper's 0.9.
GAMMA_CANDIDATES = (0.0, 0.25, 0.5, 0.75, 0.9)


@dataclass
class LLMRankConfig(StructuredConfig):
    """LLM-Rank (``scope="chained"``) or MLP-Rank (``scope="isolated"``) structured pruning.

    The paper's exact settings: ``LLMRankConfig(gamma=0.9)`` (``theta=0.5``, ``scope="chained"``,
    ``score="centrality"``); the default ``gamma="auto"`` (γ chosen per layer on the calibration
    loss) is beyond the paper.

    Args:
        amount: share of MLP neurons removed in every layer (see ``StructuredConfig``; kept
            counts are rounded to a multiple of ``round_to``).
        scope: ``"chained"``: importance flows through all MLPs in order through the residual
            stream (LLM-Rank); ``"isolated"``: each MLP is ranked alone (MLP-Rank).
        gamma: γ, the share of a node's importance that flows in from the previous nodes;
            ``1 - γ`` comes from its own activation norm. A number in [0, 1] fixes it for every
            layer; ``"auto"`` (default, beyond the paper) chooses it per layer among
            ``gamma_candidates``: the γ whose kept units lose the least of the MLP's (or, for
            KV groups, ``o_proj``'s) output on the calibration tokens. This needs the Gram
            matrix of ``down_proj``'s input (intermediate size squared, in fp32) per layer.
            0.9 is the authors' MLP-Rank default, the paper's setting; with it the nearly flat
            flow decides the ranking and loses to plain activation norm on real models (see
            the module docstring). Their LLM-Rank code defaults to 0, which is activation-norm
            pruning (``ActivationNormStructuredConfig``).
        gamma_candidates: the γ values ``gamma="auto"`` tries in every layer (ties: the first);
            default ``[0.0, 0.25, 0.5, 0.75, 0.9]``. With 0 among them no layer loses more
            output than under activation-norm pruning of the same inputs.
        theta: θ, the share of the weighted adjacency ``|W|`` against the unweighted one
            (edge counts) in the transition matrix. Default 0.5, as in the authors' code.
        score: ``"centrality"`` (default): the paper's mixed centrality; ``"energy"``: the
            centrality times each neuron's output norm ``‖W_out[:, j]‖₂·‖h_j‖₂`` (what removing
            it loses), renormalized; keeps neurons that read weakly but write strongly. Only
            MLP neurons; KV groups are always ranked by the centrality.
        heads: also rank attention KV groups (their q/k/v rows take the importance entering
            the layer) and remove ``head_amount`` of them.
    """

    method: ClassVar[str] = "llm-rank"
    paper: ClassVar[str] = "https://arxiv.org/abs/2410.13299"

    scope: str = "chained"
    gamma: float | str = "auto"
    gamma_candidates: list[float] = field(default_factory=lambda: list(GAMMA_CANDIDATES))
    theta: float = 0.5
    score: str = "centrality"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in SCOPES:
            raise PruningConfigError(
                "scope", f"scope must be 'chained' (LLM-Rank: importance flows through all MLPs) or 'isolated' "
                f"(MLP-Rank: each MLP alone), got {self.scope!r}"
            )
        if self.score not in SCORES:
            raise PruningConfigError(
                "score", f"score must be 'centrality' (the paper's score) or 'energy' (centrality weighted by the "
                f"output each neuron adds, ‖W_out[:, j]‖·‖h_j‖), got {self.score!r}"
            )
        if isinstance(self.gamma, str) and self.gamma != "auto":
            raise PruningConfigError(
                "gamma", f"gamma must be a number in [0, 1] or 'auto' (chosen per layer on the calibration loss), "
                f"got {self.gamma!r}"
            )
        if not self.gamma_candidates:
            raise PruningConfigError("gamma_candidates", "gamma_candidates must hold at least one γ in [0, 1]")
        checked = [("theta", self.theta)] + [("gamma_candidates", value) for value in self.gamma_candidates]
        if not self.auto_gamma:
            checked.append(("gamma", self.gamma))
        for name, value in checked:
            if not 0 <= value <= 1:
                raise PruningConfigError(name, f"{name} must be in [0, 1], got {value!r}")

    @property
    def auto_gamma(self) -> bool:
        """Whether γ is chosen per layer on the calibration loss."""
        return self.gamma == "auto"



class LLMRankPruner(StructuredPruner):
    """Keeps the importance of the residual channels from one layer to the next (chained scope).

    With ``gamma="auto"``, :attr:`chosen_gammas` lists the γ each layer's neurons took.
    """

    def __init__(self, config: LLMRankConfig) -> None:
        super().__init__(config)
        self.config: LLMRankConfig = config
        self.residual: torch.Tensor | None = None  # importance of hidden channels leaving the last MLP
        self.chosen_gammas: list[float] = []
        self._gram_names: set[str] = set()
        self._gamma = 0.0 if config.auto_gamma else float(config.gamma)  # γ of this layer's neurons
        self._entering: torch.Tensor | None = None
        self._output_squares: torch.Tensor | None = None
        self._handle = None

    @property
    def chained(self) -> bool:
        return self.config.scope == "chained"

    def statistics_kind(self, op: Operator) -> StatKind:
        kind = super().statistics_kind(op)
        if kind is StatKind.NORMS and op.local_name in self._gram_names:
            return StatKind.GRAM  # the output a choice of γ loses is measured through these
        return kind

    def start_layer(self, context: LayerContext) -> None:
        super().start_layer(context)
        spec = context.layout.spec
        self._gram_names = {spec.mlp_out, spec.o} if self.config.auto_gamma else set()
        self._remove_hook()
        self._output_squares = None
        if self.chained:
            down = operator(context.layout, context.index, context.layout.spec.mlp_out).module
            self._handle = down.register_forward_hook(self._record_output)

    def _record_output(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        flat = output.detach().flatten(0, -2).float()
        squares = flat.square().sum(dim=0)
        self._output_squares = squares if self._output_squares is None else self._output_squares + squares

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _entering_importance(self, context: LayerContext, input_name: str) -> torch.Tensor:
        """Importance of the hidden channels entering an MLP or attention block of this layer."""
        if self.chained and self.residual is not None:
            return self.residual.to(context.device)
        return normalize(statistics(context, input_name).column_norms)

    @staticmethod
    def _mix(flow: torch.Tensor, activation: torch.Tensor, gamma: float) -> torch.Tensor:
        return normalize(gamma * normalize(flow) + (1.0 - gamma) * normalize(activation.to(flow.device)))

    def _least_loss(self, context: LayerContext, scores_of: Callable[[float], torch.Tensor], keep: int,
                    output_name: str, columns_of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, torch.Tensor]:
        """The candidate γ (and its scores) whose ``keep`` best units lose the least output of ``output_name``
        on the calibration tokens; ``columns_of`` maps removed units to that operator's input columns."""
        weight = operator(context.layout, context.index, output_name).read_weight()
        gram = statistics(context, output_name).gram
        best: tuple[float, float, torch.Tensor] | None = None
        for gamma in self.config.gamma_candidates:
            scores = scores_of(gamma)
            removed = complement(top_units(scores, keep), scores.numel())
            loss = removal_loss(weight, gram, columns_of(removed))
            if best is None or loss < best[0]:
                best = (loss, gamma, scores)
        return best[1], best[2]

    def score_neurons(self, context: LayerContext) -> torch.Tensor:
        layout, index = context.layout, context.index
        entering = self._entering_importance(context, layout.spec.mlp_in[0])
        self._entering = entering
        magnitude = mlp_input_magnitude(layout, index).to(entering.device)
        flow = propagate(magnitude, entering, self.config.theta)
        activation = neuron_activation_norms(context)
        output = neuron_output_norms(context).to(flow.device) if self.config.score == "energy" else None

        def scores_of(gamma: float) -> torch.Tensor:
            centrality = self._mix(flow, activation, gamma)
            return centrality if output is None else normalize(centrality * output)

        if not self.config.auto_gamma:
            return scores_of(self._gamma)
        keep = kept_count(flow.numel(), self.config.amount, self.config.neuron_multiple)
        self._gamma, scores = self._least_loss(context, scores_of, keep, layout.spec.mlp_out, lambda units: units)
        self.chosen_gammas.append(self._gamma)
        logger.info("llm-rank: layer %d ranks its neurons with gamma %.2f", index, self._gamma)
        return scores

    def score_groups(self, context: LayerContext) -> torch.Tensor:
        layout, index = context.layout, context.index
        geometry = attention_geometry(layout, index)
        entering = self._entering_importance(context, attention_input_names(layout)[0])
        magnitude, groups = attention_input_magnitude(layout, index, geometry)
        row_flow = propagate(magnitude.to(entering.device), entering, self.config.theta)
        flow = sum_by_group(row_flow, groups.to(row_flow.device), geometry.kv_heads)
        activation = group_activation_norms(context, geometry)
        if not self.config.auto_gamma:
            return self._mix(flow, activation, self._gamma)
        keep = kept_groups(geometry.kv_heads, geometry.group, self.config.effective_head_amount,
                           self.config.tensor_parallel_size)
        width = geometry.group * geometry.head_dim  # o_proj input columns of one KV group

        def columns_of(removed: torch.Tensor) -> torch.Tensor:
            return (removed[:, None] * width + torch.arange(width)).flatten()

        gamma, scores = self._least_loss(context, lambda g: self._mix(flow, activation, g), keep, layout.spec.o,
                                         columns_of)
        logger.info("llm-rank: layer %d ranks its KV groups with gamma %.2f", index, gamma)
        return scores

    def layer_done(self, context: LayerContext, neurons: torch.Tensor, scores: torch.Tensor | None) -> None:
        self._remove_hook()
        if not self.chained:
            return
        layout, index = context.layout, context.index
        down = operator(layout, index, layout.spec.mlp_out)
        magnitude = down.read_weight().detach().float().abs()  # (hidden, kept neurons), already shrunk
        if scores is not None and neurons.numel():
            kept_importance = normalize(scores.to(magnitude.device)[neurons.to(magnitude.device)])
            flow = propagate(magnitude, kept_importance, self.config.theta)
        else:
            flow = torch.zeros(down.out_features, device=magnitude.device)
        output = (self._output_squares.sqrt() if self._output_squares is not None
                  else torch.zeros_like(flow)).to(flow.device)
        residual = self._mix(flow, output, self._gamma)
        if residual.sum() <= 0:  # an MLP with nothing left passes the importance on unchanged
            residual = self._entering if self._entering is not None else self.residual
        self.residual = residual
        self._entering = None
