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

from ..config import short_repr
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


#: Most decoder layers a structure entry may list (far above any real model).
MAX_LAYERS = 100_000
#: Largest per-layer size or parameter count accepted (int64, as torch stores sizes).
_MAX_SIZE = 2**63 - 1


def _refuse(key: str, values: Any, expected: str) -> StructureMismatchError:
    return StructureMismatchError(
        f"pruning_config.structure{key} must be {expected}, got {short_repr(values)}. The record was edited or "
        f"belongs to another model. {LOADER_ADVICE}"
    )


def _size_lists(entry: Any, key: str) -> dict[str, list[int]]:
    if not isinstance(entry, dict):
        raise _refuse(key, entry, f"a JSON object with the per-layer lists {list(SIZE_KEYS)}")
    sizes: dict[str, list[int]] = {}
    lengths = set()
    for name in SIZE_KEYS:
        values = entry.get(name)
        if (not isinstance(values, list) or len(values) > MAX_LAYERS
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_SIZE for v in values)):
            raise _refuse(f"{key}.{name}", values, "a list of non-negative integers, one per decoder layer")
        sizes[name] = values
        lengths.add(len(values))
    if len(lengths) > 1:
        raise _refuse(key, {k: len(v) for k, v in sizes.items()}, "lists of the same length (one entry per layer)")
    return sizes


def check_structure_entry(structure: Any) -> dict[str, list[int]]:
    """Validate a record's ``structure`` entry (types, ranges, one entry per layer); return the kept sizes.

    Raises ``StructureMismatchError`` for anything else, without reading the model.
    """
    sizes = _size_lists(structure, "")
    dense = _size_lists(structure.get("dense"), ".dense")
    kept_layers = structure.get("kept_layers")
    if kept_layers is None:  # no layer was removed: one dense entry per kept layer
        if any(len(dense[k]) != len(sizes[k]) for k in SIZE_KEYS):
            raise _refuse(".dense", structure.get("dense"), "as long as the kept sizes (one entry per layer)")
    else:  # depth pruning: the dense index of each kept layer, all distinct and inside the dense model
        dense_layers = len(dense[SIZE_KEYS[0]])
        if (not isinstance(kept_layers, list) or len(kept_layers) != len(sizes[SIZE_KEYS[0]])
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < dense_layers
                           for i in kept_layers)
                or len(set(kept_layers)) != len(kept_layers)):
            raise _refuse(".kept_layers", kept_layers,
                          "the distinct dense indices of the kept layers (one per kept layer)")
    for name in ("parameters_before", "parameters_after"):
        value = structure.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_SIZE:
            raise _refuse(f".{name}", value, "a non-negative integer")
    return sizes


def recorded_structure(config: Any) -> dict[str, Any] | None:
    """The ``structure`` entry of a config's pruning record, if there is one."""
    record = getattr(config, "pruning_config", None)
    if not isinstance(record, dict):
        return None
    structure = record.get("structure")
    return structure if structure else None


def _sizes(structure: Any, layers: int) -> dict[str, list[int]]:
    sizes = check_structure_entry(structure)
    for key, values in sizes.items():
        if len(values) != layers:
            raise _refuse(f".{key}", values, f"a list of {layers} non-negative integers (one per decoder layer)")
    return sizes


def apply_structure(model: nn.Module, structure: Any) -> None:
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
