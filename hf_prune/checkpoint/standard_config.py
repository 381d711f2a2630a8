"""Structured checkpoints written as the model's own, smaller config: what every runtime loads.

When structured pruning left every decoder layer with the same sizes (the default of every
structured method), the saved ``config.json`` says so in the family's own fields
(``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads`` with ``head_dim``
written out, ``ffn_dim`` for OPT, ``n_inner`` for GPT-2...). Plain ``AutoModelForCausalLM``,
vLLM and llama.cpp's converter then build the smaller layers from the config alone. The
pruning record (``pruning_config``, with its per-layer ``structure``) stays beside it for
``AutoPrunedModelForCausalLM``. When layers differ, or a family cannot express a change in its
config (GPT-2, OPT and GPT-NeoX derive the head width from ``hidden_size / heads``, so removed
heads cannot be written there), the config keeps its dense sizes and only hf_prune's loader,
which reads the record, can rebuild the layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, PretrainedConfig

from ..errors import UnsupportedArchitectureError
from ..surgery.expert_neurons import EXPERT_SIZE_FIELDS, expert_size_field
from ..surgery.structure import EXPERT_KEY, SIZE_KEYS, model_shape

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class SizeFields:
    """The config keys one family reads its layer sizes from.

    ``heads``, ``kv_heads`` and ``head_dim`` are ``None`` for families whose attention derives
    the head width from ``hidden_size / num_attention_heads``: their head counts cannot change
    in the config without changing the head width.
    """

    mlp: str
    heads: str | None = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"
    head_dim: str | None = "head_dim"


_LLAMA_LIKE = SizeFields("intermediate_size")

#: model_type -> where its config keeps the layer sizes
SIZE_FIELDS: dict[str, SizeFields] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,  # Phi-3 reads config.head_dim when present
    "opt": SizeFields("ffn_dim", None, None, None),
    "gpt2": SizeFields("n_inner", None, None, None),
    "gpt_neox": SizeFields("intermediate_size", None, None, None),
}
#: config keys that may hold the MLP width of a family without an entry above, tried in this order; a
#: guess is only written when the model transformers builds from it has exactly the pruned shapes
MLP_SIZE_CANDIDATES = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")


def size_fields(model_type: str | None, keys: Iterable[str]) -> SizeFields | None:
    """Where a config of ``model_type`` holding ``keys`` keeps its layer sizes: the family's entry, else
    the first MLP width key it has (with Llama's head fields)."""
    known = SIZE_FIELDS.get(model_type)  # type: ignore[arg-type]
    if known is not None:
        return known
    present = set(keys)
    return next((SizeFields(name) for name in MLP_SIZE_CANDIDATES if name in present), None)


@dataclass
class StandardExport:
    """What the saved config says about the layer sizes.

    ``fields`` are the config keys (and values) that describe the pruned model, written over
    the dense ones; empty when the config already matches. ``standard`` is False when the
    layers cannot be described by the config (``reason`` says why): the config then keeps
    its sizes and the record alone describes the layers.
    """

    standard: bool
    fields: dict[str, int] = field(default_factory=dict)
    reason: str | None = None


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def standard_export(model: nn.Module) -> StandardExport:
    """The config fields that describe ``model``'s current layer sizes, when one set of sizes does.

    The fields are checked the way a runtime would use them: the family's config class must
    accept them and the model it builds from them must have exactly ``model``'s parameter shapes.
    A config that already builds those shapes (nothing shrunk, decoder layers or routed experts
    removed with the config updated) is standard as it is, whatever the family.
    """
    config = model.config
    if _config_builds(model):  # the config already describes every layer (also MoE models after expert pruning)
        return StandardExport(True)
    shape = model_shape(model)
    if shape.layers is None and shape.expert_neurons is not None:
        return _expert_export(model, shape.expert_neurons)
    fields = size_fields(getattr(config, "model_type", None), config.to_dict())
    if fields is None:
        return StandardExport(False, reason=f"{type(config).__name__} has none of {', '.join(MLP_SIZE_CANDIDATES)}: "
                                            "hf_prune does not know where it keeps the MLP width")
    shape = shape.lists()
    if not shape["mlp_neurons"]:
        return StandardExport(True)
    sizes = {key: _uniform(shape[key]) for key in SIZE_KEYS}
    different = [key for key, value in sizes.items() if value is None]
    if different:
        return StandardExport(False, reason=f"the layers keep different numbers of {', '.join(different)}")
    neurons, heads, kv_heads = (sizes[key] for key in SIZE_KEYS)
    if neurons == 0 or heads == 0:
        return StandardExport(False, reason="the layers keep no MLP neurons or no attention heads")
    out: dict[str, int] = {}
    if _config_int(config, fields.mlp, default=None) != neurons:
        out[fields.mlp] = neurons
    dense_heads, dense_kv = _dense_head_counts(model)
    if (heads, kv_heads) != (dense_heads, dense_kv):
        if fields.heads is None:
            return StandardExport(False, reason=(
                f"{config.model_type} derives the head width from hidden_size / num_attention_heads, so removed "
                "attention heads cannot be written in its config"))
        out[fields.heads] = heads
        if fields.kv_heads:
            out[fields.kv_heads] = kv_heads
        if fields.head_dim:
            out[fields.head_dim] = _head_dim(model)
    if not out:
        return StandardExport(True)
    problem = _mismatch_when_built(model, out)
    if problem:
        return StandardExport(False, reason=problem)
    return StandardExport(True, out)


def _expert_export(model: nn.Module, sizes: list[int | None]) -> StandardExport:
    """The config field of a mixture of experts whose routed experts keep ``sizes`` neurons per layer."""
    kept = _uniform([size for size in sizes if size is not None])
    if kept is None:
        return StandardExport(False, reason=f"the MoE layers keep different numbers of neurons per expert {sizes}")
    if kept == 0:
        return StandardExport(False, reason="the routed experts keep no neuron")
    dense = _dense_expert_width(model)
    try:
        name = expert_size_field(model.config, dense)
    except UnsupportedArchitectureError as err:
        # pruned again after loading a standard checkpoint: the field holds the width of the earlier run
        found = _expert_field_that_builds(model, kept)
        if found is None:
            return StandardExport(False, reason=str(err))
        name = found
    out = {name: kept}
    problem = _mismatch_when_built(model, out)
    if problem:
        return StandardExport(False, reason=problem)
    return StandardExport(True, out)


def _dense_head_counts(model: nn.Module) -> tuple[int, int]:
    """``(query heads, KV heads)`` per layer before structured pruning: measured into the record when it
    has them (Falcon's config names no KV head count for its multi-query layout), else the config's."""
    structure = (getattr(model.config, "pruning_config", None) or {}).get("structure") or {}
    dense = structure.get("dense") or {}
    heads, kv_heads = _uniform(dense.get("attention_heads") or []), _uniform(dense.get("kv_heads") or [])
    if heads is not None and kv_heads is not None:
        return heads, kv_heads
    heads = int(model.config.num_attention_heads)
    return heads, int(getattr(model.config, "num_key_value_heads", None) or heads)


def _expert_field_that_builds(model: nn.Module, kept: int) -> str | None:
    """The expert size field that, set to ``kept``, makes transformers build ``model``'s shapes (else ``None``)."""
    for name in EXPERT_SIZE_FIELDS:
        if isinstance(getattr(model.config, name, None), int) and _mismatch_when_built(model, {name: kept}) is None:
            return name
    return None


def _dense_expert_width(model: nn.Module) -> int:
    """The routed experts' width before structured pruning (from the record, else the current width)."""
    structure = (getattr(model.config, "pruning_config", None) or {}).get("structure") or {}
    dense = [size for size in (structure.get("dense") or {}).get(EXPERT_KEY) or [] if size is not None]
    if dense:
        return int(dense[0])
    return int(next(size for size in model_shape(model).expert_neurons or [] if size is not None))


def config_with(config: PretrainedConfig, fields: dict[str, Any]) -> PretrainedConfig:
    """A copy of ``config`` with ``fields`` set, validated by its class as when loading ``config.json``."""
    return type(config).from_dict({**config.to_dict(), **fields})


def _config_builds(model: nn.Module) -> bool:
    """Whether the model transformers builds from ``model.config`` as it stands has ``model``'s parameter shapes."""
    try:
        return _mismatch_when_built(model, {}) is None
    except Exception:  # noqa: BLE001 - a config that cannot be built as is: fall back to the size fields
        return False


def _mismatch_when_built(model: nn.Module, fields: dict[str, Any]) -> str | None:
    """Why the model transformers builds from the config with ``fields`` would not take ``model``'s weights."""
    try:
        config = config_with(model.config, fields)
    except (ValueError, TypeError, AttributeError, StrictDataclassError) as err:  # the class refused them
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return f"{type(model.config).__name__} refuses {fields}: {message.strip()}"
    base = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if base is None:
        return f"transformers has no causal-LM class for {type(config).__name__}"
    with torch.device("meta"):
        built = base(config)
    expected = {name: tuple(p.shape) for name, p in built.named_parameters()}
    actual = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if expected != actual:
        differing = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        return (f"the model transformers builds from {fields} differs from the pruned one in "
                f"{', '.join(differing[:3])}{'...' if len(differing) > 3 else ''}")
    return None


def _config_int(config: Any, key: str, default: int | None) -> int | None:
    value = getattr(config, key, default)
    if key == "n_inner" and value is None:  # GPT-2: None means 4 * n_embd
        value = 4 * int(config.n_embd)
    return None if value is None else int(value)


def _head_dim(model: nn.Module) -> int:
    from ..surgery.geometry import attention_geometry
    from ..walker.layout import DecoderLayout

    return attention_geometry(DecoderLayout(model), 0).head_dim


def write_standard_config(directory: str | os.PathLike, export: StandardExport) -> None:
    """Write ``export.fields`` into ``directory/config.json`` (a no-op when there are none)."""
    if not export.standard or not export.fields:
        return
    path = Path(directory) / CONFIG_NAME
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(export.fields)
    partial = path.with_name(f".{CONFIG_NAME}.partial")
    partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)


def saved_config_is_standard(config: dict[str, Any]) -> bool:
    """Whether a saved ``config.json`` (as a dict) describes its pruned layers in its own fields.

    True for checkpoints that were not shrunk at all, and for those whose recorded per-layer
    sizes are uniform and equal to the config's fields; False when only the record does.
    """
    record = config.get("pruning_config") or {}
    structure = record.get("structure") if isinstance(record, dict) else None
    if not structure:
        return True
    experts = structure.get(EXPERT_KEY)
    if isinstance(experts, list) and all(structure.get(key) is None for key in SIZE_KEYS):
        kept = _uniform([size for size in experts if size is not None])
        dense = _uniform([size for size in (structure.get("dense") or {}).get(EXPERT_KEY) or [] if size is not None])
        if kept is None or dense is None:
            return False
        if kept == dense:
            return True
        return any(config.get(name) == kept for name in ("moe_intermediate_size", "intermediate_size"))
    fields = size_fields(config.get("model_type"), config)
    if fields is None:
        return False
    sizes = {key: _uniform(structure.get(key) or []) for key in SIZE_KEYS}
    if any(value is None for value in sizes.values()):
        return False
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    if layers is not None and len(structure.get("mlp_neurons") or []) != int(layers):
        return False
    mlp = config.get(fields.mlp)
    if fields.mlp == "n_inner" and mlp is None:
        mlp = 4 * int(config.get("n_embd", 0))
    dense = structure.get("dense") or {}
    if all(sizes[key] == _uniform(dense.get(key) or []) for key in ("attention_heads", "kv_heads")):
        return mlp == sizes["mlp_neurons"]  # heads as the dense config has them (Falcon's multi-query: 1 KV head)
    heads = config.get("num_attention_heads", config.get("n_head"))
    kv_heads = config.get("num_key_value_heads") or heads
    return mlp == sizes["mlp_neurons"] and heads == sizes["attention_heads"] and kv_heads == sizes["kv_heads"]
