"""Baselines of structured pruning: weight L1 norm and activation norm of whole neurons and heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...surgery.expert_neurons import SharedExpert
from ...surgery.geometry import attention_geometry
from ...walker.experts import ExpertBank
from ..base import LayerContext
from .base import StructuredConfig, StructuredPruner
from .scores import (
    expert_activation_norms,
    expert_neuron_l1,
    group_activation_norms,
    group_l1,
    neuron_activation_norms,
    neuron_l1,
    shared_activation_norms,
    shared_neuron_l1,
)


@dataclass
class L1NormStructuredConfig(StructuredConfig):
    """Remove the MLP neurons (and KV groups) with the smallest L1 norm of incoming weights.

    A neuron's norm sums its gate and up rows (or its ``fc1`` row); a KV group's sums the
    query, key and value rows of its heads. Needs no calibration data. In a mixture of experts,
    each routed expert's neurons are ranked by their own gate/up rows and every expert keeps the
    same count. See ``StructuredConfig`` for ``amount``, ``heads``, ``head_amount`` and ``round_to``.
    """

    method: ClassVar[str] = "l1-norm-structured"
    needs_calibration: ClassVar[bool] = False



class L1NormStructuredPruner(StructuredPruner):
    """Scores neurons (and KV groups) by the L1 norm of their weights; no calibration data."""

    uses_activations = False
    scores_expert_neurons = True

    def score_neurons(self, context: LayerContext) -> torch.Tensor:
        return neuron_l1(context.layout, context.index)

    def score_expert_neurons(self, context: LayerContext, bank: ExpertBank) -> torch.Tensor:
        return expert_neuron_l1(bank)

    def score_shared_neurons(self, context: LayerContext, shared: SharedExpert) -> torch.Tensor:
        return shared_neuron_l1(shared)

    def score_groups(self, context: LayerContext) -> torch.Tensor:
        return group_l1(context.layout, context.index)


@dataclass
class ActivationNormStructuredConfig(StructuredConfig):
    """Remove the MLP neurons (and KV groups) whose outputs have the smallest norm on calibration data.

    A neuron's score is ``‖h_j‖₂`` of its activation (what ``down_proj`` reads) over the
    calibration tokens; a KV group's is the norm of its heads' attention output. In a mixture of
    experts, a routed expert's neuron is scored over the tokens routed to that expert only (an
    expert routed fewer than ``expert_token_floor`` tokens is ranked by the L1 norm of its incoming
    weights, listed in the record's ``experts`` entry), and every expert keeps the same count.
    See ``StructuredConfig`` for the shared fields.
    """

    method: ClassVar[str] = "activation-norm-structured"



class ActivationNormStructuredPruner(StructuredPruner):
    """Scores neurons by the norm of their activations on calibration data (KV groups likewise)."""

    scores_expert_neurons = True

    def score_neurons(self, context: LayerContext) -> torch.Tensor:
        return neuron_activation_norms(context)

    def score_expert_neurons(self, context: LayerContext, bank: ExpertBank) -> torch.Tensor:
        def fallback(name: str, tokens: int) -> None:
            self.expert_fallbacks.add(name)

        scores = expert_activation_norms(context, bank, self.config.expert_token_floor, fallback)
        down = next(p.parameter for p in bank.projections if p.role == "down")
        prefix = f"{context.layout.layer_prefix(context.index)}.{bank.path}.{down}"
        for expert in range(bank.num_experts):
            stats = context.stats.get(f"{prefix}.{expert}")
            self.expert_tokens[f"{prefix}.{expert}"] = stats.tokens if stats is not None else 0
        return scores

    def score_shared_neurons(self, context: LayerContext, shared: SharedExpert) -> torch.Tensor:
        return shared_activation_norms(context, shared)

    def score_groups(self, context: LayerContext) -> torch.Tensor:
        return group_activation_norms(context, attention_geometry(context.layout, context.index))
