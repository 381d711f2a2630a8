"""Removing whole routed experts from mixture-of-experts blocks: expert weights, router rows, config.

A transformers 5 MoE block keeps its routed experts stacked along dimension 0 of the
experts module's 3-D parameters (``gate_up_proj``/``up_proj``, ``down_proj``) and of their
biases (gpt-oss), and its router scores them with one row per expert: the router's
``weight`` ``[E, hidden]``, its ``bias`` (gpt-oss) and buffers such as DeepSeek-V3's
``e_score_correction_bias`` ``[E]``. :func:`remove_experts` keeps the chosen experts in all
of them, in order, and renumbers the modules' expert counts; :func:`set_expert_count` then
writes the kept count into the config field the family reads it from (``num_local_experts``,
``num_experts`` or ``n_routed_experts``). With the same count in every MoE layer the result
is an ordinary, smaller checkpoint of its family: plain transformers builds it from the
config alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..walker.experts import ExpertBank
from ..walker.layout import DecoderLayout

#: config fields holding the routed-expert count, in the order they are looked for
CONFIG_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts")
#: module attributes holding the routed-expert count (experts module, router, MoE block, causal LM)
COUNT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts")


def moe_block(layout: DecoderLayout, index: int, bank: ExpertBank) -> nn.Module:
    """The module that holds ``bank`` and its router (``mlp``, ``block_sparse_moe``, ``feed_forward``)."""
    parent = bank.path.rpartition(".")[0]
    return layout.submodule(index, parent) if parent else layout.layers[index]


def find_router(layout: DecoderLayout, index: int, bank: ExpertBank) -> tuple[str, nn.Module]:
    """``(name, module)`` of the router beside ``bank``: the one child of its MoE block (other than
    the experts) with a 2-D ``weight`` of one row per expert over the hidden size."""
    block = moe_block(layout, index, bank)
    experts, hidden = bank.num_experts, layout.hidden_size
    found = [(name, child) for name, child in block.named_children()
             if child is not bank.module and isinstance(getattr(child, "weight", None), torch.Tensor)
             and tuple(child.weight.shape) == (experts, hidden)]
    if len(found) != 1:
        names = ", ".join(f"{n} ({type(c).__name__})" for n, c in block.named_children())
        raise UnsupportedArchitectureError(
            f"{layout.layer_prefix(index)}.{bank.path} ({bank.class_name}): expected one router beside it with a "
            f"[{experts}, {hidden}] weight, found {len(found)} among {names or 'no modules'}; expert pruning cannot "
            "remove its router rows. Open an issue with the model id"
        )
    return found[0]


def _keep_rows(module: nn.Module, keep: torch.Tensor, count: int) -> list[str]:
    """Keep rows ``keep`` of every own parameter and buffer of ``module`` whose first dimension is ``count``."""
    changed = []
    for name, param in list(module.named_parameters(recurse=False)):
        if param.dim() >= 1 and param.shape[0] == count:
            index = keep.to(param.device)
            setattr(module, name, nn.Parameter(param.data.index_select(0, index).clone(),
                                               requires_grad=param.requires_grad))
            changed.append(name)
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer is not None and buffer.dim() >= 1 and buffer.shape[0] == count:
            module._buffers[name] = buffer.index_select(0, keep.to(buffer.device)).clone()
            changed.append(name)
    return changed


def _renumber(modules: Iterable[nn.Module], old: int, new: int) -> None:
    for module in modules:
        for name in COUNT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == old:
                setattr(module, name, new)
        if isinstance(module, nn.Linear) and module.out_features == old:
            module.out_features = new


def remove_experts(layout: DecoderLayout, index: int, bank: ExpertBank, keep: Iterable[int]) -> list[int]:
    """Keep only the experts ``keep`` of ``bank`` (layer ``index``), in order: their slices of every
    stacked parameter and bias, and their router rows. Returns the removed experts (old indices)."""
    old = bank.num_experts
    kept = sorted(set(int(e) for e in keep))
    if not kept or kept[0] < 0 or kept[-1] >= old:
        raise IndexError(f"experts to keep must be a non-empty subset of [0, {old}), got {kept}")
    removed = [e for e in range(old) if e not in set(kept)]
    if not removed:
        return []
    _, router = find_router(layout, index, bank)
    rows = torch.tensor(kept, dtype=torch.long)
    _keep_rows(bank.module, rows, old)
    if "weight" not in _keep_rows(router, rows, old):
        raise UnsupportedArchitectureError(f"the router of {layout.layer_prefix(index)}.{bank.path} kept its weight")
    _renumber((bank.module, router, moe_block(layout, index, bank)), old, len(kept))
    return removed


def field_holding(config: Any, fields: tuple[str, ...], value: int, what: str) -> str:
    """The first of ``fields`` whose value in ``config`` is ``value`` (``what`` it counts, for the error)."""
    values = config.to_dict()
    for name in fields:
        if values.get(name) == value:
            return name
    raise UnsupportedArchitectureError(
        f"{type(config).__name__} holds none of {', '.join(fields)} equal to the model's {value} {what}, so a "
        "smaller value cannot be written into its config"
    )


def expert_count_field(config: Any, count: int) -> str:
    """The config field that holds the routed-expert count ``count``."""
    return field_holding(config, CONFIG_FIELDS, count, "routed experts")


def set_expert_count(model: nn.Module, old: int, new: int) -> str:
    """Write ``new`` routed experts into the config (and every module that kept ``old`` as its count);
    returns the config field written."""
    config = model.config
    name = expert_count_field(config, old)
    setattr(config, name, new)
    _renumber(model.modules(), old, new)
    return name
