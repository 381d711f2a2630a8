"""Finding a causal LM's decoder layers from the model itself.

transformers marks the block it must never split across devices in ``_no_split_modules``;
in a decoder-only model that is the decoder layer. The layers are the ``nn.ModuleList``
whose items are such classes (the largest one when several qualify, e.g. a vision tower
beside the text decoder). Models that do not say fall back to the paths most families use.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError

#: Where decoder layers usually live, tried when ``_no_split_modules`` names none of them.
USUAL_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "backbone.layers",
    "language_model.model.layers",
)


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path`` under ``root``, or ``None``."""
    node: object = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


def module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every non-empty ``ModuleList`` of ``model`` with its dotted path."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) and name]


def describe_module_lists(model: nn.Module, most: int = 6) -> str:
    """``path (n x ItemClass)`` for the largest module lists, for error messages."""
    found = sorted(module_lists(model), key=lambda item: -len(item[1]))[:most]
    if not found:
        return "no nn.ModuleList at all"
    return ", ".join(f"{name} ({len(items)} x {type(items[0]).__name__})" for name, items in found)


def _no_split_names(model: nn.Module) -> set[str]:
    names = getattr(model, "_no_split_modules", None) or []
    return {name for name in names if isinstance(name, str)}


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)``: the decoder layers of a causal LM.

    Raises ``UnsupportedArchitectureError`` saying which module lists the model has when
    none looks like the decoder layers.
    """
    no_split = _no_split_names(model)
    candidates = [(name, items) for name, items in module_lists(model)
                  if all(type(item).__name__ in no_split for item in items)]
    if candidates:
        return max(candidates, key=lambda item: len(item[1]))
    for path in USUAL_LAYER_PATHS:
        layers = get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return path, layers
    raise UnsupportedArchitectureError(
        f"cannot find the decoder layers of {type(model).__name__} "
        f"(model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r}): none of its module lists "
        f"holds the classes named by _no_split_modules ({sorted(no_split) or 'none'}) and none sits at the usual "
        f"paths ({', '.join(USUAL_LAYER_PATHS[:4])}...). It has: {describe_module_lists(model)}. hf_prune prunes "
        "decoder-only causal LMs loaded with AutoModelForCausalLM; for another layout open an issue with the model id"
    )
