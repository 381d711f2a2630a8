"""Building blocks for scoring neurons and KV groups: norms, L1 magnitudes, importance flow."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...engine.statistics import InputStatistics
from ...surgery.expert_neurons import SharedExpert
from ...surgery.geometry import (
    AttentionGeometry,
    attention_geometry,
    group_of_attention_rows,
    mlp_input_magnitude,
    operator,
)
from ...walker.experts import ExpertBank
from ...walker.layout import DecoderLayout
from ..base import LayerContext


def normalize(values: torch.Tensor) -> torch.Tensor:
    """Non-negative scores scaled to sum to one (all zeros stay zeros)."""
    values = values.float().clamp_min(0)
    total = values.sum()
    return values / total if total > 0 else torch.zeros_like(values)


def statistics(context: LayerContext, local_name: str) -> InputStatistics:
    """The input statistics the engine collected for operator ``local_name`` of this layer."""
    name = f"{context.layout.layer_prefix(context.index)}.{local_name}"
    stats = context.stats.get(name)
    if stats is None:
        raise ValueError(f"no calibration statistics were collected for {name}; this method needs calibration data")
    return stats


def neuron_activation_norms(context: LayerContext) -> torch.Tensor:
    """``‖h_j‖₂`` over calibration tokens of each MLP neuron's activation (the input of ``mlp_out``)."""
    return statistics(context, context.layout.spec.mlp_out).column_norms


def group_activation_norms(context: LayerContext, geometry: AttentionGeometry) -> torch.Tensor:
    """``‖·‖₂`` over calibration tokens of each KV group's attention output (its heads' ``o`` inputs)."""
    squares = statistics(context, context.layout.spec.o).squared_norms
    per_group = squares.reshape(geometry.kv_heads, geometry.group * geometry.head_dim).sum(dim=1)
    return per_group.sqrt()


def column_squares(weight: torch.Tensor) -> torch.Tensor:
    """``‖W[:, j]‖²`` of each input column of an ``(out, in)`` weight: what one unit of input ``j`` writes."""
    return weight.detach().float().square().sum(dim=0)


def neuron_output_norms(context: LayerContext) -> torch.Tensor:
    """``‖W_out[:, j]‖₂ · ‖h_j‖₂`` of each MLP neuron: the norm, over calibration tokens, of what it adds to the
    residual stream, i.e. the square root of the output energy that removing it loses."""
    down = operator(context.layout, context.index, context.layout.spec.mlp_out).read_weight()
    activation = neuron_activation_norms(context)
    return column_squares(down).to(activation.device).sqrt() * activation


def complement(kept: torch.Tensor, width: int) -> torch.Tensor:
    """The indices in ``range(width)`` that are not in ``kept``, in increasing order."""
    mask = torch.ones(width, dtype=torch.bool)
    mask[kept.cpu()] = False
    return mask.nonzero().flatten()


def removal_loss(weight: torch.Tensor, gram: torch.Tensor, removed: torch.Tensor) -> float:
    """``‖W[:, R] X_R‖²`` summed over calibration tokens: the output an ``(out, in)`` operator loses when its
    input columns ``R`` are removed, from the Gram matrix ``X Xᵀ`` of its input (``trace(W_R G_RR W_Rᵀ)``)."""
    if removed.numel() == 0:
        return 0.0
    removed = removed.to(gram.device)
    columns = weight.detach().to(device=gram.device, dtype=torch.float32)[:, removed]
    return float(((columns @ gram[removed][:, removed]) * columns).sum())


def neuron_l1(layout: DecoderLayout, index: int) -> torch.Tensor:
    """L1 norm of each neuron's incoming weights (gate and up rows together)."""
    return mlp_input_magnitude(layout, index).sum(dim=1)


def attention_input_magnitude(layout: DecoderLayout, index: int,
                              geometry: AttentionGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """``|W|`` of all attention input projections stacked by rows, and the KV group of each row."""
    magnitudes, groups = [], []
    for name, row_groups in group_of_attention_rows(layout, index, geometry).items():
        magnitudes.append(operator(layout, index, name).read_weight().detach().float().abs())
        groups.append(row_groups.to(magnitudes[-1].device))
    return torch.cat(magnitudes), torch.cat(groups)


def group_l1(layout: DecoderLayout, index: int) -> torch.Tensor:
    """L1 norm of the query, key and value rows of each KV group."""
    geometry = attention_geometry(layout, index)
    magnitude, groups = attention_input_magnitude(layout, index, geometry)
    return sum_by_group(magnitude.sum(dim=1), groups, geometry.kv_heads)


def sum_by_group(values: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    return torch.zeros(count, dtype=values.dtype, device=values.device).scatter_add_(0, groups, values)


def propagate(magnitude: torch.Tensor, importance: torch.Tensor, theta: float) -> torch.Tensor:
    """Importance reaching each output node of an ``(out, in)`` layer from its input nodes.

    Each input node ``j`` hands its importance on to the output nodes it feeds, in shares
    ``θ·|W_ij|/Σ_i|W_ij| + (1-θ)·A_ij/Σ_i A_ij`` (``A`` = non-zero edges): the columns of the
    weighted and of the unweighted adjacency are normalized, as in weighted PageRank.
    """
    importance = importance.to(device=magnitude.device, dtype=torch.float32)
    adjacency = (magnitude != 0).float()
    weight_total = magnitude.sum(dim=0)
    edge_total = adjacency.sum(dim=0)
    by_weight = torch.where(weight_total > 0, importance / weight_total.clamp_min(1e-30), 0.0)
    by_edges = torch.where(edge_total > 0, importance / edge_total.clamp_min(1.0), 0.0)
    return theta * (magnitude @ by_weight) + (1.0 - theta) * (adjacency @ by_edges)


def expert_neuron_l1(bank: ExpertBank) -> torch.Tensor:
    """``[experts, neurons]``: L1 norm of each expert neuron's incoming weights (its gate and up rows)."""
    first = bank.projections[0].parameter
    owners = bank.row_neurons()
    scores = torch.zeros(bank.num_experts, bank.intermediate_size)
    for expert in range(bank.num_experts):
        rows = bank.weight(first, expert).detach().float().abs().sum(dim=1).cpu()
        scores[expert].index_add_(0, owners, rows)
    return scores


def expert_activation_norms(context: LayerContext, bank: ExpertBank, floor: int,
                            on_fallback: Callable[[str, int], None]) -> torch.Tensor:
    """``[experts, neurons]``: ``‖h_j‖₂`` of each expert neuron's activation over the calibration tokens routed
    to that expert. An expert routed fewer than ``floor`` tokens is ranked by :func:`expert_neuron_l1` instead
    (``on_fallback(slice name, tokens)`` is told); rankings are per expert, so the scales never mix."""
    down = next(p.parameter for p in bank.projections if p.role == "down")
    prefix = f"{context.layout.layer_prefix(context.index)}.{bank.path}.{down}"
    scores = torch.zeros(bank.num_experts, bank.intermediate_size)
    fallback = None
    for expert in range(bank.num_experts):
        stats = context.stats.get(f"{prefix}.{expert}")
        tokens = stats.tokens if stats is not None else 0
        if tokens >= max(floor, 1):
            scores[expert] = stats.column_norms.float().cpu()
            continue
        fallback = expert_neuron_l1(bank) if fallback is None else fallback
        scores[expert] = fallback[expert]
        on_fallback(f"{prefix}.{expert}", tokens)
    return scores


def shared_neuron_l1(shared: SharedExpert) -> torch.Tensor:
    """L1 norm of each shared-expert neuron's incoming weights (gate and up rows together)."""
    return sum(linear.weight.detach().float().abs().sum(dim=1).cpu() for linear in shared.inputs)


def shared_activation_norms(context: LayerContext, shared: SharedExpert) -> torch.Tensor:
    """``‖h_j‖₂`` over the calibration tokens of each shared-expert neuron (the input of its down projection)."""
    return statistics(context, f"{shared.path}.down_proj").column_norms.float().cpu()
