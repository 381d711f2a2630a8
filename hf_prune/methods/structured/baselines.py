"""Baselines of structured pruning: weight L1 norm and activation norm of whole neurons and heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...surgery.geometry import attention_geometry
from ..base import LayerContext
from .base import StructuredConfig, StructuredPruner
from .scores import group_activation_norms, group_l1, neuron_activation_norms, neuron_l1


@dataclass
class L1NormStructuredConfig(StructuredConfig):
    """Remove the MLP neurons (and KV groups) with the smallest L1 norm of incoming weights.

    A neuron's norm sums its gate and up rows (or its ``fc1`` row); a KV group's sums the
    query, key and value rows of its heads. Needs no calibration data. See
    ``StructuredConfig`` for ``amount``, ``heads``, ``head_amount`` and ``round_to``.
    """

    method: ClassVar[str] = "l1-norm-structured"
    needs_calibration: ClassVar[bool] = False



class L1NormStructuredPruner(StructuredPruner):
    """Scores neurons (and KV groups) by the L1 norm of their weights; no calibration data."""

    uses_activations = False

    def score_neurons(self, context: LayerContext) -> torch.Tensor:
        return neuron_l1(context.layout, context.index)

    def score_groups(self, context: LayerContext) -> torch.Tensor:
        return group_l1(context.layout, context.index)


@dataclass
class ActivationNormStructuredConfig(StructuredConfig):
    """Remove the MLP neurons (and KV groups) whose outputs have the smallest norm on calibration data.

    A neuron's score is ``‖h_j‖₂`` of its activation (what ``down_proj`` reads) over the
    calibration tokens; a KV group's is the norm of its heads' attention output. See
    ``StructuredConfig`` for the shared fields.
    """

    method: ClassVar[str] = "activation-norm-structured"



class ActivationNormStructuredPruner(StructuredPruner):
    """Scores neurons by the norm of their activations on calibration data (KV groups likewise)."""

    def score_neurons(self, context: LayerContext) -> torch.Tensor:
        return neuron_activation_norms(context)

    def score_groups(self, context: LayerContext) -> torch.Tensor:
        return group_activation_norms(context, attention_geometry(context.layout, context.index))
