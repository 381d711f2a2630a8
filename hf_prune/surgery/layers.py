"""Removing whole decoder layers: the module list, the layers' cache indices and the config.

After :func:`remove_layers` the model is an ordinary, shallower model of its family:
``num_hidden_layers`` counts the kept layers, per-layer config lists (``layer_types``, which
sets sliding-window or full attention per layer, and any other list with one entry per
layer) keep the kept layers' entries, index lists and thresholds that name layers
(``mlp_only_layers``, ``max_window_layers``, ``first_k_dense_replace``) are renumbered, and
each kept layer's ``layer_idx`` (its slot in the key/value cache) is its new position. The
saved config therefore describes the model by itself, and any runtime that reads it builds
the same layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..errors import UnsupportedArchitectureError
from ..walker.layout import DecoderLayout

#: config attributes listing layer indices (renumbered; removed layers drop out)
INDEX_LISTS = ("mlp_only_layers",)
#: config attributes that count the first layers of one kind (count the kept ones among them)
LEADING_COUNTS = ("max_window_layers", "first_k_dense_replace")
#: module attributes holding a layer's position (its key/value cache slot)
POSITION_ATTRIBUTES = ("layer_idx", "layer_id")
#: config lists that are not per-layer even when their length equals the layer count
NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "begin_suppress_tokens", "suppress_tokens",
                           "eos_token_id", "bos_token_id", "pad_token_id", "forced_decoder_ids"})


def _check_removable(model: nn.Module, layers: int) -> None:
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedArchitectureError(
            "this GPT-2 config scales each layer's attention by 1 / (layer index + 1) "
            "(scale_attn_by_inverse_layer_idx=True), so removing layers would change the kept ones; depth pruning "
            "supports models without that option"
        )
    step = getattr(config, "decoder_sparse_step", 1)
    if isinstance(step, int) and step > 1:
        raise UnsupportedArchitectureError(
            f"decoder_sparse_step={step} makes every {step}th layer a mixture of experts by its index, which "
            "removing layers would shift; depth pruning supports configs with decoder_sparse_step=1"
        )
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        raise UnsupportedArchitectureError(
            "the model is spread over several devices or offloaded by accelerate (hf_device_map), whose placement "
            "names each layer by its index; load it without device_map to remove decoder layers"
        )
    if layers < 1:
        raise ValueError("depth pruning must keep at least one decoder layer")


def _new_config_values(config: Any, keep: list[int], old: int) -> dict[str, Any]:
    """The config attributes that change when only the layers ``keep`` (of ``old``) remain."""
    position = {index: new for new, index in enumerate(keep)}
    values: dict[str, Any] = {}
    for name, value in vars(config).items():
        if name.startswith("_") or name in NOT_PER_LAYER:
            continue
        if name in INDEX_LISTS and isinstance(value, (list, tuple)):
            values[name] = [position[i] for i in value if i in position]
        elif name in LEADING_COUNTS and isinstance(value, int) and not isinstance(value, bool):
            values[name] = sum(1 for i in keep if i < value)
        elif isinstance(value, (list, tuple)) and len(value) == old:
            values[name] = [value[i] for i in keep]
    return values


def remove_layers(layout: DecoderLayout, keep: Iterable[int]) -> list[int]:
    """Keep only the decoder layers ``keep`` (indices into the current layers), in model order.

    Updates the module list, each kept layer's cache index and the model's config; returns
    the kept indices, sorted. Raises ``UnsupportedArchitectureError`` for models whose layers
    depend on their index in ways a config cannot express.
    """
    model = layout.model
    old = len(layout)
    kept = sorted(set(int(i) for i in keep))
    if any(i < 0 or i >= old for i in kept):
        raise IndexError(f"decoder layers to keep must lie in [0, {old}), got {kept}")
    if len(kept) == old:
        return kept
    _check_removable(model, len(kept))
    config = model.config
    updates = _new_config_values(config, kept, old)
    modules = [layout.layers[i] for i in kept]
    for index in reversed(range(old)):
        del layout.layers[index]
    layout.layers.extend(modules)
    for new, module in enumerate(modules):
        for sub in module.modules():
            for name in POSITION_ATTRIBUTES:
                if isinstance(getattr(sub, name, None), int):
                    setattr(sub, name, new)
    for name, value in updates.items():
        setattr(config, name, value)
    config.num_hidden_layers = len(kept)
    return kept
