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
the numbers). The default is therefore ``γ = 0.5``, where the activation norm, which follows
what removing a neuron loses, decides and the flow breaks near-ties. ``score="energy"`` also
weights the centrality by each neuron's output norm ``‖W_out[:, j]‖·‖h_j‖`` (the square root
of the output energy its removal loses), which keeps neurons that read weakly but write
strongly. ``LLMRankConfig(gamma=0.9)`` is the paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import PruningConfigError
from ..surgery.geometry import attention_geometry, attention_input_names, mlp_input_magnitude, operator
from .base import LayerContext
from .structured.base import StructuredConfig, StructuredPruner
from .structured.scores import (
    attention_input_magnitude,
    group_activation_norms,
    neuron_activation_norms,
    neuron_output_norms,
    normalize,
    propagate,
    statistics,
    sum_by_group,
)

SCOPES = ("chained", "isolated")
SCORES = ("centrality", "energy")


@dataclass
class LLMRankConfig(StructuredConfig):
    """LLM-Rank (``scope="chained"``) or MLP-Rank (``scope="isolated"``) structured pruning.

    The paper's exact settings: ``LLMRankConfig(gamma=0.9)`` (``theta=0.5``, ``scope="chained"``,
    ``score="centrality"``); the default ``gamma=0.5`` is beyond the paper.

    Args:
        amount: share of MLP neurons removed in every layer (see ``StructuredConfig``; kept
            counts are rounded to a multiple of ``round_to``).
        scope: ``"chained"``: importance flows through all MLPs in order through the residual
            stream (LLM-Rank); ``"isolated"``: each MLP is ranked alone (MLP-Rank).
        gamma: γ, the share of a node's importance that flows in from the previous nodes;
            ``1 - γ`` comes from its own activation norm. Default 0.5 (beyond the paper: with
            more, the nearly flat flow decides the ranking and loses to plain activation norm
            on real models; see the module docstring). 0.9 is the authors' MLP-Rank default,
            the paper's setting; their LLM-Rank code defaults to 0, which is activation-norm
            pruning (``ActivationNormStructuredConfig``).
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
    gamma: float = 0.5
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
        for name in ("gamma", "theta"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise PruningConfigError(name, f"{name} must be in [0, 1], got {value!r}")
            setattr(self, name, float(value))



class LLMRankPruner(StructuredPruner):
    """Keeps the importance of the residual channels from one layer to the next (chained scope)."""

    def __init__(self, config: LLMRankConfig) -> None:
        super().__init__(config)
        self.config: LLMRankConfig = config
        self.residual: torch.Tensor | None = None  # importance of hidden channels leaving the last MLP
        self._entering: torch.Tensor | None = None
        self._output_squares: torch.Tensor | None = None
        self._handle = None

    @property
    def chained(self) -> bool:
        return self.config.scope == "chained"

    def start_layer(self, context: LayerContext) -> None:
        super().start_layer(context)
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

    def _mix(self, flow: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        gamma = self.config.gamma
        return normalize(gamma * normalize(flow) + (1.0 - gamma) * normalize(activation.to(flow.device)))

    def score_neurons(self, context: LayerContext) -> torch.Tensor:
        layout, index = context.layout, context.index
        entering = self._entering_importance(context, layout.spec.mlp_in[0])
        self._entering = entering
        magnitude = mlp_input_magnitude(layout, index).to(entering.device)
        flow = propagate(magnitude, entering, self.config.theta)
        centrality = self._mix(flow, neuron_activation_norms(context))
        if self.config.score == "energy":
            return normalize(centrality * neuron_output_norms(context).to(centrality.device))
        return centrality

    def score_groups(self, context: LayerContext) -> torch.Tensor:
        layout, index = context.layout, context.index
        geometry = attention_geometry(layout, index)
        entering = self._entering_importance(context, attention_input_names(layout)[0])
        magnitude, groups = attention_input_magnitude(layout, index, geometry)
        row_flow = propagate(magnitude.to(entering.device), entering, self.config.theta)
        flow = sum_by_group(row_flow, groups.to(row_flow.device), geometry.kv_heads)
        return self._mix(flow, group_activation_norms(context, geometry))

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
        residual = self._mix(flow, output)
        if residual.sum() <= 0:  # an MLP with nothing left passes the importance on unchanged
            residual = self._entering if self._entering is not None else self.residual
        self.residual = residual
        self._entering = None
