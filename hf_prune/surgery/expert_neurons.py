"""Removing intermediate neurons inside routed experts (and the shared experts the config ties to them).

Neuron ``j`` of expert ``e`` is row(s) ``bank.neuron_rows(j)`` of the expert's ``(out, in)``
gate/up slice (with its bias entries, gpt-oss) and column ``j`` of its down slice. Every
expert keeps the same number of neurons, chosen per expert, so the stacked parameters stay
rectangular (``[E, 2k, H]`` / ``[E, H, k]`` or the transposed layouts). Routers are untouched:
each expert keeps its identity and its router row.

Some families build their shared expert from the routed experts' size field
(``TIED_SHARED_EXPERTS``: DeepSeek-V3's ``shared_experts`` is ``n_shared_experts`` times
``moe_intermediate_size`` wide, Llama 4's ``shared_expert`` reads ``intermediate_size``); to
write the smaller size into the config, those shared experts keep ``factor x k`` neurons too.
Other shared experts (Qwen3-Next, GraniteMoeHybrid) have their own config field and are left
as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..walker.experts import ExpertBank
from ..walker.layout import DecoderLayout
from .experts import field_holding
from .shrink import keep_inputs, keep_outputs

#: model_type -> (name of the shared-expert MLP inside the MoE block, its width in routed-expert widths)
TIED_SHARED_EXPERTS: dict[str, tuple[str, Callable[[Any], int]]] = {
    "deepseek_v3": ("shared_experts", lambda config: int(config.n_shared_experts)),
    "llama4_text": ("shared_expert", lambda config: 1),
}

#: config fields that may hold the routed experts' intermediate size, in the order they are looked for
EXPERT_SIZE_FIELDS = ("moe_intermediate_size", "intermediate_size")

#: gated MLP projection names of a shared expert: (inputs, output)
_SHARED_MLP_NAMES = (("gate_proj", "up_proj"), "down_proj")


@dataclass(frozen=True)
class SharedExpert:
    """A dense MLP inside a MoE block whose width the config ties to the routed experts'."""

    path: str  # layer-relative
    module: nn.Module
    factor: int

    @property
    def inputs(self) -> list[nn.Linear]:
        return [getattr(self.module, name) for name in _SHARED_MLP_NAMES[0]]

    @property
    def output(self) -> nn.Linear:
        return getattr(self.module, _SHARED_MLP_NAMES[1])

    @property
    def width(self) -> int:
        return int(self.output.weight.shape[1])


def tied_shared_expert(layout: DecoderLayout, index: int, bank: ExpertBank) -> SharedExpert | None:
    """The shared expert beside ``bank`` whose size the config ties to the routed experts', if any."""
    entry = TIED_SHARED_EXPERTS.get(layout.model_type or "")
    if entry is None:
        return None
    name, factor = entry
    parent = bank.path.rpartition(".")[0]
    path = f"{parent}.{name}" if parent else name
    try:
        module = layout.submodule(index, path)
    except KeyError:
        return None
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in (*_SHARED_MLP_NAMES[0], _SHARED_MLP_NAMES[1])):
        raise UnsupportedArchitectureError(
            f"{layout.layer_prefix(index)}.{path} ({type(module).__name__}) is not a gate/up/down MLP; removing "
            "expert neurons cannot shrink it with the routed experts. Use expert pruning ('expert-pruning') instead"
        )
    return SharedExpert(path, module, factor(layout.model.config))


def _select(parameter: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
    """``parameter`` keeping, for every expert ``e`` (dimension 0), entries ``index[e]`` along ``dim``."""
    data = parameter.data
    shape = [1] * data.dim()
    shape[0], shape[dim] = index.shape[0], index.shape[1]
    expanded = list(data.shape)
    expanded[dim] = index.shape[1]
    gather = index.to(data.device).view(shape).expand(expanded)
    return nn.Parameter(torch.gather(data, dim, gather).contiguous(), requires_grad=parameter.requires_grad)


def shrink_expert_neurons(bank: ExpertBank, keep: torch.Tensor) -> int:
    """Keep neurons ``keep[e]`` (``[experts, k]`` sorted indices) of every expert of ``bank``; return
    the neurons removed per expert. Every expert keeps ``k``: the stacked weights stay rectangular."""
    width = bank.intermediate_size
    if keep.dim() != 2 or keep.shape[0] != bank.num_experts:
        raise ValueError(f"expected [{bank.num_experts}, kept] neuron indices, got shape {tuple(keep.shape)}")
    keep = keep.long().cpu()
    if keep.shape[1] == width:
        return 0
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= width):
        raise IndexError(f"expert neurons to keep must lie in [0, {width})")
    rows = torch.stack([bank.neuron_rows(k) for k in keep]) if keep.shape[1] else keep
    module = bank.module
    transposed = bank.layout.transposed
    for projection in bank.projections:
        parameter = getattr(module, projection.parameter)
        if projection.role == "down":  # (out=H, in=I): columns, stored (I, H) when transposed
            setattr(module, projection.parameter, _select(parameter, 1 if transposed else 2, keep))
            continue
        setattr(module, projection.parameter, _select(parameter, 2 if transposed else 1, rows))
        if projection.bias is not None:
            setattr(module, projection.bias, _select(getattr(module, projection.bias), 1, rows))
    kept = int(keep.shape[1])
    for name in ("intermediate_dim", "intermediate_size", "expert_dim"):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, kept)
    return width - kept


def shrink_shared_expert(shared: SharedExpert, neurons: torch.Tensor) -> int:
    """Keep neurons ``neurons`` (sorted indices) of a tied shared expert; return how many were removed."""
    width = shared.width
    neurons = neurons.long().cpu()
    if neurons.numel() == width:
        return 0
    for linear in shared.inputs:
        keep_outputs(linear, neurons)
    keep_inputs(shared.output, neurons)
    if isinstance(getattr(shared.module, "intermediate_size", None), int):
        shared.module.intermediate_size = int(neurons.numel())
    return width - int(neurons.numel())


def expert_neuron_sizes(layout: DecoderLayout) -> list[int | None] | None:
    """Neurons per routed expert in each decoder layer (``None`` for a layer without experts), or
    ``None`` for a model without readable expert banks. Raises when one layer's banks differ."""
    sizes: list[int | None] = []
    for index in range(len(layout)):
        widths = {bank.intermediate_size for bank in layout.expert_banks(index)}
        if len(widths) > 1:
            raise UnsupportedArchitectureError(
                f"layer {index} holds expert banks of different widths {sorted(widths)}; hf_prune records one "
                "expert width per layer")
        sizes.append(widths.pop() if widths else None)
    return sizes if any(size is not None for size in sizes) else None


def apply_expert_sizes(layout: DecoderLayout, sizes: list[int | None]) -> None:
    """Shrink a freshly built model's experts (and tied shared experts) to the recorded ``sizes``,
    keeping the first neurons: the saved weights hold only the kept ones, in order."""
    for index, size in enumerate(sizes):
        banks = layout.expert_banks(index)
        if size is None or not banks:
            continue
        for bank in banks:
            if size > bank.intermediate_size:
                raise ValueError(f"layer {index}: the record keeps {size} neurons per expert, more than the "
                                 f"{bank.intermediate_size} the model built from its config holds")
            if size == bank.intermediate_size:  # the config already builds this width (a standard checkpoint)
                continue
            shared = tied_shared_expert(layout, index, bank)
            shrink_expert_neurons(bank, torch.arange(size, device="cpu").expand(bank.num_experts, size))
            if shared is not None:
                shrink_shared_expert(shared, torch.arange(min(shared.width, size * shared.factor), device="cpu"))


def expert_size_field(config: Any, width: int) -> str:
    """The config field that holds the routed experts' intermediate size ``width``."""
    return field_holding(config, EXPERT_SIZE_FIELDS, width, "neurons per routed expert")
