"""Physical removal of MLP neurons and attention KV groups from one decoder layer.

Weights and biases are sliced, the modules' size attributes follow, and a layer left with
zero neurons or heads still runs (see ``empty``). Rotary tables, ``head_dim`` and the
number of query heads per KV head are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import SurgeryIndexError, UnsupportedArchitectureError
from ..walker.layout import DecoderLayout
from .empty import mark_empty_input, mark_headless
from .geometry import (
    AttentionGeometry,
    attention_geometry,
    attention_input_names,
    attention_module,
    attention_output_columns,
    attention_rows,
    mlp_module,
    mlp_rows,
    operator,
    query_heads,
    unit_rows,
)

_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class LayerConfigView:
    """A model config seen by one layer's module, with a few per-layer values overridden.

    Every other attribute (``_attn_implementation`` included) is read from the shared config,
    so later changes to the model's config still reach the layer.
    """

    def __init__(self, base: Any, **overrides: Any) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_base", "_overrides"):
            raise AttributeError(name)
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_base"), name, value)

    def __repr__(self) -> str:
        return f"LayerConfigView({self._overrides})"


def as_index(keep: Any, width: int, what: str) -> torch.Tensor:
    """``keep`` as a sorted, duplicate-free LongTensor of indices in ``[0, width)``.

    ``keep`` is either indices (an integer tensor, array or sequence) or a boolean mask of
    exactly ``width`` entries (``True`` = keep). Anything else (floats, a mask of another
    length, indices out of range) raises ``SurgeryIndexError`` rather than being truncated.
    """
    if isinstance(keep, (list, tuple, range)) and len(keep) == 0:
        return torch.zeros(0, dtype=torch.long)
    try:
        tensor = torch.as_tensor(keep, device="cpu")
    except (TypeError, ValueError, RuntimeError) as err:
        raise SurgeryIndexError(f"{what} to keep must be integer indices or a boolean mask, got "
                                f"{type(keep).__name__} ({err})") from None
    if tensor.dtype == torch.bool:
        if tensor.dim() != 1 or tensor.numel() != width:
            raise SurgeryIndexError(
                f"a boolean mask of the {what} to keep must have exactly {width} entries (one per unit), got shape "
                f"{tuple(tensor.shape)}"
            )
        return tensor.nonzero().reshape(-1)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype not in _INDEX_DTYPES:
        raise SurgeryIndexError(
            f"{what} to keep must be integer indices or a boolean mask, got dtype {tensor.dtype}: floats are not "
            "rounded; pass .long() indices or a bool mask"
        )
    index = torch.unique(tensor.reshape(-1).long(), sorted=True)
    if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= width):
        raise SurgeryIndexError(f"{what} to keep must lie in [0, {width}), got {index.tolist()[:8]}...")
    return index


def _replace_parameter(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(module, name)
    new = old.data.index_select(dim, index.to(old.device))
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


def keep_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the output features ``index`` of a Linear / Conv1D (weight rows, bias entries)."""
    transposed = isinstance(module, Conv1D)
    _replace_parameter(module, "weight", 1 if transposed else 0, index)
    if getattr(module, "bias", None) is not None:
        _replace_parameter(module, "bias", 0, index)
    if transposed:
        module.nf = int(index.numel())
    else:
        module.out_features = int(index.numel())


def keep_inputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the input features ``index`` of a Linear / Conv1D (weight columns)."""
    transposed = isinstance(module, Conv1D)
    _replace_parameter(module, "weight", 0 if transposed else 1, index)
    if transposed:
        if hasattr(module, "nx"):
            module.nx = int(index.numel())
        if index.numel() == 0:
            mark_empty_input(module)
    else:
        module.in_features = int(index.numel())


def shrink_mlp(layout: DecoderLayout, index: int, keep: Any) -> int:
    """Keep only the MLP neurons ``keep`` of layer ``index``; return how many were removed."""
    spec = layout.spec
    down = operator(layout, index, spec.mlp_out)
    width = down.in_features
    neurons = as_index(keep, width, f"MLP neurons of layer {index}")
    if neurons.numel() == width:
        return 0
    rows = mlp_rows(layout, neurons, width)
    for name in spec.mlp_in:
        keep_outputs(operator(layout, index, name).module, rows)
    keep_inputs(down.module, neurons)
    mlp = mlp_module(layout, index)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = int(neurons.numel())
    return width - int(neurons.numel())


def shrink_attention(layout: DecoderLayout, index: int, keep_groups: Any) -> int:
    """Keep only the key/value groups ``keep_groups`` of layer ``index`` (with their query heads).

    For multi-head attention a group is one head. Returns the number of query heads removed.
    """
    geometry = attention_geometry(layout, index)
    groups = as_index(keep_groups, geometry.kv_heads, f"KV groups of layer {index}")
    if groups.numel() == geometry.kv_heads:
        return 0
    attn = attention_module(layout, index)
    _shrink_projection_norms(attn, geometry, groups)
    for name, rows in attention_rows(layout, geometry, groups).items():
        keep_outputs(operator(layout, index, name).module, rows)
    keep_inputs(operator(layout, index, layout.spec.o).module, attention_output_columns(geometry, groups))
    heads = int(groups.numel()) * geometry.group
    kv_heads = int(groups.numel())
    _set_head_counts(attn, heads, kv_heads, geometry.head_dim)
    if heads == 0:
        o_name = layout.spec.o.rpartition(".")[2]
        inputs = tuple(name.rpartition(".")[2] for name in attention_input_names(layout))
        mark_headless(attn, inputs, o_name, geometry.head_dim)
    return geometry.heads - heads


def _shrink_projection_norms(attn: nn.Module, geometry: AttentionGeometry, groups: torch.Tensor) -> None:
    """Keep the entries of the kept heads in norms over a whole query or key projection.

    OLMo 2 and 3 normalise all query heads together (``q_norm`` is ``heads x head_dim`` wide) and
    all key heads together (``kv_heads x head_dim``); Cohere's per-head norms hold one row per head.
    Norms over one head's width (Qwen3, Gemma 3) are shared by every head and stay as they are.
    """
    d = geometry.head_dim
    query = query_heads(groups, geometry)
    for name, module in attn.named_children():
        weight = getattr(module, "weight", None)
        if "norm" not in name or not isinstance(weight, nn.Parameter):
            continue
        if weight.dim() == 1 and weight.shape[0] != d:
            by_width = {geometry.heads * d: unit_rows(query, d), geometry.kv_heads * d: unit_rows(groups, d)}
            rows = by_width.get(weight.shape[0])
        elif weight.dim() == 2 and weight.shape[1] == d:
            rows = {geometry.heads: query, geometry.kv_heads: groups}.get(weight.shape[0])
        else:
            continue
        if rows is None:
            raise UnsupportedArchitectureError(
                f"{type(attn).__name__}.{name} is {tuple(weight.shape)}, neither one head's width nor all query or "
                "key heads: removing heads would leave it mismatched; prune MLP neurons only (heads=False)")
        for param in ("weight", "bias"):
            if isinstance(getattr(module, param, None), nn.Parameter):
                _replace_parameter(module, param, 0, rows)


def _set_head_counts(attn: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Update the per-module head counts that a family's attention forward reads."""
    if isinstance(getattr(attn, "num_heads", None), int):
        attn.num_heads = heads  # OPT, GPT-2
    if isinstance(getattr(attn, "num_key_value_heads", None), int):
        attn.num_key_value_heads = kv_heads  # Phi-3
    if isinstance(getattr(attn, "split_size", None), int):
        attn.split_size = heads * head_dim  # GPT-2 splits its fused qkv output by this width
    config = getattr(attn, "config", None)
    if config is not None:
        base = config._base if isinstance(config, LayerConfigView) else config
        attn.config = LayerConfigView(base, num_attention_heads=heads, num_key_value_heads=kv_heads)
