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
from .expert_neurons import apply_expert_sizes
from .geometry import layer_sizes
from .shrink import shrink_attention, shrink_mlp
from .structure import EXPERT_KEY, SIZE_KEYS

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


def _size_lists(entry: Any, key: str) -> dict[str, list[int]] | None:
    """The per-layer size lists of ``entry``, or ``None`` when all are ``null`` (a model whose MLP and
    attention the walker cannot tell apart: mixtures of experts, hybrid layers)."""
    if not isinstance(entry, dict):
        raise _refuse(key, entry, f"a JSON object with the per-layer lists {list(SIZE_KEYS)}")
    if all(entry.get(name, 0) is None for name in SIZE_KEYS):
        return None
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


def _expert_list(entry: Any, key: str) -> list[int | None] | None:
    """The ``expert_neurons`` list of ``entry`` (one non-negative integer or ``null`` per layer), if any."""
    if not isinstance(entry, dict) or entry.get(EXPERT_KEY) is None:
        return None
    values = entry[EXPERT_KEY]
    if (not isinstance(values, list) or len(values) > MAX_LAYERS
            or not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_SIZE)
                       for v in values)):
        raise _refuse(f"{key}.{EXPERT_KEY}", values, "a list of non-negative integers (neurons kept in each routed "
                      "expert) or nulls (layers without experts), one per decoder layer")
    return values


def _layer_count(sizes: dict[str, list[int]] | None) -> int | None:
    return None if sizes is None else len(sizes[SIZE_KEYS[0]])


def check_structure_entry(structure: Any) -> dict[str, list[int]] | None:
    """Validate a record's ``structure`` entry (types, ranges, one entry per layer, ``kept_layers``
    naming distinct dense layers in order); return the kept sizes (``None`` when not recorded per layer).

    Raises ``StructureMismatchError`` for anything else, without reading the model.
    """
    sizes = _size_lists(structure, "")
    dense = _size_lists(structure.get("dense"), ".dense")
    kept, dense_layers = _layer_count(sizes), _layer_count(dense)
    experts, dense_experts = _expert_list(structure, ""), _expert_list(structure.get("dense"), ".dense")
    if (experts is None) != (dense_experts is None):
        raise _refuse(f".{EXPERT_KEY}", structure.get(EXPERT_KEY), "given with its dense counterpart "
                      f"(dense.{EXPERT_KEY}) or not at all")
    if experts is not None:
        if kept is not None and len(experts) != kept:
            raise _refuse(f".{EXPERT_KEY}", experts, "one entry per decoder layer, as the other lists")
        kept = len(experts) if kept is None else kept
        dense_layers = len(dense_experts) if dense_layers is None else dense_layers
        if structure.get("kept_layers") is None and len(experts) != len(dense_experts):
            raise _refuse(f".dense.{EXPERT_KEY}", dense_experts, "as long as the kept list (one entry per layer)")
        if structure.get("kept_layers") is None and any(
                (k is None) != (d is None) or (k is not None and k > d) for k, d in zip(experts, dense_experts)):
            raise _refuse(f".{EXPERT_KEY}", experts, f"no larger than dense.{EXPERT_KEY} {dense_experts}, with "
                          "experts in the same layers")
    kept_layers = structure.get("kept_layers")
    if kept_layers is not None:
        if (not isinstance(kept_layers, list) or len(kept_layers) > MAX_LAYERS
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in kept_layers)
                or any(b <= a for a, b in zip(kept_layers, kept_layers[1:]))
                or (dense_layers is not None and kept_layers and kept_layers[-1] >= dense_layers)
                or (kept is not None and len(kept_layers) != kept)):
            raise _refuse(".kept_layers", kept_layers, "the increasing indices of the dense layers that remain, one "
                          "per remaining layer")
    elif kept is not None and dense_layers is not None and kept != dense_layers:
        raise _refuse(".dense", structure.get("dense"), "as long as the kept sizes (one entry per layer) unless "
                      "kept_layers says which layers remain")
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


def _sizes(structure: Any, layers: int) -> dict[str, list[int]] | None:
    sizes = check_structure_entry(structure)
    for key, values in (sizes or {}).items():
        if len(values) != layers:
            raise _refuse(f".{key}", values, f"a list of {layers} non-negative integers (one per decoder layer)")
    return sizes


def apply_structure(model: nn.Module, structure: Any) -> None:
    """Shrink a freshly built (dense) model's layers to the sizes in ``structure``."""
    layout = DecoderLayout(model)
    sizes = _sizes(structure, len(layout))
    experts = _expert_list(structure, "")
    if experts is not None:
        if len(experts) != len(layout):
            raise _refuse(f".{EXPERT_KEY}", experts, f"a list of {len(layout)} entries (one per decoder layer)")
        present = [bool(layout.expert_banks(i)) for i in range(len(layout))]
        if [size is not None for size in experts] != present:
            raise StructureMismatchError(
                f"the pruning record lists routed-expert neurons {experts} per layer, but the model built from this "
                f"config has experts in layers {[i for i, p in enumerate(present) if p]}. {LOADER_ADVICE}")
        try:
            apply_expert_sizes(layout, experts)
        except ValueError as err:
            raise StructureMismatchError(f"{err}. {LOADER_ADVICE}") from None
    if sizes is None:  # no per-layer sizes recorded (layers removed whole, widths unchanged; mixtures of experts)
        return
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
