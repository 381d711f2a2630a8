"""Where a decoder layer's MLP neurons and attention heads sit inside its weights.

An MLP neuron ``j`` is row ``j`` of every ``mlp_in`` projection (rows ``j`` and ``j + I`` of
a fused gate/up projection) and column ``j`` of ``mlp_out``. Attention is pruned by KV
group: group ``g`` owns its key and value head and the ``group`` query heads that read
it (one query head per group for multi-head attention). Rows of fused ``qkv``
projections follow the family's layout: ``[q; k; v]`` blocks, or per head ``[q_h, k_h, v_h]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..walker.layout import DecoderLayout, Operator


@dataclass(frozen=True)
class LayerSizes:
    """Kept MLP neurons, query heads and key/value heads of one decoder layer."""

    mlp_neurons: int
    attention_heads: int
    kv_heads: int


@dataclass(frozen=True)
class AttentionGeometry:
    """Current head counts of one layer's attention, with its head width and group size."""

    heads: int
    kv_heads: int
    head_dim: int
    group: int  # query heads per key/value head


def operator(layout: DecoderLayout, index: int, local_name: str) -> Operator:
    """The operator ``local_name`` of layer ``index``."""
    module = layout.submodule(index, local_name)
    return Operator(f"{layout.layer_prefix(index)}.{local_name}", local_name, index, module)


def _parent_path(local_name: str) -> str:
    return local_name.rpartition(".")[0]


def attention_module(layout: DecoderLayout, index: int) -> nn.Module:
    """The self-attention module of layer ``index`` (the parent of its output projection)."""
    spec = layout.attention_spec(index)
    if spec.o is None:
        raise UnsupportedArchitectureError(
            f"{layout.model_type}: cannot find the attention heads of layer {index}: "
            f"{'; '.join([m for m in spec.missing if m.startswith('attention')] or spec.missing)}")
    path = _parent_path(spec.o)
    return layout.submodule(index, path) if path else layout.layers[index]


def mlp_module(layout: DecoderLayout, index: int) -> nn.Module:
    """The module holding the MLP projections (the decoder layer itself for OPT)."""
    path = _parent_path(layout.spec.mlp_out)
    return layout.submodule(index, path) if path else layout.layers[index]


def attention_input_names(layout: DecoderLayout, index: int = 0) -> tuple[str, ...]:
    """Layer-relative names of the projections that read the attention input (of layer ``index``, which
    matters only in mixtures of experts, whose layers may differ)."""
    spec = layout.attention_spec(index)
    names = (spec.qkv,) if spec.qkv else (spec.q, spec.k, spec.v)
    return tuple(name for name in names if name)


def dense_group_size(layout: DecoderLayout) -> int:
    """Query heads per key/value head, from the model config."""
    config = layout.model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return max(heads // kv_heads, 1)


def attention_geometry(layout: DecoderLayout, index: int) -> AttentionGeometry:
    """Head counts measured from the weights of layer ``index``."""
    attn = attention_module(layout, index)
    head_dim = next(
        (value for value in (getattr(attn, "head_dim", None), getattr(attn, "head_size", None))
         if isinstance(value, int) and value > 0),
        None,
    )
    if head_dim is None:
        raise UnsupportedArchitectureError(
            f"cannot find the head width of {type(attn).__name__} in layer {index}; structured head pruning "
            "supports the families listed by hf_prune.supported_model_types()"
        )
    spec = layout.attention_spec(index)
    heads = operator(layout, index, spec.o).in_features // head_dim
    if spec.qkv is None:
        kv_heads = operator(layout, index, spec.k).out_features // head_dim
    elif spec.qkv_layout == "per_head":
        kv_heads = heads
    else:
        kv_heads = (operator(layout, index, spec.qkv).out_features // head_dim - heads) // 2
    group = heads // kv_heads if kv_heads else dense_group_size(layout)
    return AttentionGeometry(heads, kv_heads, head_dim, group)


def layer_sizes(layout: DecoderLayout, index: int) -> LayerSizes:
    """Current MLP width and head counts of layer ``index``."""
    geometry = attention_geometry(layout, index)
    neurons = operator(layout, index, layout.spec.mlp_out).in_features
    return LayerSizes(neurons, geometry.heads, geometry.kv_heads)


def unit_rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of ``width``-wide blocks ``units`` (e.g. the rows of some heads)."""
    return (units.view(-1, 1) * width + torch.arange(width, device=units.device)).reshape(-1)


def query_heads(groups: torch.Tensor, geometry: AttentionGeometry) -> torch.Tensor:
    """The query heads reading the key/value groups ``groups``."""
    return unit_rows(groups, geometry.group)


def attention_rows(layout: DecoderLayout, geometry: AttentionGeometry, groups: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output rows of each attention input projection that belong to the KV groups ``groups``."""
    spec = layout.spec
    d = geometry.head_dim
    q_rows = unit_rows(query_heads(groups, geometry), d)
    kv_rows = unit_rows(groups, d)
    if spec.qkv is None:
        return {spec.q: q_rows, spec.k: kv_rows, spec.v: kv_rows}
    if spec.qkv_layout == "per_head":
        return {spec.qkv: unit_rows(query_heads(groups, geometry), 3 * d)}
    q_size = geometry.heads * d
    kv_size = geometry.kv_heads * d
    return {spec.qkv: torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])}


def attention_output_columns(geometry: AttentionGeometry, groups: torch.Tensor) -> torch.Tensor:
    """Input columns of the attention output projection that belong to the KV groups ``groups``."""
    return unit_rows(query_heads(groups, geometry), geometry.head_dim)


def mlp_rows(layout: DecoderLayout, neurons: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of each ``mlp_in`` projection holding the neurons ``neurons`` of an MLP ``width`` wide."""
    return torch.cat([neurons, neurons + width]) if layout.spec.fused_gate_up else neurons


def mlp_input_magnitude(layout: DecoderLayout, index: int) -> torch.Tensor:
    """``(neurons, hidden)`` fp32: ``|W|`` of every input edge of each neuron, parallel edges summed.

    For a gated MLP neuron ``j`` reads the hidden channels through both its gate row and its
    up row; both edges count.
    """
    spec = layout.spec
    width = operator(layout, index, spec.mlp_out).in_features
    total: torch.Tensor | None = None
    for name in spec.mlp_in:
        weight = operator(layout, index, name).read_weight().detach().float().abs()
        parts = (weight[:width], weight[width:]) if spec.fused_gate_up else (weight,)
        for part in parts:
            total = part.clone() if total is None else total + part
    assert total is not None
    return total


def group_of_attention_rows(layout: DecoderLayout, index: int, geometry: AttentionGeometry) -> dict[str, torch.Tensor]:
    """For each attention input projection of layer ``index``, the KV group of every output row."""
    result = {
        name: torch.full((operator(layout, index, name).out_features,), -1, dtype=torch.long, device="cpu")
        for name in attention_input_names(layout)
    }
    for group in range(geometry.kv_heads):
        for name, rows in attention_rows(layout, geometry, torch.tensor([group], device="cpu")).items():
            result[name][rows] = group
    return result
