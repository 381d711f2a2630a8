"""Rebuilding per-layer shapes recorded in ``config.json`` before a checkpoint's weights load.

``AutoPrunedModelForCausalLM`` builds the model from its config (on the meta device inside
``from_pretrained``), then this module shrinks every layer to the recorded sizes, keeping
the first units: the saved weights already hold only the kept ones, in order. Loading then
proceeds as transformers does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import StructureMismatchError
from ..walker.layout import DecoderLayout
from .geometry import layer_sizes
from .shrink import shrink_attention, shrink_mlp
from .structure import SIZE_KEYS

LOADER_ADVICE = (
    "Checkpoints whose layers were shrunk by hf_prune's structured pruning keep their per-layer sizes in "
    "config.json['pruning_config']['structure'] and load with hf_prune.AutoPrunedModelForCausalLM.from_pretrained"
    "(path); transformers' AutoModelForCausalLM builds every layer at the config's full size and cannot load them"
)


def recorded_structure(config: Any) -> dict[str, Any] | None:
    """The ``structure`` entry of a config's pruning record, if there is one."""
    record = getattr(config, "pruning_config", None)
    if not isinstance(record, dict):
        return None
    structure = record.get("structure")
    return structure if structure else None


def _sizes(structure: dict[str, Any], layers: int) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {}
    for key in SIZE_KEYS:
        values = structure.get(key)
        if (not isinstance(values, list) or len(values) != layers
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
            raise StructureMismatchError(
                f"pruning_config.structure.{key} must list {layers} non-negative integers (one per decoder layer), "
                f"got {values!r}. The record was edited or belongs to another model. {LOADER_ADVICE}"
            )
        sizes[key] = values
    return sizes


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Shrink a freshly built (dense) model's layers to the sizes in ``structure``."""
    layout = DecoderLayout(model)
    sizes = _sizes(structure, len(layout))
    for index in range(len(layout)):
        current = layer_sizes(layout, index)
        neurons, heads, kv_heads = (sizes[key][index] for key in SIZE_KEYS)
        group = current.attention_heads // current.kv_heads if current.kv_heads else 0
        if neurons > current.mlp_neurons or kv_heads > current.kv_heads or heads != kv_heads * group:
            raise StructureMismatchError(
                f"layer {index} of the pruning record has {neurons} MLP neurons, {heads} heads and {kv_heads} KV "
                f"heads, which the model built from this config ({current.mlp_neurons} neurons, "
                f"{current.attention_heads} heads, {current.kv_heads} KV heads) cannot hold. {LOADER_ADVICE}"
            )
        shrink_mlp(layout, index, torch.arange(neurons, device="cpu"))
        shrink_attention(layout, index, torch.arange(kv_heads, device="cpu"))


def rebuild_recorded_structure(model: nn.Module) -> bool:
    """Apply the structure recorded in ``model.config`` if any; True when it did."""
    structure = recorded_structure(model.config)
    if structure is None:
        return False
    apply_structure(model, structure)
    return True
